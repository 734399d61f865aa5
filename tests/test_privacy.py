import copy
import json
import math
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import stats

from libortho import privacy
from libortho.oom import map_batches
from libortho.privacy import (Canary, candidate_secrets, exposure_from_logprobs, extraction_rate,
                              extrapolated_exposure, greedy_secret, make_canaries, measure, prepare_candidates,
                              random_secret, secret_logprobs, skewnorm_logcdf, token_logprobs,
                              tokenize_candidates)


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


# ---------------------------------------------------------------------------------------------
# candidates: formats and the tokenized, grouped form


def test_candidates_are_the_same_as_before_the_pattern_rewrite(tokenizer):
    """Digit-by-digit pattern filling draws the same candidates as the former groups-of-digits generator."""
    def former(canary, n, seed):
        groups = tuple(len(g) for g in canary.secret.split("-"))
        rng, out = random.Random(f"candidates:{seed}:{canary.user}"), [canary.secret]
        while len(out) < n:
            s = random_secret(rng, groups)
            if s not in out:
                out.append(s)
        return out

    for c in make_canaries(tokenizer, 2, seed=5) + make_canaries(tokenizer, 2, seed=6, groups=(3, 3)):
        assert candidate_secrets(c, 50, seed=1) == former(c, 50, 1)


def test_candidates_keep_any_digit_format():
    c = Canary("Ada Lovelace", "(555) 013-4567", "pii", (1,), (2,))
    r = candidate_secrets(c, 100, seed=0)
    assert all(privacy.secret_pattern(s) == "(###) ###-####" for s in r) and len(set(r)) == 100
    with pytest.raises(ValueError, match="exceed"):
        candidate_secrets(Canary("u", "12", "plain", (1,), (2,)), 101)


def test_tokenized_candidates_match_one_call_each(tokenizer):
    c = make_canaries(tokenizer, 1, seed=2)[0]
    cand = tokenize_candidates(tokenizer, c, 300, seed=0)
    secrets = candidate_secrets(c, 300, seed=0)
    assert cand.n == 300 and cand.groups[0][0][0] == 0
    assert sorted(i for idx, _ in cand.groups for i in idx.tolist()) == list(range(300))
    for idx, ids in cand.groups:
        for i, row in zip(idx.tolist(), ids.tolist()):
            assert row == tokenizer(secrets[i], add_special_tokens=False).input_ids


# ---------------------------------------------------------------------------------------------
# scoring: the gather-logsumexp path and the reused expanded cache against the former code


@torch.no_grad()
def former_secret_logprobs(model, prefix_ids, secrets_ids, chunk=256):
    """The scoring code before issue 15 (log_softmax over the vocabulary, a fresh cache per chunk)."""
    prefix = torch.as_tensor(prefix_ids, dtype=torch.long, device=secrets_ids.device).unsqueeze(0)
    out = model(input_ids=prefix, use_cache=True)
    first = F.log_softmax(out.logits[0, -1].float(), -1)
    cache = out.past_key_values
    logp = first[secrets_ids[:, 0]].double()
    greedy0 = bool(first.argmax() == secrets_ids[0, 0])
    flags = {}

    def score(rows):
        ids = secrets_ids[rows[0]:rows[-1] + 1]
        c = copy.deepcopy(cache)
        c.batch_repeat_interleave(ids.shape[0])
        lg = model(input_ids=ids[:, :-1], past_key_values=c, use_cache=True).logits.float()
        lp = F.log_softmax(lg, -1)
        if rows[0] == 0:
            flags["greedy0"] = bool((lg[0].argmax(-1) == ids[0, 1:]).all())
        return lp.gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1).double().sum(-1).tolist()

    rest = map_batches(score, list(range(secrets_ids.shape[0])), chunk)
    logp = logp + torch.tensor(rest, dtype=torch.float64, device=logp.device)
    return logp.cpu(), greedy0 and flags["greedy0"]


