"""OrthoLinear: y = base(x) + alpha * ortho(x), with a packed INT4 base and a sparse CSR ortho stream."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import validate_alpha
from .quant import QuantizedTensor, dequantize_codes, n_groups, unpack_int4
from .sparse import CSR, empty_csr, index_dtype, scatter_dense


class OrthoLinear(nn.Module):
    """Drop-in for `nn.Linear` holding a frozen INT4 base and a sparse ortho stream.

    `alpha` is a 0-dim buffer: changing it never changes module structure. At `alpha == 0` the ortho
    tensors are not read at all, so the output is bit-identical to the base alone (the kill switch).
    The ortho values are an `nn.Parameter` (frozen by default) so the stream itself can be trained.

    Example:
        >>> lin = OrthoLinear.from_parts(quantize(w), csr)   # doctest: +SKIP
        >>> lin.alpha.fill_(0.0); y0 = lin(x)                # base only
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
        self.register_buffer("alpha", torch.tensor(1.0, **kw))
        self.has_ortho = True  # False when loaded without the ortho file: the stream is physically absent
        self._base_cache: torch.Tensor | None = None
        self._rows_cache: torch.Tensor | None = None
        self._merged: tuple | None = None  # (key, base + alpha * ortho) while the base is cached
        # "auto": the fused GPU kernel on CUDA bf16/fp16 inputs when it applies, else plain torch;
        # "torch": always plain torch (the reference); "triton": the GPU kernel or an error.
        self.backend = "auto"
        self._alpha_hint: bool | None = None  # set while a CUDA graph is captured: alpha != 0 without a sync

    # -- construction -------------------------------------------------------------------------
    @classmethod
    def from_parts(cls, base: QuantizedTensor, ortho: CSR | None, bias: torch.Tensor | None = None) -> "OrthoLinear":
        out_f, in_f = base.shape
        ortho = ortho if ortho is not None else empty_csr(base.shape, base.scales.dtype, base.qweight.device)
        if ortho.shape != base.shape:
            raise ValueError(f"ortho shape {ortho.shape} does not match base shape {base.shape}")
        m = cls(in_f, out_f, base.group_size, base.symmetric, ortho.nnz, bias is not None,
                base.scales.dtype, base.qweight.device)
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

    def set_alpha(self, alpha: float) -> None:
        alpha = validate_alpha(alpha)
        if alpha != 0 and not self.has_ortho:
            raise ValueError("this layer was loaded without its ortho stream; only alpha=0 is possible")
        self.alpha.fill_(alpha)

    def cache_base_(self, enabled: bool = True) -> "OrthoLinear":
        """Keep the dequantized base in memory: faster on CPU, at the cost of a dense copy."""
        self._base_cache = self.dequantized_base() if enabled else None
        self._merged = None
        return self

    # -- math ---------------------------------------------------------------------------------
    def dequantized_base(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        if self._base_cache is not None:
            return self._base_cache if dtype is None else self._base_cache.to(dtype)
        return dequantize_codes(unpack_int4(self.qweight), self.scales, self.zeros, self.group_size,
                                dtype or self.scales.dtype)

    def ortho_dense(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The ortho stream as a dense (out, in) matrix; differentiable in `ortho_values`."""
        if self._rows_cache is None or self._rows_cache.numel() != self.nnz:
            self._rows_cache = self.ortho().rows()
        return scatter_dense(self._rows_cache, self.ortho_col.long(), self.ortho_values,
                             (self.out_features, self.in_features), dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., in) -> (..., out)
        backend = getattr(self.backend, "value", self.backend)
        if backend != "torch" and x.is_cuda and self._base_cache is None:
            from .kernels import dual_linear_forward

            y = dual_linear_forward(self, x)
            if y is not None:
                return y
            if backend == "triton":
                raise ValueError(f"backend 'triton' does not apply here (x {x.dtype} on {x.device}, "
                                 f"group_size {self.group_size}, in_features {self.in_features}); use 'auto'")
        w = self.dequantized_base(x.dtype)
        # alpha == 0 must not read the ortho stream: the kill switch is a branch, not a multiply by 0.
        on = self._alpha_hint if self._alpha_hint is not None else self.alpha.item() != 0  # hint: no sync in graphs
        if self.has_ortho and self.nnz and on:
            w = self._merged_weight(w, x.dtype)
        return F.linear(x, w, None if self.bias is None else self.bias.to(x.dtype))

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
        return (f"in_features={self.in_features}, out_features={self.out_features}, group_size={self.group_size}, "
                f"symmetric={self.symmetric}, nnz={self.nnz}, alpha={self.alpha.item():g}")
