"""The pinned perplexity protocol: windows, the -100 masking of the transformers guide, KL vs a reference."""
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from libortho.models import tiny_llama
from libortho.perplexity import Protocol, encode, evaluate, perplexity, reference_logprobs, windows

P = Protocol(max_length=48, stride=20)


def ids_(n=150, vocab=256, seed=0):
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def tiny():
    """A tiny random Llama with a 256-token vocabulary (fast windows)."""
    return tiny_llama(vocab_size=256)


@settings(max_examples=60, deadline=None)
@given(n=st.integers(2, 400), max_length=st.integers(2, 64), data=st.data())
def test_every_position_after_the_first_is_scored_once(n, max_length, data):
    stride = data.draw(st.integers(1, max_length))
    scored = []
    for begin, end, first in windows(n, Protocol(max_length=max_length, stride=stride)):
        assert end - begin <= max_length and begin < first <= end
        scored += range(first, end)
    assert scored == list(range(1, n))


def test_matches_the_transformers_guide_labels(tiny):
    """Context tokens labelled -100, the model's own loss: the same total NLL as the protocol's."""
    ids = ids_()
    nll = count = 0
    for begin, end, first in windows(ids.numel(), P):
        labels = ids[begin:end].clone().unsqueeze(0)
        labels[:, : first - begin] = -100
        with torch.no_grad():
            loss = tiny(input_ids=ids[begin:end].unsqueeze(0), labels=labels).loss
        n = end - first
        nll, count = nll + loss.item() * n, count + n
    r = evaluate(tiny, ids, P)
    assert r["tokens"] == ids.numel() - 1 == count
    assert r["ppl"] == pytest.approx(math.exp(nll / count), rel=1e-5)
    assert perplexity(tiny, ids, P) == r["ppl"]


def test_kl_zero_against_itself_and_positive_against_another(tiny):
    ids = ids_()
    ref = reference_logprobs(tiny, ids, P)
    assert evaluate(tiny, ids, P, reference=ref)["kl_vs_fp"] == 0.0
    other = tiny_llama(seed=1, vocab_size=256)
    cached, live = evaluate(other, ids, P, reference=ref), evaluate(other, ids, P, reference=tiny)
    assert cached == live and cached["kl_vs_fp"] > 0.01
    # direct: KL(p_ref || p_arm) per scored token, averaged
    begin, end, first = windows(ids.numel(), P)[0]
    with torch.no_grad():
        lp = lambda m: torch.log_softmax(m(input_ids=ids[None, begin:end]).logits[0, first - begin - 1: end - begin - 1], -1)
        a, b = lp(tiny), lp(other)
    one = Protocol(max_length=P.max_length, stride=P.stride, max_tokens=end)
    direct = (a.exp() * (a - b)).sum(-1).mean().item()
    assert evaluate(other, ids[:end], one, reference=tiny)["kl_vs_fp"] == pytest.approx(direct, rel=1e-4)


def test_same_inputs_same_numbers(tiny):
    ids = ids_(seed=3)
    ref = reference_logprobs(tiny, ids, P)
    assert evaluate(tiny_llama(seed=2, vocab_size=256), ids, P, ref) == evaluate(
        tiny_llama(seed=2, vocab_size=256), ids, P, ref)


def test_reference_from_other_windows_is_refused(tiny):
    ids = ids_()
    ref = reference_logprobs(tiny, ids, P)
    with pytest.raises(ValueError, match="windows"):
        evaluate(tiny, ids, Protocol(max_length=48, stride=48), reference=ref)


def test_protocol_is_recorded_and_checked(tokenizer):
    d = Protocol().to_dict()
    assert {"max_length", "stride", "max_tokens", "bos", "masking", "kl"} <= set(d)
    with pytest.raises(ValueError, match="stride"):
        windows(10, Protocol(max_length=4, stride=5))
    with pytest.raises(ValueError, match="too short"):
        encode(tokenizer, "a", Protocol())
    ids = encode(tokenizer, "hello world " * 50, Protocol(max_tokens=7))
    assert ids.numel() == 7 and ids[0].item() != tokenizer.bos_token_id  # no BOS: the text is one stream


def test_token_logprobs_keeps_only_scored_logits_and_matches_full_logits(tiny_model):
    """Each window's log-probs, computed from the scored positions' logits alone (logits_to_keep), equal the
    log-softmax of the full logits at those positions; a model without logits_to_keep takes the fallback.
    The control: the log-probs of the positions one step off (the unshifted targets) differ."""
    import torch.nn.functional as F
    from libortho.perplexity import Protocol, token_logprobs

    ids = torch.randint(0, tiny_model.config.vocab_size, (40,), generator=torch.Generator().manual_seed(0))
    p = Protocol(max_length=16, stride=8, max_tokens=None)

    class NoKeep(torch.nn.Module):  # a forward that rejects logits_to_keep
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, input_ids):
            return self.m(input_ids=input_ids)

    got = list(token_logprobs(tiny_model, ids, p))
    assert len(got) > 2
    for ((begin, end, first), lp), (_, lp2) in zip(got, token_logprobs(NoKeep(tiny_model), ids, p)):
        full = F.log_softmax(tiny_model(input_ids=ids[begin:end][None]).logits[0].float(), -1)
        torch.testing.assert_close(lp, full[first - begin - 1:end - begin - 1])
        torch.testing.assert_close(lp2, lp)
        if end - first > 1:
            assert not torch.allclose(lp, full[first - begin:end - begin])
