"""The utility experiment as a suite that can fail: what the ortho stream buys on a private domain (a held-out
split of Debian's fortunes), against LoRA matched on parameters and on bytes and full fine-tuning.

Sizes:

* `make test` (`SMALL["tiny"]`): the tiny random Llama through every arm, 3 learning rates per trained arm chosen
  on the validation split, 12 steps of 2 x 64 tokens each; the gain claim of ortho_tuned must hold, every negative
  control must fail it, a too-tight margin must fail parity; same seed, same numbers (retrained from nothing).
  Nothing is written under results/.
* `pytest bench/test_utility.py -m real` (a GPU): `FULL` on SmolLM2, written to results/exp1_utility.json.

The tiny runs use one intra-op thread: its matrices are small, and on 2 shared cores OpenMP threads only wait on
each other (a tiny forward measured 0.4 s with 2 threads, 0.03 s with 1, on the busy machine).
"""
from __future__ import annotations

import json
import math
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from libortho.experiments import RunContext
from libortho.experiments import utility as U
from libortho.results import results_dir, write_json

RESULTS = results_dir(Path(__file__).resolve().parent.parent / "results")  # full-size runs write here
CLAIM_KEYS = {"name", "candidate", "control", "statistic", "value", "ci95", "threshold", "p", "passed"}


