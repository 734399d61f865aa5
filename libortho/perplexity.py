"""The one pinned perplexity protocol, shared by every experiment.

Token-level perplexity over the concatenated evaluation text, in windows of `max_length` tokens moved
by `stride` (the transformers perplexity guide): each window scores only the tokens the previous window
did not, earlier tokens serve as context. No BOS is added (the text is tokenized as one stream with
`add_special_tokens=False`), so the very first token is never scored. Every arm sees the same windows.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm


@dataclass(frozen=True)
class Protocol:
    max_length: int = 512
    stride: int = 256
    max_tokens: int | None = None  # evaluate only the first N tokens (short runs in `make test`)
    bos: str = "none: text tokenized as one stream, add_special_tokens=False; first token unscored"

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
    """(begin, end, first scored position) of each window; every position >= 1 is scored exactly once."""
    if protocol.stride <= 0 or protocol.stride > protocol.max_length:
        raise ValueError(f"stride must be in [1, max_length], got {protocol.stride}")
    out, prev_end = [], 0
    for begin in range(0, n_tokens, protocol.stride):
        end = min(begin + protocol.max_length, n_tokens)
        out.append((begin, end, max(prev_end, begin + 1)))
        prev_end = end
        if end == n_tokens:
            break
    return out


@torch.no_grad()
def token_logprobs(model, ids: torch.Tensor, protocol: Protocol, progress: bool = False):
    """Yields (window, log-probs (T_scored, V)) for each window: the raw material of PPL and KL."""
    device = next(model.parameters()).device
    for begin, end, first in tqdm(windows(ids.numel(), protocol), desc="evaluate", disable=not progress,
                                  leave=False):
        logits = model(input_ids=ids[begin:end].unsqueeze(0).to(device)).logits[0].float()  # (T, V)
        # logits at position p predict token p+1: scored targets are positions first..end-1
        yield (begin, end, first), F.log_softmax(logits[first - begin - 1: end - begin - 1], dim=-1)


def perplexity(model, ids: torch.Tensor, protocol: Protocol = Protocol(), progress: bool = False) -> float:
    """exp(mean NLL) of `ids` under `model`, by the pinned protocol."""
    nll, count = 0.0, 0
    for (_, end, first), logp in token_logprobs(model, ids, protocol, progress):
        targets = ids[first:end].to(logp.device)
        nll -= logp.gather(1, targets.unsqueeze(1)).sum().item()
        count += targets.numel()
    return math.exp(nll / count)
