"""Greedy decoding with a static KV cache and one CUDA graph per token, for Llama-family models.

Per-token Python overhead (about 1000 small launches for a 32-layer model) would otherwise dominate a
decode step whose weights stream in ~2 ms. The decoder reads the model's parts (HF Llama module tree:
`model.model.layers[i].self_attn.q_proj`, ...), so it runs a converted model (OrthoLinear), a plain one
(nn.Linear) or a shape-only one (`libortho.shape_only`) alike. The embedding table may stay on the CPU:
then one row per token is copied in before each graph replay.

alpha: the graph bakes in which layers read their ortho stream (alpha != 0); the decoder reads every
layer's alpha once per `generate` call and captures again when that pattern changed. Nonzero values are
read on the device at every replay, so changing alpha between nonzero values needs no new capture.

A batch (`StaticDecoder(model, batch=B)`) decodes B prompts of one length together, each with its own alpha
(`generate(ids, n, alphas=...)`): the decoder holds one (B,) alpha tensor on the device that every OrthoLinear
reads per row while it runs (OrthoLinear.set_row_alpha). The graph bakes in only whether any request reads the
stream; which ones do is read at every replay, so [1, 0] -> [0, 1] needs no new capture.

`fuse=True` (the default): the decoder builds, once, one OrthoLinear per layer for q|k|v and one for gate|up
(`libortho.linear.concat_ortho_linears`) and splits their outputs with views, so a token launches one GEMV where
it launched three and two; rotary runs once over q and k side by side. The model is not changed: the decoder
owns the fused copies, which cost as much memory again as the q, k, v, gate and up weights (2/3 of a Llama
layer's linear weights; at the Llama-3-8B shape with a 1% stream about 2.5 GB, from the shapes). On CUDA the copies are built only where they fit in free memory (else the decoder runs
unfused and says so; `fuse=False` on a small card). A fused module reads the alpha of its parts: their scalar
alpha buffer (the first part's, the very tensor) or their shared per-row tensor; in a `generate` where the parts
disagree (alpha set layer by layer), that layer runs its parts unfused. A part whose tensors were replaced or
changed in place (autograd-visible; not through `.data`) is fused again at the next `generate`.

`ranges=True` wraps each part of a step (each linear by kind, attention, norms, rotary, ...) in a profiler
range named "lo:<part>" (RANGES), for bench/profile_decode.py; off, it costs nothing. Fused linears are labelled
"qkv" and "gate_up".

`fuse_elementwise=True` (the default): the small ops between the linears run as fused kernels
(libortho/kernels/triton_decode.py; their plain-torch twins off CUDA): each residual add with the RMSNorm after it
(labelled "norm"), silu(gate) * up (labelled "elementwise"), and, in a decode step, rotary on q and k with the
KV-cache write (labelled "rotary"; "kv_copy" is then empty). `fuse_attention=True` (the default): a decode step's
attention over the cache reading only the filled positions (`triton_decode.decode_attention`, split over positions
for caches longer than 1,024). Measured on an H200 (Llama-3-8B shape, batch 1, 48 positions, CUDA graphs, one run,
results/gpu/h200-2026-11-30-decode-fused-ew/): alpha 1 227.7 -> 337.5 tok/s, alpha 0 262.8 -> 351.5 with both on.
"""
from __future__ import annotations

import contextlib
import warnings

import torch
import torch.nn.functional as F

from .kernels import triton_decode as td

# the parts of a decode step that `ranges=True` labels (profiler ranges "lo:<part>")
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head")
FUSED = {"qkv": ("q_proj", "k_proj", "v_proj"), "gate_up": ("gate_proj", "up_proj")}  # fused part -> its linears
RANGES = LINEARS + tuple(FUSED) + ("attention", "norm", "rotary", "elementwise", "embedding", "kv_copy", "sampling")


def _ortho_modules(model):
    from .modules import ortho_modules

    return list(ortho_modules(model).values())


def _fusable(mods) -> bool:
    """Whether these linears can be fused: OrthoLinears that agree on what concatenation needs."""
    from .linear import OrthoLinear, _check_parts

    if not all(isinstance(m, OrthoLinear) for m in mods):
        return False
    try:
        _check_parts(mods)
    except ValueError:
        return False
    return True


