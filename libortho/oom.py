"""Evaluation batches that survive a CUDA out-of-memory error: halve the batch and retry."""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch


def is_oom(err: BaseException) -> bool:
    return isinstance(err, torch.cuda.OutOfMemoryError) or (
        isinstance(err, RuntimeError) and "out of memory" in str(err).lower())


def map_batches(fn: Callable[[Sequence], list], items: Sequence, batch_size: int,
                events: list | None = None) -> list:
    """`fn` over `items` in batches, concatenating its list results.

    On out-of-memory the batch size is halved and the same batch retried (down to 1; an OOM at batch
    size 1 is raised). Each retry is appended to `events` so the results JSON can say it happened.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    out, i = [], 0
    while i < len(items):
        chunk = items[i:i + batch_size]
        try:
            out.extend(fn(chunk))
        except (torch.cuda.OutOfMemoryError, RuntimeError) as e:
            if not is_oom(e) or batch_size == 1:
                raise
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            if events is not None:
                events.append({"event": "oom_retry", "at_item": i, "batch_size_from": batch_size,
                               "batch_size_to": batch_size // 2})
            batch_size //= 2
            continue
        i += len(chunk)
    return out
