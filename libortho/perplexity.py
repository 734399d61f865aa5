"""The one pinned perplexity protocol, shared by every experiment.

Token-level perplexity over the concatenated evaluation text, in windows of `max_length` tokens moved
by `stride` (the transformers perplexity guide): each window scores only the tokens the previous window
did not, earlier tokens serve as context (the guide labels them -100). No BOS is added (the text is
tokenized as one stream with `add_special_tokens=False`), so the very first token is never scored. Every
arm sees the same windows.

Beside perplexity, `evaluate` measures how far an arm's next-token distribution is from a reference
model's (the full-precision one) on the same windows and tokens: the mean over scored tokens of
KL(p_ref || p_arm), in nats, over the full vocabulary. The reference's log-probs are computed once
(`reference_logprobs`) and reused for every arm.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm


KL_ROWS = 64  # tokens per KL block (the reference's log-probs wait in host memory)


@dataclass(frozen=True)
class Protocol:
    max_length: int = 512
    stride: int = 256
    max_tokens: int | None = None  # evaluate only the first N tokens (short runs in `make test`)
    bos: str = "none: text tokenized as one stream, add_special_tokens=False; first token unscored"
    masking: str = ("context tokens of each window (scored by an earlier window) are labelled -100: every token "
                    "from position 1 on is scored exactly once (stride == max_length: windows overlap by one "
                    "token); PPL = exp(total NLL / scored tokens)")
    kl: str = ("mean over the same scored tokens of KL(p_fp || p_arm), nats, full vocabulary, "
               "log-softmax in float32")

    def to_dict(self) -> dict:
        return asdict(self)


def encode(tokenizer, text: str, protocol: Protocol) -> torch.Tensor:
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids[0]
    if protocol.max_tokens is not None:
        ids = ids[: protocol.max_tokens]
    if ids.numel() < 2:
        raise ValueError("evaluation text is too short: it must hold at least 2 tokens")
    return ids


def windows(n_tokens: int, protocol: Protocol) -> list[tuple[int, int, int]]:
    """(begin, end, first scored position) of each window; every position >= 1 is scored exactly once.

    A window after the first starts `max_length - stride` tokens before its first scored position (at
    least one, so that with `stride == max_length` the token at a window's start still has a predecessor
    to be predicted from: such windows overlap by one token).
    """
    if protocol.stride <= 0 or protocol.stride > protocol.max_length:
        raise ValueError(f"stride must be in [1, max_length], got {protocol.stride}")
    if protocol.max_length < 2:
        raise ValueError(f"max_length must be >= 2 (a token and its context), got {protocol.max_length}")
    context = max(protocol.max_length - protocol.stride, 1)
    out, first = [], 1
    while first < n_tokens:
        begin = max(0, first - context) if out else 0
        end = min(begin + protocol.max_length, n_tokens)
        out.append((begin, end, first))
        first = end
    return out


def _takes_logits_to_keep(model) -> bool:
    """Does `model.forward` accept `logits_to_keep` (by name, or through **kwargs)? Decided from its signature, so
    a TypeError raised inside a model is never mistaken for a missing argument."""
    import inspect

    try:
        params = inspect.signature(model.forward).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(p.name == "logits_to_keep" or p.kind is p.VAR_KEYWORD for p in params)


@torch.no_grad()
def token_logprobs(model, ids: torch.Tensor, protocol: Protocol, progress: bool = False):
    """Yields (window, log-probs (T_scored, V)) for each window: the raw material of PPL and KL."""
    from .modules import input_device

    device = input_device(model)
    keeps = _takes_logits_to_keep(model)
    for begin, end, first in tqdm(windows(ids.numel(), protocol), desc="evaluate", disable=not progress,
                                  leave=False):
        # logits at position p predict token p+1: scored targets are positions first..end-1, so only the last
        # end - first + 1 positions need logits (the head of a later window runs on the scored half alone)
        x = ids[begin:end].unsqueeze(0).to(device)
        keep = end - first + 1
        # (keep, V) in the model's dtype; a model without `logits_to_keep` gives every position
        logits = (model(input_ids=x, logits_to_keep=keep) if keeps else model(input_ids=x)).logits[0]
        logits = logits[-keep:-1]  # (T_scored, V)
        # float32 log-probs written block by block: one float32 copy of a 128K-vocabulary window, not two
        logp = torch.empty(logits.shape, dtype=torch.float32, device=logits.device)
        for s in range(0, logits.shape[0], KL_ROWS):
            logp[s:s + KL_ROWS] = F.log_softmax(logits[s:s + KL_ROWS], dim=-1, dtype=torch.float32)
        del logits
        yield (begin, end, first), logp


def perplexity(model, ids: torch.Tensor, protocol: Protocol = Protocol(), progress: bool = False) -> float:
    """exp(mean NLL) of `ids` under `model`, by the pinned protocol."""
    nll, count = 0.0, 0
    for (_, end, first), logp in token_logprobs(model, ids, protocol, progress):
        targets = ids[first:end].to(logp.device)
        nll -= logp.gather(1, targets.unsqueeze(1)).sum().item()
        count += targets.numel()
    return math.exp(nll / count)


@torch.no_grad()
def reference_logprobs(model, ids: torch.Tensor, protocol: Protocol = Protocol(), progress: bool = False
                       ) -> list[torch.Tensor]:
    """The reference model's log-probs of every window, kept on the CPU for `evaluate(reference=...)`.

    Memory: 4 bytes x vocabulary x scored tokens (SmolLM2, 4096 tokens: 0.8 GB).
    """
    return [logp.cpu() for _, logp in token_logprobs(model, ids, protocol, progress)]


@torch.no_grad()
def evaluate(model, ids: torch.Tensor, protocol: Protocol = Protocol(),
             reference: Sequence[torch.Tensor] | torch.nn.Module | None = None, progress: bool = False) -> dict:
    """Perplexity of `ids` under `model`, and the mean per-token KL from `reference`, on the same windows.

    Args:
        model: the arm to score.
        ids: token ids from `encode`.
        reference: `reference_logprobs(...)` of the full-precision model (computed once, reused), or that
            model itself (run window by window beside `model`), or None for perplexity alone.
    Returns:
        {"ppl", "kl_vs_fp" (None without a reference), "tokens" (scored), "nll" (total, nats)}.
    Example:
        >>> ref = reference_logprobs(fp_model, ids, p)                      # doctest: +SKIP
        >>> evaluate(int4_model, ids, p, reference=ref)["kl_vs_fp"]         # doctest: +SKIP
    """
    wins = windows(ids.numel(), protocol)
    if isinstance(reference, Sequence) and len(reference) != len(wins):
        raise ValueError(f"reference holds {len(reference)} windows, the protocol makes {len(wins)}: "
                         "compute it with reference_logprobs on the same ids and protocol")
    ref_iter = (iter(reference) if isinstance(reference, Sequence) else
                (lp for _, lp in token_logprobs(reference, ids, protocol)) if reference is not None else None)
    nll, kl, count = 0.0, 0.0, 0
    for (_, end, first), logp in token_logprobs(model, ids, protocol, progress):
        targets = ids[first:end].to(logp.device)
        nll -= logp.gather(1, targets.unsqueeze(1)).sum().item()
        count += targets.numel()
        if ref_iter is not None:
            ref = next(ref_iter)
            if ref.shape != logp.shape:
                raise ValueError(f"reference window has shape {tuple(ref.shape)}, arm {tuple(logp.shape)}: "
                                 "the two models must share the tokenizer and protocol")
            for s in range(0, logp.shape[0], KL_ROWS):  # in row blocks: a 512 x 128K window is 256 MB per copy
                kl += F.kl_div(logp[s:s + KL_ROWS], ref[s:s + KL_ROWS].to(logp.device), reduction="sum",
                               log_target=True).item()  # sum_t KL(p_ref || p_arm)
    return {"ppl": math.exp(nll / count), "kl_vs_fp": None if ref_iter is None else kl / count,
            "tokens": count, "nll": nll}