def _nbytes(m) -> int:
    """Bytes a fused copy of `m` takes: its packed tensors, plus the dense base when `m` caches one (the copy
    caches it too)."""
    return sum(t.numel() * t.element_size() for t in (m.qweight, m.scales, m.zeros, m.ortho_crow, m.ortho_col,
                                                       m.ortho_values, m.bias, m._base_cache) if t is not None)


def _free_bytes(device) -> int:
    """Bytes this process can still allocate on a CUDA device: the device's free memory plus what the allocator
    holds unused, within a cap set with `torch.cuda.set_per_process_memory_fraction` (libortho.gpu.apply_cap)."""
    free, total = torch.cuda.mem_get_info(device)
    allocated = torch.cuda.memory_allocated(device)
    frac = getattr(torch.cuda, "get_per_process_memory_fraction", lambda d: 1.0)(device)
    return min(free + torch.cuda.memory_reserved(device) - allocated, int(frac * total) - allocated)


def _stamp(mods) -> tuple:
    """What each part's tensors are now: replaced (a new pointer) or changed in place (a new version) shows."""
    return tuple((t.data_ptr(), t._version) for m in mods for t in (m.qweight, m.scales, m.zeros, m.ortho_crow,
                                                                      m.ortho_col, m.ortho_values, m.bias)
                 if t is not None) + tuple(m.has_ortho for m in mods)


class _Fused:
    """One fused copy of some linears of a layer (q|k|v or gate|up), owned by the decoder."""

    def __init__(self, parts, share: bool = True):
        self.parts, self.share = parts, share
        self.sizes = [m.out_features for m in parts]
        self.active = True  # whether this generate runs the fused copy (the parts agree on alpha)
        self.build()

    def build(self):
        from .linear import cat_parts

        self.module = None  # the old copy goes before the new one is made
        self.module = cat_parts(self.parts)
        self.module.alpha = self.parts[0].alpha  # the part's own buffer: its value is read at every replay
        if self.share:
            _share(self.module, self.parts)
        self.stamp = _stamp(self.parts)

    def refresh(self) -> bool:
        """Build again if a part changed since the copy was made; returns whether it did."""
        if _stamp(self.parts) == self.stamp:
            return False
        self.build()
        return True