@contextmanager
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The make-test-size JSON section of the tiny model (trained weights cached under the libortho cache)."""
    out = tmp_path_factory.mktemp("utility")
    with one_thread():
        inner = U.run(RunContext(model="tiny", output_dir=out, size="quick", progress=False, run_id="tiny"))
    return inner


def test_json_table_and_plot(tiny):
    back = json.loads(json.dumps(tiny, allow_nan=False))  # fails on a NaN or a non-JSON value
    assert list(back["arms"]) == list(U.ARMS) and [r["arm"] for r in back["table"]] == list(U.ARMS)
    for arm, r in back["arms"].items():
        for what in ("domain", "general"):
            e = r[what]
            # fails on a broken scorer (NaN, ppl <= 1) or a CI that does not hold its own point
            assert math.isfinite(e["ppl"]) and e["ppl"] > 1 and e["ci95"][0] <= e["ppl"] <= e["ci95"][1]
            assert len(e["window_nll"]) == e["windows"] == len(e["window_tokens"])
    assert Path(back["plot"]).is_file() and not str(back["plot"]).startswith(str(RESULTS))
    # fails if a test split fortune were also a train or validation one
    assert sum(back["domain"]["fortunes"].values()) == len(U.domain_fortunes())


def test_learning_rates_chosen_on_validation(tiny):
    for arm in U.TRAINED:
        s = tiny["lr_search"][arm]
        assert len(s["grid"]) == 3 and set(s["validation_loss"]) == {repr(x) for x in s["grid"]}
        # fails if the chosen lr were not the one of lowest validation loss (e.g. picked on the test split)
        assert s["chosen"] == min(s["grid"], key=lambda lr: s["validation_loss"][repr(lr)])
        assert tiny["arms"][arm]["lr"] == s["chosen"]


def test_lora_ranks_matched_on_params_and_bytes(tiny):
    m = tiny["matching"]
    arms = tiny["arms"]
    assert arms["ortho_tuned"]["trainable_params"] == m["stream_nnz"]
    assert arms["ortho_tuned"]["stored_bytes"] == m["stream_bytes"]
    for arm, goal, per in (("lora_params", m["stream_nnz"], m["lora_params_per_rank"]),
                           ("lora_bytes", m["stream_bytes"], m["lora_bytes_per_rank"])):
        r = arms[arm]["rank"]
        # fails if a neighbouring rank were closer to the stream's size than the one trained
        assert all(abs(r * per - goal) <= abs(k * per - goal) for k in (r - 1, r + 1) if k >= 1)
        # the arm's counts are read from its tensors: they must equal rank x per-rank
        assert arms[arm]["trainable_params"] == r * m["lora_params_per_rank"]
        assert arms[arm]["stored_bytes"] == r * m["lora_bytes_per_rank"]


def test_lora_int4_sits_on_the_streams_base_at_lora_params_rank(tiny):
    a, d = tiny["arms"], tiny["diagnostics"]["stream_vs_lora_on_int4"]
    # fails if the diagnostic's LoRA differed in size from lora_params (then it would not isolate the base)
    assert a["lora_int4"]["rank"] == a["lora_params"]["rank"]
    assert a["lora_int4"]["trainable_params"] == a["lora_params"]["trainable_params"]
    assert CLAIM_KEYS <= set(d) and (d["candidate"], d["control"]) == ("ortho_tuned", "lora_int4")
    # a diagnostic, not a claim: the summary is decided by U.CLAIMS alone
    assert {c["name"] for c in tiny["claims"]} == set(U.CLAIMS)
    with one_thread():
        u = U.Utility("tiny", U.SMALL["tiny"], seed=0, progress=False)
        dense = U.target_linears(u._int4_dense(), u.ocfg.targets)
        skeleton = U.ortho_modules(u._int4_skeleton())
        public = U.target_linears(u._copy(), u.ocfg.targets)
    for name, lin in dense.items():
        # fails if the LoRA base were not the stream's INT4 base bit for bit
        assert torch.equal(lin.weight, skeleton[name].dequantized_base(lin.weight.dtype)), name
    # the control: the public weights are not that base
    assert any(not torch.equal(lin.weight, public[n].weight) for n, lin in dense.items())


def test_switch_endpoints(tiny):
    a = tiny["arms"]
    # fails if LoRA at alpha 0 were not the public model exactly
    assert a["lora_off"]["domain"]["window_nll"] == a["public"]["domain"]["window_nll"]
    # fails if the INT4 base were the public model (no quantization) or the stream leaked into alpha 0
    assert a["int4_of_public"]["domain"]["window_nll"] != a["public"]["domain"]["window_nll"]
    assert a["int4_of_public"]["domain"]["window_nll"] != a["ortho_tuned"]["domain"]["window_nll"]


def test_gain_claim_holds_and_its_controls_fail(tiny):
    claims = {c["name"]: c for c in tiny["claims"]}
    assert set(claims) == set(U.CLAIMS) and all(CLAIM_KEYS <= set(c) for c in tiny["claims"])
    # fails if the trained stream bought nothing on the domain (beyond the small size's threshold)
    assert claims["alpha1_domain_gain"]["passed"], claims["alpha1_domain_gain"]
    # every negative control must fail its claim: the switches off, and a stream that learned nothing
    for label, c in tiny["negative_controls"].items():
        assert not c["passed"], (label, c)
    # claims decided again from the JSON alone are the same
    t = tiny["thresholds"]
    assert U.decide_claims(tiny["arms"], t, tiny["seed"], tiny["size"]["n_resamples"]) == tiny["claims"]


def test_parity_fails_with_a_too_tight_margin(tiny):
    """Parity with LoRA is measured, not assumed: a margin that demands ortho beat LoRA by a whole nat fails."""
    for lora in ("lora_params", "lora_bytes"):
        c = U.parity_claim(tiny["arms"], "ortho_tuned", lora, -1.0, n_resamples=999)
        assert not c["passed"] and c["ci95"][1] > -1.0


def test_cached_streams_rebuild_the_trained_model():
    """The model `Utility.ortho_tuned` rebuilds from its cached streams is the one orthogonalize_ trained."""
    from libortho.convert import orthogonalize_
    from libortho.modules import ortho_modules, set_alpha
    from libortho.sparse import CSR

    with one_thread():
        u = U.Utility("tiny", U.SMALL["tiny"], seed=0, progress=False)
        cfg = U.replace(u.ocfg, train=u.size.train(1e-2, 0))
        m = u._copy()
        orthogonalize_(m, cfg, calibration=u.calib, loss_fn=u._loss(), hessian_diag=u.hessian_diag(), progress=False)
        streams = {n: CSR(o.ortho_crow, o.ortho_col, o.ortho_values.detach(), (o.out_features, o.in_features))
                   for n, o in ortho_modules(m).items()}
        rebuilt = u._int4_skeleton(streams)
        set_alpha(rebuilt, 1.0)
        ids = u.test_ids[:48].unsqueeze(0)
        with torch.no_grad():
            # fails if the rebuilt base or stream differed from the trained one
            assert torch.equal(m(input_ids=ids).logits, rebuilt(input_ids=ids).logits)
            # the control: the same stream with its values reversed computes something else
            name = next(iter(streams))
            s = streams[name]
            streams[name] = CSR(s.crow, s.col, s.values.flip(0), s.shape)
            other = u._int4_skeleton(streams)
            set_alpha(other, 1.0)
            assert not torch.equal(m(input_ids=ids).logits, other(input_ids=ids).logits)


def test_same_seed_same_numbers(tiny, monkeypatch):
    """Every trained arm retrained from nothing (the weight cache bypassed) at its chosen lr gives the same numbers."""
    # not a fresh LIBORTHO_CACHE: the tiny model's tokenizer is cached there too (27 s to rebuild from the GGUF)
    monkeypatch.setattr(U, "cached", lambda kind, config, build: (*build(), False))
    with one_thread():
        u = U.Utility("tiny", U.SMALL["tiny"], seed=tiny["seed"], progress=False)
        ortho, info = u.ortho_tuned(tiny["arms"]["ortho_tuned"]["lr"])
        assert not info["cached"]  # fails if this were read back instead of trained
        u.match_ranks(ortho)
        got = {"ortho_tuned": u.measure(ortho)}
        for arm in ("lora_params", "full_ft"):
            m, info = u.train_arm(arm, tiny["arms"][arm]["lr"])
            assert not info["cached"]
            got[arm] = u.measure(m)
    for arm, e in got.items():
        for what in ("domain", "general"):
            # fails on any unseeded randomness in the data order, the mask, LoRA's init, dropout or the CI
            assert e[what]["window_nll"] == tiny["arms"][arm][what]["window_nll"], (arm, what)
            assert e[what]["ci95"] == tiny["arms"][arm][what]["ci95"]


# ---------------------------------------------------------------------------------------------
# the full size (a GPU)

@pytest.mark.real
@pytest.mark.gpu
def test_full_size_on_gpu():
    if not torch.cuda.is_available():
        pytest.skip("the full size trains 12 SmolLM2 runs: it needs CUDA")
    ctx = RunContext(model="smollm2-135m", output_dir=RESULTS, seed=0, device="cuda", progress=True, size="full")
    inner = U.run(ctx)
    write_json(RESULTS / "exp1_utility.json", {U.SECTION: inner})
    # fails if the stream bought less than domain_gain_nats on the domain
    assert {c["name"]: c for c in inner["claims"]}["alpha1_domain_gain"]["passed"]
    for label, c in inner["negative_controls"].items():
        assert not c["passed"], label  # fails if a switch that is off (or learned nothing) passed a claim


def test_thresholds_agree_with_the_repository_file():
    """thresholds.toml [exp1_utility] is the suite's copy of utility.THRESHOLDS (an installed package has only the
    module's). Fails when one is edited without the other."""
    from bench import thresholds

    table = thresholds.load("exp1_utility")
    assert table == U.THRESHOLDS
    assert {**table, "parity_margin_nats": 0.5} != U.THRESHOLDS  # the control: a drifted copy is caught