def test_token_logprobs_equal_log_softmax_in_any_slicing(monkeypatch):
    g = torch.Generator().manual_seed(0)
    lg, tgt = 4 * torch.randn(5, 3, 1000, generator=g), torch.randint(0, 1000, (5, 3), generator=g)
    ref = torch.log_softmax(lg.double(), -1).gather(-1, tgt.unsqueeze(-1)).squeeze(-1)
    whole = token_logprobs(lg, tgt)
    monkeypatch.setattr(privacy, "_LOGITS_ELEMS", 2500)  # slices of 1 row
    torch.testing.assert_close(token_logprobs(lg, tgt), whole, rtol=0, atol=0)
    torch.testing.assert_close(whole.double(), ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(token_logprobs(lg.bfloat16(), tgt).double(),
                               torch.log_softmax(lg.bfloat16().double(), -1).gather(-1, tgt.unsqueeze(-1)).squeeze(-1),
                               rtol=1e-6, atol=1e-6)


def test_scoring_matches_the_former_code(tokenizer, tiny, monkeypatch):
    """Same log-probabilities (relative 1e-6: float32 rounding of ~-140-nat sums) and greedy flag in any
    chunking; the expanded cache is built once per chunk size (24 rows in chunks of 8: one copy, where the
    former code made three)."""
    from transformers import DynamicCache

    c = make_canaries(tokenizer, 1, seed=3)[0]
    ids = tokenize_candidates(tokenizer, c, 24, seed=0).groups[0][1]  # (24, S)
    old, g_old = former_secret_logprobs(tiny, c.prefix_ids, ids, chunk=24)
    assert not torch.equal(old, old.roll(1))  # the candidates do differ
    repeat = DynamicCache.batch_repeat_interleave
    for chunk, expect in ((8, [8]), (7, [7, 3]), (64, [24])):  # 7: three full chunks, a remainder of 3
        copies = []
        monkeypatch.setattr(DynamicCache, "batch_repeat_interleave",
                            lambda self, n: copies.append(n) or repeat(self, n))
        new, g_new = secret_logprobs(tiny, c.prefix_ids, ids, chunk=chunk)
        monkeypatch.undo()
        torch.testing.assert_close(new, old, rtol=1e-6, atol=0)
        assert g_new == g_old and copies == expect


def test_prepared_candidates_give_the_same_report(tokenizer, tiny):
    cs = make_canaries(tokenizer, 2, seed=0, groups=(3, 3))
    a = measure(tiny, tokenizer, cs, 30, seed=1)
    b = measure(tiny, tokenizer, cs, 30, seed=1, candidates=prepare_candidates(tokenizer, cs, 30, seed=1),
                extrapolate=False)
    assert b.exposures_ext == [] and len(a.exposures_ext) == 2
    assert a.exposures == b.exposures and all(np.array_equal(x, y) for x, y in zip(a.logprobs, b.logprobs))
    with pytest.raises(ValueError, match="one to one"):
        measure(tiny, tokenizer, cs, 30, candidates=prepare_candidates(tokenizer, cs[:1], 30))


# ---------------------------------------------------------------------------------------------
# extrapolated exposure


def with_true(x_true: float, others: np.ndarray) -> np.ndarray:
    """Log-probabilities with the true secret first, from log-perplexities."""
    return -np.concatenate([[x_true], others])


def test_extrapolated_exposure_of_a_secret_5_sd_into_the_tail():
    """Log-perplexities N(50, 3): a secret at 35 has exposure -log2 Phi(-5) = 21.7 bits; rank exposure stops
    at log2(10001) = 13.3."""
    for seed in range(3):
        lp = with_true(50 - 5 * 3, stats.norm.rvs(50, 3, size=10_000, random_state=seed))
        ext, rank = extrapolated_exposure(lp), exposure_from_logprobs(torch.tensor(lp))
        assert ext == pytest.approx(-math.log2(stats.norm.cdf(-5)), abs=1.5)
        assert rank == pytest.approx(math.log2(10_001)) and ext > rank + 7


def test_extrapolated_exposure_on_a_skewed_distribution():
    """Skew-normal log-perplexities (a = 4): a secret at the 1e-6 quantile has ~19.9 bits, one at the 1%
    quantile ~6.6 bits, where the rank exposure (in range) agrees."""
    x = stats.skewnorm.rvs(4, 50, 3, size=10_000, random_state=0)
    deep = extrapolated_exposure(with_true(stats.skewnorm.ppf(1e-6, 4, 50, 3), x))
    assert deep == pytest.approx(-math.log2(1e-6), abs=1.5)
    lp = with_true(np.quantile(x, 0.01), x)
    assert extrapolated_exposure(lp) == pytest.approx(-math.log2(0.01), abs=0.3)
    assert exposure_from_logprobs(torch.tensor(lp)) == pytest.approx(-math.log2(0.01), abs=0.05)
    # a secret no likelier than the others has ~no exposure, never below 0
    assert extrapolated_exposure(with_true(60.0, x)) == pytest.approx(0.0, abs=0.01)


@pytest.mark.parametrize("seed", range(4))
def test_skewnorm_fit_reaches_scipys_likelihood(seed):
    """The BFGS fit is at least as likely as scipy.stats.skewnorm.fit on skewed, symmetric and discrete samples.
    The control: the method-of-moments start it begins from is measurably less likely (a fit that stopped
    there, or a broken gradient, would fail)."""
    from libortho.privacy import _skewnorm_moments, skewnorm_fit

    rng = np.random.default_rng(seed)
    for x in (stats.skewnorm.rvs(rng.uniform(-4, 8), 40, 3, size=2000, random_state=rng),
              rng.normal(30, 3, 1000) + rng.gamma(2, 1, 1000), rng.integers(20, 30, 1000).astype(float)):
        ours = stats.skewnorm.logpdf(x, *skewnorm_fit(x)).sum()
        assert ours >= stats.skewnorm.logpdf(x, *stats.skewnorm.fit(x)).sum() - 1e-6
    a, loc, log_scale = _skewnorm_moments(x)
    assert stats.skewnorm.logpdf(x, a, loc, np.exp(log_scale)).sum() < ours - 1e-3


def test_skewnorm_fit_of_a_sample_past_the_skew_normal_is_its_half_normal_limit():
    """An exponential sample is more skewed than any skew-normal: the likelihood has no maximum (scipy stopped at
    a ~ 1e9 and BFGS ran to 1e14, whose tail then overflowed in the secrets study). The fit is the half-normal
    limit at shape +-SKEW_MAX, as likely as scipy's to 0.05 nat, and the exposure beyond it stays finite."""
    from libortho.experiments.kill_switch import extrapolated
    from libortho.privacy import SKEW_MAX, skewnorm_fit

    rng = np.random.default_rng(0)
    for sign in (1, -1):
        x = 5 + sign * rng.exponential(2, 1000)
        a, loc, scale = skewnorm_fit(x)
        assert a == sign * SKEW_MAX and scale > 0
        assert stats.skewnorm.logpdf(x, a, loc, scale).sum() > stats.skewnorm.logpdf(x, *stats.skewnorm.fit(x)).sum() - 0.05
    x = 5 + rng.exponential(2, 1000)
    assert math.isfinite(extrapolated(-np.concatenate([[4.0], x])))  # past the sample's edge: huge, finite
    with pytest.raises(ValueError, match="differ"):
        skewnorm_fit(np.full(10, 3.0))


def test_extrapolated_exposure_degenerate_and_deep_tail():
    assert math.isnan(extrapolated_exposure(np.array([-1.0, -2.0, -2.0, -2.0])))
    # past scipy's underflow, the tail integral: log Phi(-40) and the a = 3 asymptote
    assert skewnorm_logcdf(-40.0, 0.0, 0.0, 1.0) == pytest.approx(float(stats.norm.logcdf(-40.0)), rel=1e-9)
    assert skewnorm_logcdf(-10.0, 3.0, 0.0, 1.0) == pytest.approx(float(stats.skewnorm.logcdf(-10.0, 3.0)))
    assert skewnorm_logcdf(-20.0, 3.0, 0.0, 1.0) == pytest.approx(-2000 - math.log(math.pi * 3 * 10 * 400), rel=1e-4)
    x = stats.norm.rvs(50, 3, size=1000, random_state=0)
    assert math.isfinite(extrapolated_exposure(with_true(-500.0, x)))  # 183 sd: thousands of bits, finite


def test_measure_keeps_every_logprob_and_fits(tokenizer, tiny):
    cs = make_canaries(tokenizer, 2, seed=0, groups=(3, 3))
    rep = measure(tiny, tokenizer, cs, 40, seed=0)
    assert [lp.shape for lp in rep.logprobs] == [(40,), (40,)] and len(rep.fits) == 2
    assert all(math.isfinite(e) and e >= 0 for e in rep.exposures_ext)
    rows = rep.per_canary()
    assert rows[0]["logp_true"] == rep.logprobs[0][0] and rows[0]["exposure"] == rep.exposures[0]
    assert rows[0]["exposure_ext"] == extrapolated_exposure(rep.logprobs[0])
    assert "logprobs" not in rows[0] and len(rep.per_canary(logprobs=True)[1]["logprobs"]) == 40
    json.dumps({"summary": rep.to_dict(), "canaries": rep.per_canary(logprobs=True)}, allow_nan=False)


@pytest.mark.gpu
def test_gpu_scoring_10k_candidates_faster_and_smaller(smollm2_state):
    """|R| = 10,000 on SmolLM2 (CUDA): the new scoring agrees with the former code, is no slower and peaks lower."""
    import time

    model = copy.deepcopy(smollm2_state.model).cuda().eval()
    tok = smollm2_state.tokenizer
    c = make_canaries(tok, 1, seed=0, fmt="chat")[0]
    ids = tokenize_candidates(tok, c, 10_000, seed=0).groups[0][1].cuda()  # (R, S)
    runs = {}
    for name, fn in (("former", former_secret_logprobs), ("new", secret_logprobs)) * 2:  # second round timed
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        lp, greedy = fn(model, c.prefix_ids, ids, chunk=256)
        torch.cuda.synchronize()
        runs[name] = (lp.cpu(), greedy, time.perf_counter() - t0, torch.cuda.max_memory_allocated() / 2**20)
    (old, g_old, t_old, m_old), (new, g_new, t_new, m_new) = runs["former"], runs["new"]
    print(f"\n|R|=10000 chunk 256: former {t_old:.2f} s {m_old:.0f} MiB peak, new {t_new:.2f} s {m_new:.0f} MiB peak, "
          f"max |diff| {(old - new).abs().max():.2e}")
    torch.testing.assert_close(new, old, rtol=1e-5, atol=0)
    assert g_new == g_old and t_new <= 1.05 * t_old and m_new < m_old
