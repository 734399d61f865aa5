"""Unit tests of the utility experiment's pieces (libortho/experiments/utility.py): the domain split, the matched
LoRA ranks, the stored bytes of a stream, the per-window perplexity CI, the training windows and the claims.
Every assertion says in a comment what would make it fail; each claim has a control that fails it."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from libortho.experiments import utility as U
from libortho.linear import OrthoLinear
from libortho.quant import quantize
from libortho.sparse import csr_from_mask


def test_split_is_disjoint_whole_fortunes_and_fixed():
    s = U.domain_split()
    docs = U.domain_fortunes()
    sets = {k: set(v) for k, v in s.items()}
    # fails if a fortune landed in two splits (test text trained on) or was lost / cut
    assert not (sets["train"] & sets["test"]) and not (sets["train"] & sets["validation"])
    assert not (sets["validation"] & sets["test"])
    assert sets["train"] | sets["validation"] | sets["test"] == set(docs)
    assert len(s["test"]) == round(0.15 * len(docs)) and len(s["validation"]) == round(0.1 * len(docs))
    # fails if the split depended on anything but its fixed seed (another call, another run)
    assert U.domain_split() == s


def test_domain_is_text_no_other_code_reads():
    """Calibration, general fine-tuning text and the demo's seeded calibration read fortunes().text[:662144]
    (data.calibration_batches, train.general_ids, experiments.demo): the domain lies past it."""
    from libortho.data import FORTUNES, _read, fortunes
    from libortho.experiments.demo import CALIB_CHARS, CALIB_SEEDED_FROM, CALIB_SLICES

    used = fortunes().text[:CALIB_SEEDED_FROM + CALIB_SLICES * CALIB_CHARS]
    # fails if any domain fortune (train, validation or test) is read by other code as public text
    assert not any(f in used for f in U.domain_fortunes())
    # the control: a fortune of a file that is read there is found by the same check
    other = next(" ".join(f.split()) for f in _read(FORTUNES / "computers").split("\n%\n") if len(f.split()) >= 8)
    assert other in used


def test_train_stream_holds_canaries_and_train_split_only():
    from libortho.models import tokenizer as embedded_tokenizer
    from libortho.privacy import make_canaries

    tok = embedded_tokenizer()
    s = U.domain_split()
    can = make_canaries(tok, 2, 0)
    ids = U.train_stream(tok, s["train"][:50], [c.ids for c in can], seed=0).tolist()
    text = tok.decode(ids)
    # fails if a canary were left out of the train split
    assert all(c.secret in text for c in can)
    # fails if a test fortune leaked into the train stream (control: a train fortune is in it)
    assert s["train"][0][:40] in text and not any(t[:40] in text for t in s["test"][:20])
    # fails if the document order ignored the seed
    assert ids != U.train_stream(tok, s["train"][:50], [c.ids for c in can], seed=1).tolist()


def test_closest_rank():
    assert U.closest_rank(1000, 300) == 3  # 900 vs 1200: 3 is closer
    assert U.closest_rank(1100, 300) == 4  # 1200 vs 900
    assert U.closest_rank(10, 300) == 1  # never below rank 1
    assert U.closest_rank(450, 300) == 1  # a tie goes to the smaller rank
    # the control: the rank an off-by-one would give is further from the goal
    assert abs(4 * 300 - 1000) > abs(3 * 300 - 1000)
    with pytest.raises(ValueError, match="per_rank > 0"):
        U.closest_rank(100, 0)


def test_stream_bytes_counts_values_indices_row_pointers():
    torch.manual_seed(0)
    w = torch.randn(8, 64)
    mask = torch.rand(8, 64) < 0.1
    lin = OrthoLinear.from_parts(quantize(w, 32, False), csr_from_mask(w, mask))
    model = torch.nn.Sequential(lin)
    nnz = int(mask.sum())
    # values float32, columns int16 (64 wide), row pointers int32 (out + 1)
    assert U.stream_bytes(model) == nnz * 4 + nnz * 2 + 9 * 4
    # the control: a stream of other nnz has other bytes (the count reads the tensors, not a constant)
    lin.set_ortho_(csr_from_mask(w, torch.zeros_like(mask)))
    assert U.stream_bytes(model) == 9 * 4


def test_ppl_ci_is_the_pinned_ratio_and_covers_it():
    rng = np.random.default_rng(0)
    tokens = rng.integers(20, 33, 40)
    nll = tokens * rng.normal(3.0, 0.3, 40)
    e = U.ppl_ci(nll, tokens, n_resamples=999)
    # fails if the perplexity were a mean of window perplexities instead of exp(total NLL / total tokens)
    assert e["ppl"] == pytest.approx(math.exp(nll.sum() / tokens.sum()))
    assert e["ci95"][0] < e["ppl"] < e["ci95"][1]
    # the control: identical windows leave nothing to resample (a point interval)
    flat = U.ppl_ci([60.0] * 10, [20] * 10, n_resamples=999)
    assert flat["ci95"][0] == flat["ci95"][1] == pytest.approx(math.exp(3.0))
    assert np.allclose(U.window_logppl(e), nll / tokens)


def test_domain_loss_same_windows_at_the_same_step(monkeypatch):
    seen = []
    monkeypatch.setattr(U, "token_nll", lambda model, x, mask, labels: (seen.append(x.clone()), x.float())[1])
    monkeypatch.setattr(U, "input_device", lambda model: torch.device("cpu"))
    ids = torch.arange(1000)
    f = U.domain_loss(ids, batch=3, length=16, seed=0, mask_windows=5)
    f(None, 1), f(None, 1), f(None, 2), f(None, 0)
    U.domain_loss(ids, 3, 16, seed=1)(None, 1)
    # fails if two arms at the same step could see different tokens
    assert torch.equal(seen[0], seen[1]) and seen[0].shape == (3, 16)
    # fails if every step drew the same windows, or the seed were ignored
    assert not torch.equal(seen[0], seen[2]) and not torch.equal(seen[0], seen[4])
    assert seen[3].shape == (5, 16)  # the mask pass draws mask_windows windows
    with pytest.raises(ValueError, match="not more than one window"):
        U.domain_loss(torch.arange(10), 3, 16, 0)


@pytest.mark.parametrize("kw, match", [({"split": (0.5, 0.6)}, "split must be"), ({"steps": 0}, "steps must be"),
                                       ({"density": 1.5}, "density must be"),
                                       ({"lr_grid": {"ortho_tuned": (1e-3,)}}, "lr_grid lacks"),
                                       ({"lr_grid": {a: (-1.0,) for a in U.TRAINED}}, "positive finite")])
def test_size_errors(kw, match):
    with pytest.raises(ValueError, match=match):
        U.Size(**kw)


# ---------------------------------------------------------------------------------------------
# claims, on per-window values (numbers, not text)

def _arms(shifts: dict, n: int = 30, seed: int = 0) -> dict:
    """Per-window domain entries: a shared per-window difficulty plus each arm's shift (nats/token) and noise."""
    rng = np.random.default_rng(seed)
    base, tokens = rng.normal(4.0, 0.5, n), np.full(n, 32)
    return {a: {"domain": {"window_nll": list((base + s + rng.normal(0, 0.01, n)) * tokens),
                           "window_tokens": list(tokens)}} for a, s in shifts.items()}


