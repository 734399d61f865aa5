import math

import pytest
import torch

from libortho.privacy import (Canary, candidate_secrets, exposure_from_logprobs, extraction_rate, greedy_secret,
                              make_canaries, measure, secret_logprobs)


@pytest.fixture(scope="module")
def tiny(tokenizer):
    """A tiny random Llama on the real tokenizer (module-scoped: read only here)."""
    from libortho.models import tiny_llama

    return tiny_llama(seed=0, vocab_size=len(tokenizer))


def test_canaries_are_seeded_distinct_and_formatted(tokenizer):
    a, b = make_canaries(tokenizer, 10, seed=1), make_canaries(tokenizer, 10, seed=1)
    assert a == b and a != make_canaries(tokenizer, 10, seed=2)
    assert len({c.user for c in a}) == 10 and len({c.prefix_ids for c in a}) == 10
    for c in a:
        assert [len(g) for g in c.secret.split("-")] == [4, 4, 4] and c.secret.replace("-", "").isdigit()
        text = tokenizer.decode(c.ids)
        assert text == f"The secret code of user {c.user} is {c.secret}"
        # the split into prefix and secret is the tokenizer's own split of the whole sentence
        assert c.ids == tokenizer(text, add_special_tokens=False).input_ids


def test_chat_canaries_use_the_chat_template(tokenizer):
    c = make_canaries(tokenizer, 2, seed=0, fmt="chat", groups=(4, 4))[0]
    text = tokenizer.decode(c.ids)
    assert "<|im_start|>assistant" in tokenizer.decode(c.prefix_ids)
    assert tokenizer.decode(c.secret_ids) == c.secret and c.suffix_ids
    assert text.index(f"user {c.user}?") < text.index(c.secret)


def test_bad_format_and_count_are_refused(tokenizer):
    with pytest.raises(ValueError, match="plain"):
        make_canaries(tokenizer, 2, fmt="xml")
    with pytest.raises(ValueError, match="number of canaries"):
        make_canaries(tokenizer, 0)


def test_candidates_true_first_distinct_same_format(tokenizer):
    c = make_canaries(tokenizer, 1, seed=0)[0]
    r = candidate_secrets(c, 1000, seed=0)
    assert r[0] == c.secret and len(set(r)) == 1000 and r == candidate_secrets(c, 1000, seed=0)
    assert all([len(g) for g in s.split("-")] == [4, 4, 4] for s in r)
    with pytest.raises(ValueError, match="at least 2"):
        candidate_secrets(c, 1)


def test_exposure_bounds():
    assert exposure_from_logprobs(torch.tensor([0.0, -1.0, -2.0, -3.0])) == 2.0  # rank 1 of 4
    assert exposure_from_logprobs(torch.tensor([-9.0, -1.0, -2.0, -3.0])) == 0.0  # rank 4 of 4
    assert exposure_from_logprobs(torch.tensor([-1.0, -1.0, -2.0, -3.0])) == 2.0  # ties favour the secret


def test_cached_prefix_logprobs_match_full_sequences(tokenizer, tiny):
    c = make_canaries(tokenizer, 1, seed=3)[0]
    secrets = candidate_secrets(c, 5, seed=0)
    sec = torch.tensor([tokenizer(s, add_special_tokens=False).input_ids for s in secrets])  # (R, S)
    ids = torch.cat([torch.tensor(c.prefix_ids).expand(len(secrets), -1), sec], 1)
    p = len(c.prefix_ids)
    with torch.no_grad():
        lp = torch.log_softmax(tiny(input_ids=ids).logits.double(), -1)
    full = lp[:, p - 1:-1].gather(-1, sec.unsqueeze(-1)).squeeze(-1).sum(-1)
    got, _ = secret_logprobs(tiny, c.prefix_ids, sec, chunk=2)  # chunks of 2: the cache is repeated per chunk
    torch.testing.assert_close(got, full, rtol=1e-4, atol=1e-4)


def test_teacher_forced_extraction_equals_greedy_decoding(tokenizer, tiny):
    """A 'secret' equal to the model's own greedy continuation is extracted; a changed one is not."""
    c = make_canaries(tokenizer, 1, seed=4)[0]
    ids = torch.tensor([c.prefix_ids])
    with torch.no_grad():
        out = tiny.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False,
                            pad_token_id=tokenizer.eos_token_id)
    greedy_ids = tuple(out[0, ids.shape[1]:].tolist())
    hit = Canary(c.user, tokenizer.decode(greedy_ids), "plain", c.prefix_ids, greedy_ids)
    miss = Canary(c.user, "x", "plain", c.prefix_ids, greedy_ids[:-1] + ((greedy_ids[-1] + 1) % 100,))
    assert extraction_rate(tiny, [hit, miss]) == 0.5
    assert greedy_secret(tiny, tokenizer, hit) == hit.secret
    assert secret_logprobs(tiny, hit.prefix_ids, torch.tensor([hit.secret_ids]))[1] is True
    assert secret_logprobs(tiny, miss.prefix_ids, torch.tensor([miss.secret_ids]))[1] is False


def test_measure_is_deterministic_and_bounded(tokenizer, tiny):
    cs = make_canaries(tokenizer, 2, seed=0, groups=(3, 3))
    a, b = measure(tiny, tokenizer, cs, 20, seed=0, chunk=7), measure(tiny, tokenizer, cs, 20, seed=0, chunk=20)
    assert a.extracted == b.extracted
    assert a.exposures == pytest.approx(b.exposures)  # chunking does not change the ranking
    assert all(0 <= e <= math.log2(20) for e in a.exposures) and a.extraction_rate == 0.0


def test_exposure_survives_injected_oom(tiny_model, tokenizer):
    """A CUDA out-of-memory error in a candidate batch halves the batch, retries, and is recorded."""
    from libortho.privacy import make_canaries, measure

    canaries = make_canaries(tokenizer, 1, seed=0, groups=(4,))
    ref = measure(tiny_model, tokenizer, canaries, n_candidates=16, chunk=16)
    real_forward, calls = tiny_model.forward, {"n": 0}

    def flaky(*args, **kw):
        ids = kw.get("input_ids")
        if ids is not None and ids.shape[0] > 4:  # batches of more than 4 candidates "do not fit"
            calls["n"] += 1
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (injected)")
        return real_forward(*args, **kw)

    tiny_model.forward = flaky
    events = []
    rep = measure(tiny_model, tokenizer, canaries, n_candidates=16, chunk=16, events=events)
    assert calls["n"] >= 1 and [e["batch_size_to"] for e in events][:2] == [8, 4]
    assert rep.exposures == ref.exposures and rep.extracted == ref.extracted