@torch.no_grad()
def _share(fused, parts) -> None:
    """Each part's tensors become views of the fused copy's (its rows of the base and bias, its entries of the
    stream): fusing then costs the parts' row pointers only, not a second q|k|v and gate|up (2.37 GiB at 8B, which
    kept the 6 GiB profile from fusing). A part's row pointers stay its own (they count from 0). The parts'
    `state_dict` still gives tensors of their own (OrthoLinear clones views there): a checkpoint saved after
    decoding is the same."""
    r = e = 0
    for m in parts:
        n, k = m.out_features, m.nnz
        m.qweight, m.scales = fused.qweight[r:r + n], fused.scales[r:r + n]
        if m.zeros is not None:
            m.zeros = fused.zeros[r:r + n]
        m.ortho_col = fused.ortho_col[e:e + k]
        m.ortho_values.data = fused.ortho_values.data[e:e + k]
        if m.bias is not None:
            m.bias.data = fused.bias.data[r:r + n]
        m._merged = None  # keyed by the values' pointer: recomputed on the views
        r, e = r + n, e + k


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x, cos, sin_signed):
    """x * cos + rotate_half(x) * sin, as 3 kernels: rotate_half(x) * sin == roll(x) * [-sin1, sin2]."""
    return torch.addcmul(x * cos, x.roll(x.shape[-1] // 2, -1), sin_signed)


def table_on_device(table: torch.Tensor, device) -> bool:
    """Whether a decoder on `device` reads embedding rows from `table` where it is (any GPU index counts for a CUDA
    decoder), rather than through the host (a HostEmbedding)."""
    device = torch.device(device)
    return table.device == device or (table.is_cuda and device.type == "cuda")


class StaticDecoder:
    """Greedy generation of `batch` requests over a static KV cache of `max_seq` positions.

    Args:
        model: a Llama-family HF model (converted, plain or shape-only).
        max_seq: positions of the KV cache (prompt + new tokens).
        batch: requests decoded together (prompts of one length); each may have its own alpha.
        use_graph: capture one CUDA graph per token (CUDA only).
        ranges: label each part of a step for the profiler (bench/profile_decode.py).
        fuse: decode with fused q|k|v and gate|up copies of the OrthoLinear layers (see the module docstring).
        fuse_elementwise: residual add + RMSNorm, SiLU * up, rotary + KV write as one kernel each.
        fuse_attention: a decode step's attention as one kernel.
        share: the fused layers' parts become views of their fused copy (no second copy of q|k|v and gate|up);
            False keeps both (the A/B of bench/profile_decode.py --share both).
        embed_gather: where a decode step finds its embedding row when the table is in host memory (a
            HostEmbedding, e.g. the gtx4050 profile): "device" pins the table (in place, no second copy) and the
            GPU reads the row over the bus inside the graph, no token on the host and no sync per token; "host"
            copies the token to the host, gathers there and copies the row back; "auto" (default) is "device"
            where the GPU reads back two probe rows equal to the host's, else "host" (with a warning). Ignored
            when the table is on the decoder's device.

    Example:
        >>> dec = StaticDecoder(model, max_seq=1024)          # doctest: +SKIP
        >>> ids = dec.generate(prompt_ids, max_new_tokens=128)
        >>> dec8 = StaticDecoder(model, batch=8)              # doctest: +SKIP
        >>> ids = dec8.generate(prompts, 128, alphas=torch.tensor([0.0] * 4 + [1.0] * 4))   # (8, 128)
    """

    def __init__(self, model, max_seq: int = 1024, dtype: torch.dtype = torch.bfloat16, device="cuda",
                 use_graph: bool = True, batch: int = 1, ranges: bool = False, fuse: bool = True,
                 fuse_elementwise: bool = True, fuse_attention: bool = True, share: bool = True,
                 embed_gather: str = "auto"):
        from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

        if not (isinstance(batch, int) and batch >= 1):
            raise ValueError(f"batch must be a positive int, got {batch!r}")
        if embed_gather not in ("auto", "device", "host"):
            raise ValueError(f"embed_gather must be 'auto', 'device' or 'host', got {embed_gather!r}")
        cfg = model.config
        self.model, self.cfg, self.max_seq, self.dtype, self.device = model, cfg, max_seq, dtype, torch.device(device)
        self.B = batch
        self.ranges = ranges
        self.fuse_elementwise, self.fuse_attention = fuse_elementwise, fuse_attention
        self.use_graph = use_graph and self.device.type == "cuda"
        inner = model.model
        self.layers = list(inner.layers)
        self.embed = inner.embed_tokens.weight
        self.embed_on_device = table_on_device(self.embed, self.device)
        self._embed_mode = embed_gather
        self.gather_on_device = self._device_gather(embed_gather)  # rows read from pinned host memory by the GPU
        self.H = cfg.hidden_size
        self.nh, self.nkv = cfg.num_attention_heads, cfg.num_key_value_heads
        self.hd = getattr(cfg, "head_dim", None) or self.H // self.nh
        self.eps = cfg.rms_norm_eps
        shape = (batch, self.nkv, max_seq, self.hd)
        self.k_cache = [torch.zeros(shape, dtype=dtype, device=self.device) for _ in self.layers]
        self.v_cache = [torch.zeros(shape, dtype=dtype, device=self.device) for _ in self.layers]
        rope = LlamaRotaryEmbedding(config=cfg)  # on the host (transformers 5 takes no device); handles Llama 3 scaling
        pos = torch.arange(max_seq)[None]
        cos, sin = rope(torch.zeros(1, dtype=torch.float32), pos)  # (1, S, hd)
        self.cos, self.sin = cos[0].to(self.device, dtype), sin[0].to(self.device, dtype)
        half = self.hd // 2
        self.sin_signed = torch.cat((-self.sin[:, :half], self.sin[:, half:]), -1)
        self.mask_bias = torch.zeros(max_seq, dtype=torch.float32, device=self.device)
        self.neg_inf = torch.full((max_seq,), float("-inf"), device=self.device)
        self.zero = torch.zeros((), device=self.device)
        self.arange = torch.arange(max_seq, device=self.device)
        self.pos = torch.zeros(1, dtype=torch.long, device=self.device)
        self.tok = torch.zeros(batch, 1, dtype=torch.long, device=self.device)
        self.emb_in = torch.zeros(batch, 1, self.H, dtype=dtype, device=self.device)
        self.graph, self.graph_sig = None, None
        self.logits: torch.Tensor | None = None  # (B, V) of the last step, for checks (the graph's own output)
        self.ortho = _ortho_modules(model)
        # one alpha per request, read by every OrthoLinear on its device while `alphas` are in use (generate)
        self.alphas = {d: torch.zeros(batch, dtype=torch.float32, device=d)
                       for d in {m.alpha.device for m in self.ortho}}
        self.row_mode = False
        self._rows_before = None  # each layer's own row_alpha while the decoder's is installed
        # fused[i] = {"qkv": _Fused, "gate_up": _Fused} for layer i (empty: unfused); `active` says which run now
        self.fused: list[dict[str, _Fused]] = [{} for _ in self.layers]
        self.share = share  # the parts become views of their fused copy (`_share`); False: a second copy
        self.fuse = fuse and self._fuse_fits()
        if self.fuse:
            for i, layer in enumerate(self.layers):
                for part, names in FUSED.items():
                    owner = layer.self_attn if part == "qkv" else layer.mlp
                    mods = [getattr(owner, n) for n in names]
                    if _fusable(mods):
                        self.fused[i][part] = _Fused(mods, share)

    def _r(self, part: str):
        """A profiler range around one part of the step, when `ranges` is on."""
        return torch.profiler.record_function("lo:" + part) if self.ranges else contextlib.nullcontext()

    def _lin(self, part: str, module, x):
        with self._r(part):
            return module(x)

    def _fused_list(self):
        return [f for d in self.fused for f in d.values()]

    def _fuse_fits(self) -> bool:
        """Whether the fused copies fit in what this process may still allocate with 512 MiB to spare (always on the
        CPU). An 8B model capped to a 6 GiB card does not: it decodes unfused."""
        from .linear import in_larger_storage

        if self.device.type != "cuda":
            return True
        # the parts become views of their fused copy (`_share`): what stays is their row pointers and any dense
        # base they cache; while one layer is fused, its parts and two copies of them (cat, then the module) exist
        need, peak = {}, {}
        for layer in self.layers:
            for part, names in FUSED.items():
                owner = layer.self_attn if part == "qkv" else layer.mlp
                mods = [getattr(owner, n) for n in names]
                if _fusable(mods):
                    d = mods[0].qweight.device
                    # a part already a view of another decoder's copy frees nothing: that copy stays alive
                    kept = sum(_nbytes(m) if in_larger_storage(m.qweight) or not self.share else
                               m.ortho_crow.nbytes + (m._base_cache.nbytes if m._base_cache is not None else 0)
                               for m in mods)
                    need[d] = need.get(d, 0) + kept
                    peak[d] = max(peak.get(d, 0), 2 * sum(_nbytes(m) for m in mods))
        for d, n in need.items():
            free = _free_bytes(d)
            if n + peak[d] + 2**29 > free:
                warnings.warn(f"StaticDecoder: fusing q|k|v and gate|up needs {(n + peak[d]) / 2**30:.2f} GiB on {d}, "
                              f"{free / 2**30:.2f} GiB is free: decoding unfused (pass fuse=False to skip this check)")
                return False
        return True

    # -- the model, written out once ---------------------------------------------------------------
    def _attn(self, i, layer, h, pos, rope, prefill: bool):
        a = layer.self_attn
        B, T = h.shape[:2]
        cos, sin_s = rope or (None, None)  # (1, 1, T, hd); None: read inside the fused rotary kernel
        f = self.fused[i].get("qkv")
        nq, nk = self.nh * self.hd, self.nkv * self.hd
        one = self.fuse_elementwise and not prefill  # rotary and the KV write as one kernel (a decode step)
        if one and f is not None and f.active:
            qkv = self._lin("qkv", f.module, h)[:, 0]  # (B, nq + 2 nk): q, k, v are column views of it
            q, k, v = qkv[:, :nq], qkv[:, nq:nq + nk], qkv[:, nq + nk:]
        elif one:
            q, k, v = (self._lin(n, getattr(a, n), h)[:, 0] for n in ("q_proj", "k_proj", "v_proj"))  # (B, n*hd)
        elif f is not None and f.active:
            qkv = self._lin("qkv", f.module, h)  # (B, T, (nh + 2 nkv) * hd)
            qk = qkv[..., :(self.nh + self.nkv) * self.hd].view(B, T, self.nh + self.nkv, self.hd).transpose(1, 2)
            with self._r("rotary"):  # q and k heads side by side: one rotary for both, the same math per element
                q, k = apply_rope(qk, cos, sin_s).split((self.nh, self.nkv), 1)  # (B, nh, T, hd), (B, nkv, T, hd)
            v = qkv[..., (self.nh + self.nkv) * self.hd:].view(B, T, self.nkv, self.hd).transpose(1, 2)
        else:
            q = self._lin("q_proj", a.q_proj, h).view(B, T, self.nh, self.hd).transpose(1, 2)  # (B, nh, T, hd)
            k = self._lin("k_proj", a.k_proj, h).view(B, T, self.nkv, self.hd).transpose(1, 2)  # (B, nkv, T, hd)
            v = self._lin("v_proj", a.v_proj, h).view(B, T, self.nkv, self.hd).transpose(1, 2)
            with self._r("rotary"):
                q, k = apply_rope(q, cos, sin_s), apply_rope(k, cos, sin_s)
        if one:
            with self._r("rotary"):  # q (B, nh, 1, hd); k and v go to the cache at pos
                q = td.rope_kv_(q, k, v, self.cos, self.sin_signed, pos, self.k_cache[i], self.v_cache[i])
        else:
            with self._r("kv_copy"):
                self.k_cache[i].index_copy_(2, pos, k)
                self.v_cache[i].index_copy_(2, pos, v)
        with self._r("attention"):
            if prefill:  # the prompt starts at position 0
                o = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
                o = o.transpose(1, 2).reshape(B, T, self.nh * self.hd)
            elif self.fuse_attention:  # one kernel over the filled positions only
                o = td.decode_attention(q, self.k_cache[i], self.v_cache[i], pos).view(B, 1, self.nh * self.hd)
            else:  # one query: grouped heads against the whole static cache, future positions masked
                g = self.nh // self.nkv
                qg = q.reshape(B, self.nkv, g, self.hd)  # query heads j*g .. j*g+g-1 share kv head j
                s = torch.matmul(qg, self.k_cache[i].transpose(-1, -2)).float()  # (B, nkv, g, S)
                p = torch.softmax(torch.add(self.mask_bias, s, alpha=self.hd ** -0.5), -1).to(q.dtype)
                o = torch.matmul(p, self.v_cache[i]).view(B, 1, self.nh * self.hd)  # (B, 1, nh*hd)
        return self._lin("o_proj", a.o_proj, o)

    def _norm(self, x, weight):
        with self._r("norm"):
            return F.rms_norm(x, (self.H,), weight, self.eps)

    def _add_norm(self, x, a, weight):
        """(x + a, rms_norm(x + a) * weight): one kernel with `fuse_elementwise`, else an add and a norm."""
        if self.fuse_elementwise:
            with self._r("norm"):
                return td.add_rms_norm(x, a, weight, self.eps)
        with self._r("elementwise"):
            x = x + a
        return x, self._norm(x, weight)

    def _forward(self, x, pos, prefill: bool):  # x (B, T, H) -> logits of the last position (B, V)
        fe, L = self.fuse_elementwise, len(self.layers)
        rope = None
        if prefill or not fe:  # a fused decode step reads cos/sin at pos inside its rotary kernel
            with self._r("rotary"):
                rope = (self.cos[pos][None, None], self.sin_signed[pos][None, None])  # once per step, not per layer
        h = self._norm(x, self.layers[0].input_layernorm.weight) if fe else None  # later ones follow an add
        for i, layer in enumerate(self.layers):
            if not fe:
                h = self._norm(x, layer.input_layernorm.weight)
            a = self._attn(i, layer, h, pos, rope, prefill)
            x, h = self._add_norm(x, a, layer.post_attention_layernorm.weight)
            m = layer.mlp
            f = self.fused[i].get("gate_up")
            if f is not None and f.active:
                g, u = self._lin("gate_up", f.module, h).split(f.sizes, -1)  # (B, T, I) each: views of one output
            else:
                g, u = self._lin("gate_proj", m.gate_proj, h), self._lin("up_proj", m.up_proj, h)
            with self._r("elementwise"):
                gu = td.silu_mul(g, u) if fe else F.silu(g) * u
            d = self._lin("down_proj", m.down_proj, gu)
            if fe and i + 1 < L:  # this layer's residual add with the next layer's input norm
                x, h = self._add_norm(x, d, self.layers[i + 1].input_layernorm.weight)
            elif fe:  # the last: only the last position goes on, to the final norm
                _, h = self._add_norm(x[:, -1:], d[:, -1:], self.model.model.norm.weight)
            else:
                with self._r("elementwise"):
                    x = x + d
        if not fe:
            h = self._norm(x[:, -1:], self.model.model.norm.weight)
        return self._lin("lm_head", self.model.lm_head, h)[:, 0]  # (B, V)

    def _embed(self, ids):  # ids (B, T) on the embedding's device
        with self._r("embedding"):
            return self.embed[ids].to(self.device, self.dtype, non_blocking=True)

    def _device_gather(self, mode: str) -> bool:
        """Whether decode steps read their embedding rows from the host table on the GPU (see `embed_gather`).
        Decided before any capture: a probe of two pinned rows first, then the whole table pinned."""
        self._gather_table = None
        if self.embed_on_device or mode == "host":
            return False
        why, w = None, self.embed
        head = getattr(self.model, "lm_head", None)
        if self.device.type != "cuda":
            why = f"the decoder runs on {self.device.type}, not a CUDA GPU"
        elif td.triton is None:
            why = "Triton is not importable"
        elif getattr(head, "out_features", 0) > w.shape[0]:  # argmax may name a row the table lacks: no device check
            why = f"lm_head has {head.out_features} outputs for a table of {w.shape[0]} rows"
        else:
            try:
                rows = w[[0, -1]].to(self.dtype).pin_memory()  # (2, H): can the GPU read pinned memory at all?
                got = torch.empty(2, w.shape[1], dtype=self.dtype, device=self.device)
                td.host_rows_(got, rows, torch.tensor([1, 0], device=self.device), strict=True)
                if not torch.equal(got.cpu(), rows[[1, 0]]):
                    why = "the GPU read rows different from the host's"
                elif not w.is_pinned():  # in place: the model's own table becomes page-locked (no copy kept)
                    w.data = w.data.contiguous().pin_memory()
            except Exception as e:  # a driver that does not map pinned memory, or no page-locked memory left
                why = f"the GPU cannot read pinned host memory here ({type(e).__name__}: {str(e)[:120]})"
        if why is None:
            self._gather_table = (w.data_ptr(), w.dtype)
            return True
        if mode == "device":
            raise ValueError(f"embed_gather='device': {why}; use 'host' or 'auto'")
        if self.device.type == "cuda":
            warnings.warn(f"StaticDecoder: embedding rows go through the host every token ({why})", stacklevel=3)
        return False

    def _step(self):  # one decode token, all on the device: the part that is captured
        with self._r("embedding"):
            if self.gather_on_device:  # the GPU reads the row from the pinned host table: no sync, inside the graph
                td.host_rows_(self.emb_in.view(self.B, self.H), self.embed, self.tok.view(self.B), strict=True)
            x = self.embed[self.tok] if self.embed_on_device else self.emb_in  # (B, 1, H)
        if not self.fuse_attention:  # the fused kernel reads pos itself
            with self._r("attention"):
                torch.where(self.arange <= self.pos, self.zero, self.neg_inf, out=self.mask_bias)
        logits = self.logits = self._forward(x, self.pos, prefill=False)  # (B, V): a graph's static output
        with self._r("sampling"):
            self.tok.copy_(logits.argmax(-1, keepdim=True))
            self.pos.add_(1)

    # -- alpha pattern -------------------------------------------------------------------------------
    def _signature(self):
        """(whether each layer reads its stream, each layer's scalar alpha (None in row mode))."""
        if not self.ortho:
            return (), None
        if self.row_mode:  # every layer reads the same per-request alphas: the stream is on where any is nonzero
            dev = next(iter(self.alphas))
            any_on = bool(self.alphas[dev].ne(0).any())
            return tuple(bool(any_on and m.has_ortho and m.nnz) for m in self.ortho), None
        # a layer given per-row alphas on the model (set_alpha(model, vector)) reads the stream if any is nonzero
        on = [(m.alpha if m.row_alpha is None else m.row_alpha).ne(0).any().to(self.device, torch.float32)
              for m in self.ortho]
        on, vals = torch.stack([torch.stack(on), torch.stack([m.alpha.to(self.device, torch.float32)
                                                               for m in self.ortho])]).tolist()  # one sync
        return tuple(bool(o and m.has_ortho and m.nnz) for o, m in zip(on, self.ortho)), vals

    def _plan_fused(self, sig, vals):
        """Build stale fused copies again; run a fused copy only where its parts agree on alpha (their scalar, or
        one per-row tensor); pin each copy's stream as its parts'."""
        index = {id(m): j for j, m in enumerate(self.ortho)}
        for f in self._fused_list():
            f.refresh()
            js = [index[id(m)] for m in f.parts]
            rows = [m.row_alpha for m in f.parts]
            if self.row_mode:
                f.active = True
            elif rows[0] is not None:
                f.active = all(r is rows[0] for r in rows)
            else:
                f.active = all(r is None for r in rows) and len({vals[j] for j in js}) == 1
            f.pin = any(sig[j] for j in js)

    def _set_hints(self, sig):
        if self._rows_before is None:  # prepare may run twice before the hints are cleared: keep the first
            self._rows_before = [m.row_alpha for m in self.ortho]
        for m, s in zip(self.ortho, sig):
            m.pinned_ortho = s  # what each layer's ortho_on says while the graph replays: no per-call sync
            if self.row_mode:
                m.row_alpha = self.alphas[m.alpha.device]  # the decoder's tensor: updated in place, never replaced
        for f in self._fused_list():  # after the parts: a fused copy reads the row alphas its parts read now
            f.module.pinned_ortho = f.pin
            f.module.row_alpha = f.parts[0].row_alpha

    def _clear_hints(self):
        before = self._rows_before or [m.row_alpha for m in self.ortho]
        for m, r in zip(self.ortho, before):
            m.pinned_ortho = None
            m.row_alpha = r  # the model's own per-row alphas (or None), as they were before `prepare`
        for f in self._fused_list():
            f.module.pinned_ortho, f.module.row_alpha = None, None
        self._rows_before = None

    def set_alphas(self, alphas) -> None:
        """One alpha per request for the next `generate` calls (None: every layer's own alpha, as set on the
        model). Updated in place: a captured graph reads the new values at its next replay."""
        if alphas is None:
            self.row_mode = False
            return
        from .linear import validate_row_alpha

        a = validate_row_alpha(alphas)
        if a.numel() != self.B:
            raise ValueError(f"alphas has {a.numel()} values for a decoder of batch={self.B}; give one per request")
        if bool(a.ne(0).any()) and not all(m.has_ortho for m in self.ortho):
            raise ValueError("model was loaded without its ortho stream; only alpha=0 is possible")
        for t in self.alphas.values():
            t.copy_(a)
        self.row_mode = True

    def _capture(self):
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):  # warm-up: Triton compiles and autotunes here, outside the capture
            for _ in range(3):
                if not (self.embed_on_device or self.gather_on_device):
                    self.emb_in.copy_(self._embed(self.tok.cpu() if not self.embed.is_cuda else self.tok))
                self._step()
        torch.cuda.current_stream().wait_stream(s)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self._step()

    # -- public ----------------------------------------------------------------------------------------
    @torch.no_grad()
    def prefill(self, ids: torch.Tensor) -> torch.Tensor:
        """Run the prompts (B, T) from position 0; returns the first generated tokens (B, 1) on the device."""
        if ids.dim() != 2 or ids.shape[0] != self.B:
            raise ValueError(f"prompt ids of shape {tuple(ids.shape)}; this decoder takes (batch={self.B}, T)")
        T = ids.shape[1]
        if T >= self.max_seq:
            raise ValueError(f"prompt of {T} tokens does not fit max_seq={self.max_seq}")
        x = self._embed(ids.to(self.embed.device))
        pos = torch.arange(T, device=self.device)
        logits = self.logits = self._forward(x, pos, prefill=True)
        self.tok.copy_(logits.argmax(-1, keepdim=True))
        self.pos.fill_(T)
        return self.tok

    @torch.no_grad()
    def decode(self, n: int) -> torch.Tensor:
        """n greedy steps after `prefill`; returns the n tokens of each request (B, n) (the last one is not fed
        back)."""
        if int(self.pos.item()) + n > self.max_seq:
            raise ValueError(f"{n} more tokens exceed max_seq={self.max_seq}")
        out = torch.empty(self.B, n, dtype=torch.long, device=self.device)
        for t in range(n):
            out[:, t] = self.tok[:, 0]
            if not (self.embed_on_device or self.gather_on_device):  # one row through the host: a sync per token
                self.emb_in.copy_(self._embed(self.tok.cpu()), non_blocking=True)
            if self.graph is not None:
                self.graph.replay()
            else:
                self._step()
        return out

    def prepare(self):
        """Read the alpha pattern; capture the decode graph again if it changed. Call before prefill."""
        # the table the graph reads: a cast of the model (HostEmbedding makes a new tensor, a Parameter's data is
        # swapped) leaves a captured pointer to freed pinned memory; decide the gather again on the new one
        self.embed = self.model.model.embed_tokens.weight
        if self._gather_table is not None and self._gather_table != (self.embed.data_ptr(), self.embed.dtype):
            self.gather_on_device = self._device_gather(self._embed_mode)
        sig, vals = self._signature()
        self._plan_fused(sig, vals)
        self._set_hints(sig)
        # the graph also bakes in where each layer reads alpha: its scalar, or which per-row tensor (a new vector
        # given with set_alpha(model, ...) is a new tensor; the decoder's own is updated in place), and which
        # fused copies run (and which tensors they are)
        from .kernels import _prefill

        key = (sig, tuple(None if m.row_alpha is None else m.row_alpha.data_ptr() for m in self.ortho),
               tuple((f.active, f.module.qweight.data_ptr(), f.stamp) for f in self._fused_list()),
               _prefill["kernel"],  # a batch over 8 requests runs the prefill kernel in its decode step
               self._gather_table)  # the host table the GPU reads rows from (pointer, dtype)
        if self.use_graph and (self.graph is None or key != self.graph_sig):
            pos0 = int(self.pos.item())
            self._capture()
            self.graph_sig = key
            self.pos.fill_(pos0)

    @torch.no_grad()
    def generate(self, ids: torch.Tensor, max_new_tokens: int = 128, alphas=None) -> torch.Tensor:
        """Greedy continuation of `ids` (B, T).

        Args:
            ids: (B, T) prompts, B = the decoder's batch.
            max_new_tokens: tokens generated per request.
            alphas: (B,) one alpha per request (see `set_alphas`); None keeps what `set_alphas` last gave, or
                the model's own alphas.
        Returns:
            (max_new_tokens,) token ids for batch 1, (B, max_new_tokens) for a batch.
        """
        if alphas is not None:
            self.set_alphas(alphas)
        try:
            self.prepare()
            self.prefill(ids)
            out = self.decode(max_new_tokens)
            return out[0] if self.B == 1 else out
        finally:
            self._clear_hints()


def weight_bytes_per_token(model, ortho_on: bool | None = None) -> int:
    """Bytes of weights one decode token reads: every linear and norm, one embedding row, the LM head.

    OrthoLinear counts its packed base, scales/zeros and, when its ortho stream is read (alpha != 0, or
    `ortho_on`), crow/col/values. bitsandbytes 4-bit layers count codes and quantization statistics.
    The KV cache is not counted (small at short context).
    """
    from .linear import OrthoLinear

    emb = model.model.embed_tokens.weight
    total = emb.shape[1] * emb.element_size()  # one row per token
    seen = set()
    head = model.lm_head
    if not isinstance(head, OrthoLinear):  # a tied head reads the whole table every token
        for p in head.parameters(recurse=False):
            seen.add(id(p))
            total += p.numel() * p.element_size() + (_quant_state_bytes(p.quant_state)
                                                     if getattr(p, "quant_state", None) is not None else 0)
    seen.add(id(emb))
    from .baselines import Int4PackLinear

    for m in model.modules():
        if isinstance(m, Int4PackLinear):
            total += m.packed.nbytes + m.scales_and_zeros.nbytes + (m.bias.nbytes if m.bias is not None else 0)
            seen.update(id(t) for t in (m.packed, m.scales_and_zeros, m.bias) if t is not None)
            continue
        if isinstance(m, OrthoLinear):
            total += sum(t.numel() * t.element_size() for t in (m.qweight, m.scales, m.zeros) if t is not None)
            on = (m.alpha.item() != 0) if ortho_on is None else ortho_on
            if on and m.has_ortho and m.nnz:
                total += sum(t.numel() * t.element_size() for t in (m.ortho_crow, m.ortho_col, m.ortho_values))
            if m.bias is not None:
                total += m.bias.numel() * m.bias.element_size()
            continue
        for name, p in list(m.named_parameters(recurse=False)) + list(m.named_buffers(recurse=False)):
            if id(p) in seen or p is None or p.device.type == "meta":
                continue
            seen.add(id(p))
            total += p.numel() * p.element_size()
            qs = getattr(p, "quant_state", None)  # bitsandbytes Params4bit
            if qs is not None:
                total += _quant_state_bytes(qs)
    return total


def _quant_state_bytes(qs) -> int:
    n = 0
    for attr in ("absmax", "code"):
        t = getattr(qs, attr, None)
        if isinstance(t, torch.Tensor):
            n += t.numel() * t.element_size()
    nested = getattr(qs, "state2", None)
    if nested is not None:
        n += _quant_state_bytes(nested)
    return n