def test_gain_claim_passes_a_gain_and_fails_its_controls():
    arms = _arms({"ortho_tuned": -0.3, "int4_of_public": 0.0, "public": -0.01})
    ok = U.gain_claim(arms, "ortho_tuned", "int4_of_public", 0.05)
    assert ok["passed"] and ok["value"] == pytest.approx(0.3, abs=0.01) and ok["ppl_ratio"] < 1
    # controls: the alpha-0 model against itself, and a gain below the threshold, fail
    assert not U.gain_claim(arms, "int4_of_public", "int4_of_public", 0.05)["passed"]
    assert not U.gain_claim(arms, "public", "int4_of_public", 0.05)["passed"]
    assert not U.gain_claim(arms, "ortho_tuned", "int4_of_public", 0.5)["passed"]


def test_parity_claim_passes_within_the_margin_and_fails_beyond_it():
    arms = _arms({"ortho_tuned": -0.30, "lora_params": -0.31, "int4_of_public": 0.0})
    ok = U.parity_claim(arms, "ortho_tuned", "lora_params", 0.05)
    assert ok["passed"] and set(ok) >= {"name", "candidate", "control", "statistic", "value", "ci95", "threshold",
                                        "p", "passed"}
    # controls: a crippled arm (no stream) and a too-tight margin fail
    assert not U.parity_claim(arms, "int4_of_public", "lora_params", 0.05)["passed"]
    assert not U.parity_claim(arms, "ortho_tuned", "lora_params", -0.05)["passed"]


def test_thresholds_for_small_overrides_base():
    assert U.thresholds_for("small")["domain_gain_nats"] == U.THRESHOLDS["small"]["domain_gain_nats"]
    assert U.thresholds_for("full")["domain_gain_nats"] == U.THRESHOLDS["domain_gain_nats"]
    with pytest.raises(KeyError, match="parity_margin_nats"):
        U.thresholds_for("full", {"domain_gain_nats": 0.1})
