"""Greedy decoding with a static KV cache and one CUDA graph per token, for Llama-family models.

Per-token Python overhead (about 1000 small launches for a 32-layer model) would otherwise dominate a
decode step whose weights stream in ~2 ms. The decoder reads the model's parts (HF Llama module tree:
`model.model.layers[i].self_attn.q_proj`, ...), so it runs a converted model (OrthoLinear), a plain one
(nn.Linear) or a shape-only one (`libortho.shape_only`) alike. The embedding table may stay on the CPU:
then one row per token is copied in before each graph replay.

alpha: the graph bakes in which layers read their ortho stream (alpha != 0); the decoder reads every
layer's alpha once per `generate` call and captures again when that pattern changed. Nonzero values are
read on the device at every replay, so changing alpha between nonzero values needs no new capture.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def _ortho_modules(model):
    from .modules import ortho_modules

    return list(ortho_modules(model).values())


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x, cos, sin_signed):
    """x * cos + rotate_half(x) * sin, as 3 kernels: rotate_half(x) * sin == roll(x) * [-sin1, sin2]."""
    return torch.addcmul(x * cos, x.roll(x.shape[-1] // 2, -1), sin_signed)


class StaticDecoder:
    """Greedy batch-1 generation over a static KV cache of `max_seq` positions.

    Example:
        >>> dec = StaticDecoder(model, max_seq=1024)          # doctest: +SKIP
        >>> ids = dec.generate(prompt_ids, max_new_tokens=128)
    """

    def __init__(self, model, max_seq: int = 1024, dtype: torch.dtype = torch.bfloat16, device="cuda",
                 use_graph: bool = True):
        from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

        cfg = model.config
        self.model, self.cfg, self.max_seq, self.dtype, self.device = model, cfg, max_seq, dtype, torch.device(device)
        self.use_graph = use_graph and self.device.type == "cuda"
        inner = model.model
        self.layers = list(inner.layers)
        self.embed = inner.embed_tokens.weight
        self.embed_on_device = self.embed.device == self.device or (self.embed.is_cuda and self.device.type == "cuda")
        self.H = cfg.hidden_size
        self.nh, self.nkv = cfg.num_attention_heads, cfg.num_key_value_heads
        self.hd = getattr(cfg, "head_dim", None) or self.H // self.nh
        self.eps = cfg.rms_norm_eps
        shape = (1, self.nkv, max_seq, self.hd)
        self.k_cache = [torch.zeros(shape, dtype=dtype, device=self.device) for _ in self.layers]
        self.v_cache = [torch.zeros(shape, dtype=dtype, device=self.device) for _ in self.layers]
        rope = LlamaRotaryEmbedding(config=cfg, device="cpu")  # handles Llama 3's rope scaling
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
        self.tok = torch.zeros(1, 1, dtype=torch.long, device=self.device)
        self.emb_in = torch.zeros(1, 1, self.H, dtype=dtype, device=self.device)
        self.graph, self.graph_sig = None, None
        self.ortho = _ortho_modules(model)

    # -- the model, written out once ---------------------------------------------------------------
    def _attn(self, i, layer, h, pos, rope, prefill: bool):
        a = layer.self_attn
        T = h.shape[1]
        cos, sin_s = rope  # (1, 1, T, hd)
        q = a.q_proj(h).view(1, T, self.nh, self.hd).transpose(1, 2)  # (1, nh, T, hd)
        k = a.k_proj(h).view(1, T, self.nkv, self.hd).transpose(1, 2)  # (1, nkv, T, hd)
        v = a.v_proj(h).view(1, T, self.nkv, self.hd).transpose(1, 2)
        q, k = apply_rope(q, cos, sin_s), apply_rope(k, cos, sin_s)
        self.k_cache[i].index_copy_(2, pos, k)
        self.v_cache[i].index_copy_(2, pos, v)
        if prefill:  # the prompt starts at position 0
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
            o = o.transpose(1, 2).reshape(1, T, self.nh * self.hd)
        else:  # one query: grouped heads against the whole static cache, future positions masked
            g = self.nh // self.nkv
            qg = q.reshape(1, self.nkv, g, self.hd)  # query heads j*g .. j*g+g-1 share kv head j
            s = torch.matmul(qg, self.k_cache[i].transpose(-1, -2)).float()  # (1, nkv, g, S)
            p = torch.softmax(torch.add(self.mask_bias, s, alpha=self.hd ** -0.5), -1).to(q.dtype)
            o = torch.matmul(p, self.v_cache[i]).view(1, 1, self.nh * self.hd)  # (1, 1, nh*hd)
        return a.o_proj(o)

    def _forward(self, x, pos, prefill: bool):  # x (1, T, H) -> logits of the last position (1, V)
        rope = (self.cos[pos][None, None], self.sin_signed[pos][None, None])  # once per step, not per layer
        for i, layer in enumerate(self.layers):
            h = F.rms_norm(x, (self.H,), layer.input_layernorm.weight, self.eps)
            x = x + self._attn(i, layer, h, pos, rope, prefill)
            h = F.rms_norm(x, (self.H,), layer.post_attention_layernorm.weight, self.eps)
            m = layer.mlp
            x = x + m.down_proj(F.silu(m.gate_proj(h)) * m.up_proj(h))
        x = F.rms_norm(x[:, -1:], (self.H,), self.model.model.norm.weight, self.eps)
        return self.model.lm_head(x)[:, 0]  # (1, V)

    def _embed(self, ids):  # ids (1, T) on the embedding's device
        return self.embed[ids].to(self.device, self.dtype, non_blocking=True)

    def _step(self):  # one decode token, all on the device: the part that is captured
        x = self.embed[self.tok] if self.embed_on_device else self.emb_in  # (1, 1, H)
        torch.where(self.arange <= self.pos, self.zero, self.neg_inf, out=self.mask_bias)
        logits = self._forward(x, self.pos, prefill=False)
        self.tok.copy_(logits.argmax(-1, keepdim=True))
        self.pos.add_(1)

    # -- alpha pattern -------------------------------------------------------------------------------
    def _signature(self):
        if not self.ortho:
            return ()
        on = torch.stack([m.alpha.float() for m in self.ortho]).ne(0).tolist()  # one sync for all layers
        return tuple(bool(o and m.has_ortho and m.nnz) for o, m in zip(on, self.ortho))

    def _set_hints(self, sig):
        for m, s in zip(self.ortho, sig):
            m.pinned_ortho = s  # what each layer's ortho_on says while the graph replays: no per-call sync

    def _clear_hints(self):
        for m in self.ortho:
            m.pinned_ortho = None

    def _capture(self):
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):  # warm-up: Triton compiles and autotunes here, outside the capture
            for _ in range(3):
                if not self.embed_on_device:
                    self.emb_in.copy_(self._embed(self.tok.cpu() if not self.embed.is_cuda else self.tok))
                self._step()
        torch.cuda.current_stream().wait_stream(s)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self._step()

    # -- public ----------------------------------------------------------------------------------------
    @torch.no_grad()
    def prefill(self, ids: torch.Tensor) -> torch.Tensor:
        """Run the prompt (1, T) from position 0; returns the first generated token (1, 1) on the device."""
        T = ids.shape[1]
        if T >= self.max_seq:
            raise ValueError(f"prompt of {T} tokens does not fit max_seq={self.max_seq}")
        x = self._embed(ids.to(self.embed.device))
        pos = torch.arange(T, device=self.device)
        logits = self._forward(x, pos, prefill=True)
        self.tok.copy_(logits.argmax(-1, keepdim=True))
        self.pos.fill_(T)
        return self.tok

    @torch.no_grad()
    def decode(self, n: int) -> torch.Tensor:
        """n greedy steps after `prefill`; returns the n tokens (n,) (the last one is not fed back)."""
        if int(self.pos.item()) + n > self.max_seq:
            raise ValueError(f"{n} more tokens exceed max_seq={self.max_seq}")
        out = torch.empty(n, dtype=torch.long, device=self.device)
        for t in range(n):
            out[t] = self.tok[0, 0]
            if not self.embed_on_device:  # one row from host memory; needs the token id on the host
                self.emb_in.copy_(self._embed(self.tok.cpu()), non_blocking=True)
            if self.graph is not None:
                self.graph.replay()
            else:
                self._step()
        return out

    def prepare(self):
        """Read the alpha pattern; capture the decode graph again if it changed. Call before prefill."""
        sig = self._signature()
        self._set_hints(sig)
        if self.use_graph and (self.graph is None or sig != self.graph_sig):
            pos0 = int(self.pos.item())
            self._capture()
            self.graph_sig = sig
            self.pos.fill_(pos0)

    @torch.no_grad()
    def generate(self, ids: torch.Tensor, max_new_tokens: int = 128) -> torch.Tensor:
        """Greedy continuation of `ids` (1, T): returns (max_new_tokens,) token ids."""
        try:
            self.prepare()
            self.prefill(ids)
            return self.decode(max_new_tokens)
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
    for m in model.modules():
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
