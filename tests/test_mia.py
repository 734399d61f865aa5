import copy

import numpy as np
import pytest
import torch

from libortho.mia import (attack_metrics, auc_claim, delong_var, membership_inference, record_scores, roc_auc,
                          token_stats, tpr_at_fpr)
from libortho.models import tiny_llama

VOCAB = 512  # a small vocabulary keeps the overfitting test to a second


def brute_auc(x, y) -> float:
    return float(np.mean([[1.0 if a > b else 0.5 if a == b else 0.0 for b in y] for a in x]))


def test_auc_extremes_ties_and_brute_force():
    assert roc_auc([10.0, 11, 12], [0.0, 1, 2]) == 1.0 and roc_auc([0.0, 1, 2], [10.0, 11, 12]) == 0.0
    assert roc_auc([1.0, 1.0], [1.0, 1.0]) == 0.5
    rng = np.random.default_rng(0)
    x, y = rng.integers(0, 5, 30).astype(float), rng.integers(0, 5, 20).astype(float)  # many ties
    assert roc_auc(x, y) == pytest.approx(brute_auc(x, y))


def test_identical_distributions_auc_near_half_ci_covers_it():
    rng = np.random.default_rng(1)
    m = attack_metrics(rng.normal(size=200), rng.normal(size=200), seed=0)
    assert abs(m["auc"] - 0.5) < 0.07 and m["auc_ci95"][0] < 0.5 < m["auc_ci95"][1]
    assert m["tpr_ci95"][0] <= 0.01 + 1e-12  # chance level: TPR ~ FPR
    sep = attack_metrics(rng.normal(5, 1, 200), rng.normal(size=200), seed=0)  # control: separable
    assert sep["auc"] > 0.99 and sep["auc_ci95"][0] > 0.98 and sep["tpr_at_fpr"] > 0.8


def test_metrics_are_seeded():
    rng = np.random.default_rng(2)
    x, y = rng.normal(0.5, 1, 80), rng.normal(0, 1, 120)
    assert attack_metrics(x, y, seed=4) == attack_metrics(x, y, seed=4)
    assert attack_metrics(x, y, seed=5)["auc_ci95"] != attack_metrics(x, y, seed=4)["auc_ci95"]


def test_tpr_at_fpr_flags_at_most_the_allowed_non_members():
    non = np.arange(100.0)  # 1% of 100: one non-member may be flagged, so the threshold is 98
    assert tpr_at_fpr([99.0, 99.5, 50.0], non, 0.01) == pytest.approx(2 / 3)
    assert tpr_at_fpr([98.0, 99.5], non, 0.01) == 0.5  # a member tied with the threshold is not flagged
    assert tpr_at_fpr([99.5, 99.7], non, 0.0) == 1.0 and tpr_at_fpr([98.5, 99.0], non, 0.0) == 0.0
    with pytest.raises(ValueError, match="fpr"):
        tpr_at_fpr([1.0, 2.0], non, 1.0)
    with pytest.raises(ValueError, match="finite"):
        roc_auc([1.0, float("nan")], [0.0, 1.0])


def test_delong_matches_the_brute_force_placement_values():
    rng = np.random.default_rng(3)
    x, y = rng.normal(1, 1, (2, 15)), rng.normal(0, 1, (2, 12))
    v10 = np.array([[np.mean([1.0 if a > b else 0.0 for b in y[k]]) for a in x[k]] for k in range(2)])
    v01 = np.array([[np.mean([1.0 if a > b else 0.0 for a in x[k]]) for b in y[k]] for k in range(2)])
    np.testing.assert_allclose(delong_var(x, y), np.cov(v10) / 15 + np.cov(v01) / 12, rtol=1e-12)


def test_auc_claim_no_higher_and_greater():
    rng = np.random.default_rng(4)
    mem, non = rng.normal(0, 1, 150), rng.normal(0, 1, 150)
    same = auc_claim("mia_alpha0", "ortho_tuned@0.0", "public", mem, non, mem, non, 0.05)
    assert same.passed and same.value == 0.0 and same.ci95 == (0.0, 0.0)
    leak_m = mem + 1.0  # the candidate scores members higher: AUC ~0.76 vs ~0.5
    leak = auc_claim("mia_alpha0", "delta@0.0", "public", leak_m, non, mem, non, 0.05)
    assert not leak.passed and leak.ci95[1] > 0.05 and leak.p > 0.5
    assert auc_claim("mia_alpha1", "ortho_tuned@1.0", "public", leak_m, non, mem, non, 0.1,
                     direction="greater").passed
    noisy = auc_claim("x", "a", "b", mem + rng.normal(0, 0.3, 150), non, mem, non, 0.1, direction="greater")
    assert not noisy.passed  # same signal plus noise: no AUC gain
    with pytest.raises(ValueError, match="same records"):
        auc_claim("x", "a", "b", mem, non, mem[:10], non, 0.05)


