"""OrthoLinear: y = base(x) + alpha * ortho(x), with a packed INT4 base and a sparse CSR ortho stream."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import ALPHA_MAX, Backend, validate_alpha
from .kernels import dual_linear_forward
from .kernels.reference import csr_dense, dequant_weight
from .quant import QuantizedTensor, n_groups
from .sparse import CSR, empty_csr, index_dtype

# The state-dict names of the ortho stream: everything else an OrthoLinear holds is the base.
ORTHO_KEYS = ("ortho_crow", "ortho_col", "ortho_values")


BLOCK_BYTES = 256 * 2**20  # the largest dense weight block the backward materialises at once


def is_ortho_key(key: str) -> bool:
    """`model.layers.0.mlp.up_proj.ortho_values` -> True."""
    return key.rsplit(".", 1)[-1] in ORTHO_KEYS


def validate_row_alpha(alphas) -> torch.Tensor:
    """A per-row alpha vector (one value per batch entry) as a float32 (B,) tensor, checked value by value.

    Raises:
        ValueError: not 1-D, empty, or a value that is not finite or outside [0, ALPHA_MAX].
    """
    a = torch.as_tensor(alphas)
    if a.dim() != 1 or a.numel() == 0:
        raise ValueError(f"per-row alpha must be a non-empty 1-D tensor (one value per batch entry), got shape "
                         f"{tuple(a.shape)}")
    if a.dtype == torch.bool or not (a.is_floating_point() or a.dtype in (torch.int32, torch.int64)):
        raise ValueError(f"per-row alpha must hold numbers, got dtype {a.dtype}")
    a = a.float()
    bad = ~torch.isfinite(a) | (a < 0) | (a > ALPHA_MAX)
    if bool(bad.any()):
        i = int(bad.nonzero()[0])
        raise ValueError(f"alpha[{i}] must be finite and in [0, {ALPHA_MAX:g}] (0 = kill switch, 1 = fine-tuned), "
                         f"got {a[i].item()!r}")
    return a


class OrthoLinear(nn.Module):
    """Drop-in for `nn.Linear` holding a frozen INT4 base and a sparse ortho stream.

    `alpha` is a 0-dim buffer: changing it never changes module structure. It is not part of the state dict
    (a runtime switch, not weights). At `alpha == 0` the ortho tensors are not read at all, so the output is
    bit-identical to the base alone (the kill switch). The ortho values are an `nn.Parameter` (frozen by
    default) so the stream itself can be trained.

    `OrthoLinear(...)` makes an empty skeleton (what a checkpoint is loaded into); `from_parts` is the one
    builder that fills the packed parts.

    Example:
        >>> lin = OrthoLinear.from_parts(quantize(w), csr)   # doctest: +SKIP
        >>> lin.set_alpha(0.0); y0 = lin(x)                  # base only
    """

    def __init__(self, in_features: int, out_features: int, group_size: int, symmetric: bool = True,
                 nnz: int = 0, bias: bool = False, dtype: torch.dtype = torch.float32, device=None):
        super().__init__()
        if in_features % 2:
            raise ValueError(f"in_features must be even to pack two nibbles per byte, got {in_features}")
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        groups = n_groups(in_features, group_size)
        kw = dict(device=device)
        self.register_buffer("qweight", torch.zeros(out_features, in_features // 2, dtype=torch.uint8, **kw))
        self.register_buffer("scales", torch.ones(out_features, groups, dtype=dtype, **kw))
        self.register_buffer("zeros", None if symmetric else torch.zeros(out_features, groups, dtype=dtype, **kw))
        self.register_buffer("ortho_crow", torch.zeros(out_features + 1, dtype=torch.int32, **kw))
        self.register_buffer("ortho_col", torch.zeros(nnz, dtype=index_dtype(in_features), **kw))
        self.ortho_values = nn.Parameter(torch.zeros(nnz, dtype=dtype, **kw), requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, **kw), requires_grad=False) if bias else None
        self.register_buffer("alpha", torch.tensor(1.0, **kw), persistent=False)
        # (B,) float32 or None: one alpha per batch entry (dim 0 of x), used instead of `alpha` while set
        self.register_buffer("row_alpha", None, persistent=False)
        self.has_ortho = True  # False when loaded without the ortho file: the stream is physically absent
        # None: read alpha (a device sync on CUDA). True/False: fixed by whoever captures a CUDA graph
        # (libortho.decode), which must not sync; see `ortho_on`.
        self.pinned_ortho: bool | None = None
        self._base_cache: torch.Tensor | None = None
        self._rows_cache: torch.Tensor | None = None
        self._merged: tuple | None = None  # (key, base + alpha * ortho) while the base is cached
        self.set_backend(Backend.AUTO)
        self._register_state_dict_hook(_own_storage)

    # -- construction -------------------------------------------------------------------------
    @classmethod
    def from_parts(cls, base: QuantizedTensor, ortho: CSR | None, bias: torch.Tensor | None = None,
                   device=None) -> "OrthoLinear":
        """The one builder of an OrthoLinear's packed parts: a packed INT4 base, a CSR stream (None: empty)."""
        out_f, in_f = base.shape
        ortho = ortho if ortho is not None else empty_csr(base.shape, base.scales.dtype, base.qweight.device)
        if tuple(ortho.shape) != tuple(base.shape):
            raise ValueError(f"ortho shape {tuple(ortho.shape)} does not match base shape {tuple(base.shape)}")
        device = base.qweight.device if device is None else device
        m = cls(in_f, out_f, base.group_size, base.symmetric, ortho.nnz, bias is not None, base.scales.dtype, device)
        m.qweight.copy_(base.qweight)
        m.scales.copy_(base.scales)
        if base.zeros is not None:
            m.zeros.copy_(base.zeros)
        m.ortho_crow.copy_(ortho.crow)
        m.ortho_col.copy_(ortho.col.to(m.ortho_col.dtype))
        m.ortho_values.data.copy_(ortho.values.to(m.ortho_values.dtype))
        if bias is not None:
            m.bias.data.copy_(bias)
        return m

    @classmethod
    def from_linear(cls, linear: nn.Module, base: QuantizedTensor, ortho: CSR | None) -> "OrthoLinear":
        """`from_parts` with the bias and the device of the `nn.Linear` it replaces."""
        bias = linear.bias.detach() if getattr(linear, "bias", None) is not None else None
        return cls.from_parts(base, ortho, bias, device=linear.weight.device)

    def set_ortho_(self, ortho: CSR | None) -> "OrthoLinear":
        """Replace the ortho stream (None: drop it; the layer then holds the base alone and only alpha=0 runs)."""
        dev, dtype = self.qweight.device, self.scales.dtype
        if ortho is not None and tuple(ortho.shape) != (self.out_features, self.in_features):
            raise ValueError(f"ortho shape {tuple(ortho.shape)} does not match ({self.out_features}, "
                             f"{self.in_features})")
        o = ortho if ortho is not None else empty_csr((self.out_features, self.in_features), dtype, dev)
        self.ortho_crow = o.crow.to(dev, torch.int32)
        self.ortho_col = o.col.to(dev, index_dtype(self.in_features))
        self.ortho_values = nn.Parameter(o.values.to(dev, dtype), requires_grad=False)
        self.has_ortho = ortho is not None
        if not self.has_ortho:
            self.alpha.fill_(0.0)
        self._rows_cache = self._merged = None
        return self

    @property
    def symmetric(self) -> bool:
        return self.zeros is None

    @property
    def nnz(self) -> int:
        return self.ortho_values.numel()

    def base(self) -> QuantizedTensor:
        return QuantizedTensor(self.qweight, self.scales, self.zeros, self.group_size,
                               (self.out_features, self.in_features))

    def ortho(self) -> CSR:
        return CSR(self.ortho_crow, self.ortho_col, self.ortho_values, (self.out_features, self.in_features))

    def spec(self) -> dict:
        """What a skeleton needs (`OrthoLinear(**spec)` minus dtype): saved in the checkpoint's config."""
        return {"in_features": self.in_features, "out_features": self.out_features, "group_size": self.group_size,
                "symmetric": self.symmetric, "bias": self.bias is not None, "nnz": self.nnz}

    # -- alpha -------------------------------------------------------------------------------------
    def set_alpha(self, alpha: float) -> None:
        alpha = validate_alpha(alpha)
        if alpha != 0 and not self.has_ortho:
            raise ValueError("this layer was loaded without its ortho stream; only alpha=0 is possible")
        self.alpha.fill_(alpha)

    def set_row_alpha(self, alphas: torch.Tensor | None) -> None:
        """One alpha per batch entry: y[b] = base(x[b]) + alphas[b] * ortho(x[b]) for x of shape (B, ..., in).

        While set it replaces the scalar `alpha`; None goes back to the scalar. A float32 tensor already on this
        layer's device is kept as is, not copied: layers given the same tensor share it, so an in-place update
        (a CUDA graph's next replay) reaches them all.

        Args:
            alphas: (B,) values in [0, ALPHA_MAX], or None.
        """
        if alphas is None:
            self.row_alpha = None
            return
        a = validate_row_alpha(alphas)
        if bool(a.ne(0).any()) and not self.has_ortho:
            raise ValueError("this layer was loaded without its ortho stream; only alpha=0 is possible")
        dev = self.alpha.device
        self.row_alpha = alphas if (isinstance(alphas, torch.Tensor) and alphas.dtype == torch.float32
                                    and alphas.device == dev) else a.to(dev)

    @property
    def ortho_on(self) -> bool:
        """Whether the ortho stream takes part in `forward` (for any row): the one test the decoder and the kernels
        read."""
        if not (self.has_ortho and self.nnz):
            return False
        if self.pinned_ortho is not None:
            return self.pinned_ortho
        if self.row_alpha is not None:
            return bool(self.row_alpha.ne(0).any())
        return bool(self.alpha.item() != 0)

    def _scalar_alpha(self, what: str) -> None:
        if self.row_alpha is not None:
            raise ValueError(f"{what} needs one alpha per layer, but this layer has per-row alphas; call "
                             f"set_alpha(model, <number>) first")

    # -- backend ------------------------------------------------------------------------------------
    def set_backend(self, backend: Backend | str) -> "OrthoLinear":
        """Bind `forward` to one implementation (hqq style): chosen once, not per call."""
        self.backend = Backend(backend)
        self._impl = _IMPLS[self.backend]
        return self

    def cache_base_(self, enabled: bool = True) -> "OrthoLinear":
        """Keep the dequantized base in memory: faster on CPU, at the cost of a dense copy."""
        self._base_cache = self.dequantized_base() if enabled else None
        self._merged = None
        return self

    # -- math ---------------------------------------------------------------------------------
    def dequantized_base(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        if self._base_cache is not None:
            return self._base_cache if dtype is None else self._base_cache.to(dtype)
        return dequant_weight(self.qweight, self.scales, self.zeros, self.group_size, dtype or self.scales.dtype)

    def ortho_dense(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The ortho stream as a dense (out, in) matrix; differentiable in `ortho_values`."""
        if self._rows_cache is None or self._rows_cache.numel() != self.nnz:
            self._rows_cache = self.ortho().rows()
        return csr_dense(self.ortho_crow, self.ortho_col, self.ortho_values, (self.out_features, self.in_features),
                         dtype, rows=self._rows_cache)

    def merged_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """base + alpha * ortho as a dense (out, in) matrix (what `libortho.merge` writes into nn.Linear)."""
        self._scalar_alpha("merged_weight")
        dtype = dtype or self.scales.dtype
        w = self.dequantized_base(torch.float32)
        if self.ortho_on:
            w = w + self.alpha.float() * self.ortho_dense(torch.float32)
        return w.to(dtype)

    def row_blocks(self, like: torch.Tensor):
        """(r0, r1) blocks of output rows whose dense weight takes at most BLOCK_BYTES in `like`'s dtype."""
        rows = max(1, BLOCK_BYTES // (self.in_features * like.element_size()))
        return [(r0, min(self.out_features, r0 + rows)) for r0 in range(0, self.out_features, rows)]

    def weight_rows(self, r0: int, r1: int, dtype: torch.dtype) -> torch.Tensor:
        """Rows r0:r1 of base + alpha * ortho as a dense (r1 - r0, in) matrix."""
        z = None if self.zeros is None else self.zeros[r0:r1]
        w = dequant_weight(self.qweight[r0:r1], self.scales[r0:r1], z, self.group_size, dtype)
        if self.ortho_on:
            lo, hi = int(self.ortho_crow[r0]), int(self.ortho_crow[r1])
            w = w + self.alpha.to(dtype) * csr_dense(self.ortho_crow[r0:r1 + 1] - lo, self.ortho_col[lo:hi],
                                                      self.ortho_values[lo:hi], (r1 - r0, self.in_features), dtype)
        return w

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., in) -> (..., out)
        if self.row_alpha is not None and (x.dim() < 2 or x.shape[0] != self.row_alpha.numel()):
            raise ValueError(f"per-row alpha holds {self.row_alpha.numel()} values, one per batch entry, but x has "
                             f"shape {tuple(x.shape)}; give x as (B, ..., in) with B = {self.row_alpha.numel()}")
        if torch.is_grad_enabled() and (x.requires_grad or self.ortho_values.requires_grad):
            self._scalar_alpha("training (autograd through OrthoLinear)")
            return _Trainable.apply(x, self.ortho_values, self)
        return self._impl(self, x)

    def _merged_weight(self, base: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """base + alpha * ortho. With the base cached and no gradient wanted (evaluation at a fixed alpha), the
        sum is kept until alpha, the ortho values (their in-place version counter) or the dtype change."""
        if self._base_cache is None or (torch.is_grad_enabled() and self.ortho_values.requires_grad):
            return base + self.alpha.to(dtype) * self.ortho_dense(dtype)
        key = (self.alpha.item(), self.ortho_values._version, self.ortho_values.data_ptr(), dtype)
        if self._merged is None or self._merged[0] != key:
            with torch.no_grad():
                self._merged = (key, base + self.alpha.to(dtype) * self.ortho_dense(dtype))
        return self._merged[1]

    def extra_repr(self) -> str:
        a = f"alpha={self.alpha.item():g}" if self.row_alpha is None else f"row_alpha={self.row_alpha.tolist()}"
        return (f"in_features={self.in_features}, out_features={self.out_features}, group_size={self.group_size}, "
                f"symmetric={self.symmetric}, nnz={self.nnz}, {a}, backend={self.backend.value}")


def in_larger_storage(t: torch.Tensor) -> bool:
    """Whether `t` is a view into a larger storage (a part of a fused copy, libortho.decode)."""
    return t.untyped_storage().nbytes() != t.nbytes


def _own_storage(module, state_dict, prefix, local_metadata):
    """A tensor of `state_dict` that is a view into a larger storage (a part of a fused copy, libortho.decode)
    is cloned: a saver that keeps one tensor per storage (tied-weight detection) then still saves each part."""
    for name, t in list(state_dict.items()):
        if name.startswith(prefix) and isinstance(t, torch.Tensor) and in_larger_storage(t):
            state_dict[name] = t.clone()


class _Trainable(torch.autograd.Function):
    """y = x W^T, W = base + alpha * ortho(values), differentiable in x and in the ortho values.

    Autograd through a dense W would keep every layer's dequantized weight alive until backward (the dense
    model, 16 GB at 8B). This saves x and recomputes one layer's W in backward, so training the stream costs
    activations plus one layer's weight at a time. The forward is the module's own (the fused kernel on a GPU).
    """

    @staticmethod
    def forward(ctx, x, values, m):
        ctx.m = m
        ctx.save_for_backward(x, values)
        with torch.no_grad():
            return m._impl(m, x)  # (..., out)

    @staticmethod
    def backward(ctx, gy):  # gy (..., out)
        x, values = ctx.saved_tensors
        m: OrthoLinear = ctx.m
        gx = gv = None
        with torch.no_grad():
            if ctx.needs_input_grad[0]:
                if m._base_cache is not None or m.out_features * m.in_features * gy.element_size() <= BLOCK_BYTES:
                    w = m.dequantized_base(gy.dtype)
                    if m.ortho_on:
                        w = w + m.alpha.to(gy.dtype) * m.ortho_dense(gy.dtype)
                    gx = gy @ w  # (..., in)
                else:  # a large weight (an 8B head) in row blocks: never the whole dense matrix at once
                    gx = sum(gy[..., r0:r1] @ m.weight_rows(r0, r1, gy.dtype) for r0, r1 in m.row_blocks(gy))
            if ctx.needs_input_grad[1] and m.ortho_on:
                gv = ortho_value_grad(gy.reshape(-1, m.out_features), x.reshape(-1, m.in_features),
                                      m.ortho().rows() if m._rows_cache is None else m._rows_cache,
                                      m.ortho_col.long(), m.alpha).to(values.dtype)
            elif ctx.needs_input_grad[1]:
                gv = torch.zeros_like(values)
        return gx, gv, None


def ortho_value_grad(g: torch.Tensor, x: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor,
                     alpha: torch.Tensor, chunk_elems: int = 1 << 24) -> torch.Tensor:
    """dLoss/dvalues[k] = alpha * sum_n g[n, rows[k]] * x[n, cols[k]]: the dense gradient g^T x read only at
    the stream's entries, in chunks of entries so the temporaries stay under `chunk_elems` floats."""
    # transposed once so each entry gathers one contiguous row of N values (a column gather of (N, out) reads
    # N scattered floats per entry: the H200 profile of an ortho-tuning step had it as the top kernel after GEMMs)
    gt, xt = g.float().t().contiguous(), x.float().t().contiguous()  # (out, N), (in, N)
    step = max(1, chunk_elems // max(1, gt.shape[1]))
    out = torch.empty(rows.numel(), dtype=torch.float32, device=g.device)
    for s in range(0, rows.numel(), step):
        r, c = rows[s:s + step], cols[s:s + step]
        out[s:s + step] = (gt[r] * xt[c]).sum(1)  # (chunk, N) -> (chunk,)
    return out * alpha.float()


def _forward_torch(m: OrthoLinear, x: torch.Tensor) -> torch.Tensor:
    """The plain-torch path (the reference's math, with the CPU caches): every device, differentiable."""
    w = m.dequantized_base(x.dtype)
    if m.row_alpha is not None:
        return _forward_torch_rows(m, x, w)
    # alpha == 0 must not read the ortho stream: the kill switch is a branch, not a multiply by 0.
    if m.ortho_on:
        w = m._merged_weight(w, x.dtype)
    return F.linear(x, w, None if m.bias is None else m.bias.to(x.dtype))


def _forward_torch_rows(m: OrthoLinear, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Per-row alpha, plain torch: y = x base^T for every row, plus alpha[b] * x[b] ortho^T for the rows whose alpha
    is not 0 (the others never meet the stream, so they are the base alone bit for bit)."""
    y = F.linear(x, w, None if m.bias is None else m.bias.to(x.dtype))  # (B, ..., out)
    if not m.ortho_on:
        return y
    a = m.row_alpha.to(x.dtype).view(-1, *(1,) * (x.dim() - 1))  # (B, 1, ..., 1)
    o = m.ortho_dense(x.dtype)
    if x.is_cuda and m.pinned_ortho is not None:  # a CUDA graph: choosing rows would sync; where() keeps 0-rows exact
        return torch.where(a != 0, y + a * F.linear(x, o), y)
    rows = m.row_alpha.nonzero().flatten()
    y[rows] = y[rows] + a[rows] * F.linear(x[rows], o)
    return y


def _forward_triton(m: OrthoLinear, x: torch.Tensor) -> torch.Tensor:
    y = dual_linear_forward(m, x)
    if y is None:
        raise ValueError(f"backend 'triton' does not apply here (x {x.dtype} on {x.device}, group_size "
                         f"{m.group_size}, in_features {m.in_features}); use Backend.AUTO or Backend.TORCH")
    return y


def _forward_auto(m: OrthoLinear, x: torch.Tensor) -> torch.Tensor:
    if x.is_cuda and m._base_cache is None:
        y = dual_linear_forward(m, x)
        if y is not None:
            return y
    return _forward_torch(m, x)


_IMPLS = {Backend.AUTO: _forward_auto, Backend.TORCH: _forward_torch, Backend.TRITON: _forward_triton}


def concat_ortho_linears(mods) -> OrthoLinear:
    """One OrthoLinear whose outputs are the parts' outputs side by side: y = cat([m(x) for m in mods], -1).

    The packed base (qweight, scales, zeros), the bias and the CSR stream are concatenated along the output
    dimension (each part's row pointers shifted by the entries before it), so one GEMV reads what the parts
    read (the decoder's fused q|k|v and gate|up). The result is a new module holding copies; the parts are
    left as they are. Its alpha is the parts' shared alpha: the scalar, or the per-row tensor they share.

    Args:
        mods: OrthoLinears with the same in_features, group_size, symmetric, dtype, device, alpha, has_ortho
            and bias or not.
    Returns:
        an OrthoLinear of out_features = sum of the parts', with the first part's backend.
    Raises:
        ValueError: fewer than one part, a part that is not an OrthoLinear, or parts that differ in any of the above.
    """
    mods = _check_parts(mods)
    rows = [m.row_alpha for m in mods]
    if any(r is not None for r in rows):
        # the same tensor, not equal values: the fused copy follows the first part's, so a later in-place change
        # to another part's own tensor would go unseen
        if any(r is not rows[0] for r in rows):
            raise ValueError("parts to concatenate do not share one per-row alpha tensor; give them one first "
                             "(set_alpha(model, ...))")
    else:
        alphas = [m.alpha.item() for m in mods]
        if len(set(alphas)) > 1:
            raise ValueError(f"parts to concatenate have different alphas {alphas}; give them one alpha first")
    return cat_parts(mods)


def _check_parts(mods) -> list:
    """The parts as a list, checked for what concatenation needs (alpha aside)."""
    mods = list(mods)
    if not mods or not all(isinstance(m, OrthoLinear) for m in mods):
        raise ValueError(f"concat_ortho_linears needs one or more OrthoLinear, got {[type(m).__name__ for m in mods]}")
    first = mods[0]
    for attr in ("in_features", "group_size", "symmetric", "has_ortho"):
        vals = [getattr(m, attr) for m in mods]
        if len(set(vals)) > 1:
            raise ValueError(f"parts to concatenate differ in {attr}: {vals}; only layers that share it can be fused")
    for what, vals in (("dtype", [m.scales.dtype for m in mods]), ("device", [m.qweight.device for m in mods]),
                       ("bias", [m.bias is not None for m in mods])):
        if len(set(vals)) > 1:
            raise ValueError(f"parts to concatenate differ in {what}: {vals}; only layers that share it can be fused")
    if sum(m.nnz for m in mods) > torch.iinfo(torch.int32).max:
        raise ValueError(f"{sum(m.nnz for m in mods)} ortho entries in all exceed the int32 row pointers; fuse "
                         f"fewer layers")
    return mods


def cat_parts(mods) -> OrthoLinear:
    """`concat_ortho_linears` without the alpha check: the alpha (scalar and per-row) is the first part's. For a
    caller that ties the result's alpha to its parts itself (libortho.decode)."""
    mods = _check_parts(mods)
    first = mods[0]
    nnz = [m.nnz for m in mods]

    # each part's crow counts from 0: shift it by the entries of the parts before it, drop its final entry but
    # for the last part (it is the next part's first)
    starts = [0]
    for n in nnz:
        starts.append(starts[-1] + n)
    crow = torch.cat([m.ortho_crow[:-1] + s for m, s in zip(mods, starts)] +
                     [torch.tensor([starts[-1]], dtype=torch.int32, device=first.ortho_crow.device)])
    out_f = sum(m.out_features for m in mods)
    shape = (out_f, first.in_features)
    base = QuantizedTensor(torch.cat([m.qweight for m in mods]), torch.cat([m.scales for m in mods]),
                           None if first.symmetric else torch.cat([m.zeros for m in mods]), first.group_size, shape)
    ortho = CSR(crow.to(torch.int32), torch.cat([m.ortho_col for m in mods]),
                torch.cat([m.ortho_values.detach() for m in mods]), shape)
    bias = None if first.bias is None else torch.cat([m.bias.detach() for m in mods])
    fused = OrthoLinear.from_parts(base, ortho, bias)
    fused.has_ortho = first.has_ortho
    fused.alpha.copy_(first.alpha)
    fused.row_alpha = first.row_alpha
    fused.set_backend(first.backend)
    if all(m._base_cache is not None for m in mods):
        fused.cache_base_()
    return fused
