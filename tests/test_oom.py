import pytest
import torch

from libortho.oom import map_batches


def flaky(limit):
    """fn that raises CUDA OOM whenever a batch is larger than `limit` (an injected fault on CPU)."""
    calls = []

    def fn(chunk):
        calls.append(len(chunk))
        if len(chunk) > limit:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return [x * 2 for x in chunk]
    return fn, calls


def test_halves_and_retries_and_records():
    fn, calls = flaky(3)
    events = []
    assert map_batches(fn, list(range(10)), 16, events) == [x * 2 for x in range(10)]
    assert [e["batch_size_to"] for e in events] == [8, 4, 2]
    assert calls[:4] == [10, 8, 4, 2]


def test_plain_runtime_oom_message_also_counts():
    def fn(chunk):
        if len(chunk) > 1:
            raise RuntimeError("DefaultCPUAllocator: out of memory")
        return list(chunk)
    assert map_batches(fn, [1, 2, 3], 4) == [1, 2, 3]


def test_oom_at_batch_one_and_other_errors_raise():
    fn, _ = flaky(0)
    with pytest.raises(torch.cuda.OutOfMemoryError):
        map_batches(fn, [1, 2], 2)

    def bad(chunk):
        raise RuntimeError("shape mismatch")
    with pytest.raises(RuntimeError, match="shape mismatch"):
        map_batches(bad, [1, 2], 2)