# ---------------------------------------------------------------------------------------------
# on a model


@pytest.fixture(scope="module")
def records():
    """16 random token sequences of 16 tokens: the first 8 are members, the last 8 non-members."""
    g = torch.Generator().manual_seed(0)
    return torch.randint(3, VOCAB, (16, 16), generator=g)


def test_token_stats_match_a_float64_reference_and_ignore_padding(records):
    model = tiny_llama(seed=1, vocab_size=VOCAB)
    recs = [records[0, :16], records[1, :5], records[2, :9]]  # ragged: a batch pads the shorter ones
    together = token_stats(model, recs, batch_size=3)
    alone = [token_stats(model, [r], batch_size=1)[0] for r in recs]
    for a, b, r in zip(together, alone, recs):
        np.testing.assert_allclose(a.logp, b.logp, atol=1e-5)
        with torch.no_grad():
            lp = torch.log_softmax(model(input_ids=r[None]).logits[0, :-1].double(), -1)  # (T-1, V)
        mu = (lp.exp() * lp).sum(-1)
        sd = ((lp.exp() * (lp - mu[:, None]) ** 2).sum(-1)).sqrt()
        np.testing.assert_allclose(a.logp, lp.gather(-1, r[1:, None]).squeeze(-1).numpy(), atol=1e-5)
        np.testing.assert_allclose(a.mu, mu.numpy(), atol=1e-5)
        np.testing.assert_allclose(a.sigma, sd.numpy(), atol=1e-5)
    with pytest.raises(ValueError, match=">= 2 tokens"):
        token_stats(model, [records[0, :1]])


def test_record_scores_min_k_uses_the_lowest_tokens():
    from libortho.mia import TokenStats

    t = TokenStats(np.array([-1.0, -2.0, -9.0, -3.0, -4.0]), np.full(5, -2.0), np.full(5, 2.0))
    s = record_scores([t], [TokenStats(t.logp * 2, t.mu, t.sigma)], k=0.4)
    assert s["min_k"][0] == pytest.approx(-6.5)  # lowest 2 of 5: -9, -4
    assert s["min_k_pp"][0] == pytest.approx(((-9 + 2) / 2 + (-4 + 2) / 2) / 2)
    assert s["loss"][0] == pytest.approx(-3.8) and s["ref_ratio"][0] == pytest.approx(-0.5)
    assert s["ref_diff"][0] == pytest.approx(3.8)  # loss 3.8 vs the reference's 7.6
    with pytest.raises(ValueError, match="k must"):
        record_scores([t], k=0.0)


def overfit(model, seqs: torch.Tensor, steps: int = 6):
    """A copy of `model` after a few Adam steps on `seqs`."""
    model = copy.deepcopy(model).train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(steps):
        loss = model(input_ids=seqs, labels=seqs).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def test_membership_inference_detects_a_briefly_overfit_member_set(records):
    """6 optimizer steps on 8 member records: every attack ranks them above 8 unseen records. Controls: the
    same steps on the *non-members* reverse the ranking, and the public model is no better than itself."""
    public = tiny_llama(seed=2, vocab_size=VOCAB)
    members, nonmembers = records[:8], records[8:]
    ref = token_stats(public, list(members) + list(nonmembers))  # once, for every arm
    out = membership_inference(overfit(public, members), members, nonmembers, reference=ref, seed=0)
    for name in ("loss", "ref_ratio", "ref_diff", "min_k", "min_k_pp"):
        assert out["metrics"][name]["auc"] > 0.9, (name, out["metrics"][name])
    assert out["metrics"]["loss"]["auc_ci95"][0] > 0.5
    assert len(out["scores"]["loss"]["member"]) == 8 and len(out["scores"]["loss"]["nonmember"]) == 8
    wrong = membership_inference(overfit(public, nonmembers), members, nonmembers, reference=ref)["metrics"]
    assert all(wrong[n]["auc"] < 0.1 for n in wrong)
    pub = membership_inference(public, members, nonmembers, reference=ref, seed=0)["scores"]["loss"]
    s = out["scores"]["loss"]
    gain = auc_claim("mia", "overfit", "public", s["member"], s["nonmember"], pub["member"], pub["nonmember"],
                     0.0, direction="greater")
    assert gain.passed and gain.detail["candidate_auc"] == 1.0
    assert not auc_claim("mia", "public", "public", pub["member"], pub["nonmember"], pub["member"],
                         pub["nonmember"], 0.0, direction="greater").passed
