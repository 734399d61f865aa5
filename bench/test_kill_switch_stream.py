"""Experiment 1 on a checkpoint too large for the device (libortho/experiments/kill_switch_stream.py), at tiny size
on the CPU: a random 2-layer checkpoint (hidden 64, untied head as Llama-3-8B's) through every streamed arm with
4 canaries, the streamed path forced (`RunContext.streamed` needs CUDA). Every assertion names, in a comment, what
would make it fail.

The GPU check is the user's command on a random Llama-3-8B under the gtx4050 cap (bench/gpu_user_path.sh exp1).
"""
from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from libortho.stream import load_nf4

from libortho.experiments import RunContext
from libortho.experiments import kill_switch_stream as kss
from libortho.experiments.kill_switch import CLAIMS, SWITCHED
from libortho.llama import LLAMA_LINEARS

# the checkpoint size at tiny scale: group 32 divides hidden 64; a larger learning rate so 10 steps learn
SIZE = replace(kss.CHECKPOINT, group_size=32, density=0.02, ortho=replace(kss.CHECKPOINT.ortho, lr=3e-2),
               lora=replace(kss.CHECKPOINT.lora, lr=3e-2))
ARMS3 = ("never_trained", "int4_of_public", "ortho_tuned")  # what the claims of ortho_tuned need
PROJ = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
        "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out = {}
    for f in sorted(Path(path).glob("*.safetensors")):
        out.update(load_file(f))
    return out


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    """A random Llama checkpoint (2 layers, hidden 64, untied head, 2000-token tokenizer) in 4 shards."""
    from libortho.models import tiny_llama
    from libortho.random_checkpoint import write_random_llama

    cfg = tiny_llama(layers=2).config
    cfg.tie_word_embeddings = False
    return write_random_llama(tmp_path_factory.mktemp("ks") / "ckpt", cfg, max_shard_size="100KB",
                              tokenizer_text="default", vocab_size=2000, progress=False)


def _ctx(ckpt: Path, out: Path, **extra) -> RunContext:
    return RunContext(model=str(ckpt), output_dir=out, device="cpu", progress=False, num_canaries=4,
                      extra={"memory_policy": {"precision": "int4", "budget_gib": 6.0}, **extra})


@pytest.fixture(scope="module")
def streamed(ckpt, tmp_path_factory) -> tuple[dict, Path]:
    """(the JSON section, W1's directory) of one streamed run with 4 canaries, W1 kept."""
    out = tmp_path_factory.mktemp("ks_out")
    inner = kss.run_checkpoint(_ctx(ckpt, out), SIZE, workdir=out / "work")
    return inner, out / "work" / "w1"


def test_every_arm_measured_and_built(streamed):
    inner, _ = streamed
    assert inner["streamed"] is True and inner["num_canaries"] == 4
    # fails if an arm was left out or one not built at checkpoint scale crept in
    assert set(inner["arms"]) == set(kss.STREAMED_ARMS)
    for arm, by in inner["arms"].items():
        # fails if a switch lost an alpha (claims need 0 and 1) or a switchless arm gained one
        assert set(by) == ({"0.0", "1.0"} if arm in SWITCHED else {"1.0"}), arm
        for e in by.values():
            assert len(e["extracted"]) == 4 and math.isfinite(e["ppl"]) and e["ppl"] > 1.0
            assert all(0.0 <= m["auc"] <= 1.0 for m in e["mia"].values())
        b = inner["built"][arm]
        # fails if an arm does not say how it was built and how long that took
        assert isinstance(b["built"], str) and b["built"] and isinstance(b["seconds"], float), arm
    assert inner["built"]["w1"]["tensors_merged"] == len(LLAMA_LINEARS) * 2
    assert "delta" in inner["skipped"] and "at once" in inner["skipped"]["delta"]
    assert inner["full_fine_tune"]["asked"] is False and inner["full_fine_tune"]["built"] is False
    assert Path(inner["plot"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    json.dumps(inner)  # the section serialises as it is


def test_claims_decided_against_the_int4_control(streamed):
    inner, _ = streamed
    assert inner["candidate"] == "ortho_tuned" and inner["control"] == "int4_of_public"
    # fails if a claim went missing or is not a decision
    assert [c["name"] for c in inner["claims"]] == list(CLAIMS)
    assert all(isinstance(c["passed"], bool) for c in inner["claims"])
    # 4 canaries cannot pass the paired claims whatever was measured: the section says so (not at 8)
    assert any(n.startswith("4 canaries: not every claim can pass") for n in inner["notes"])
    assert not any("canaries: not every claim" in n for n in kss.notes(8))
    assert {"lora", "fine_tuned", "posthoc_hessian", "int4_of_fine_tuned", "nf4_of_fine_tuned"} <= set(
        inner["claims_by_arm"])


def test_switch_endpoints_and_shared_controls(streamed):
    """alpha 0 of ortho_tuned is INT4 of the public weights (bit-identical base, identical numbers); alpha 1 is not;
    the controls measured as another arm's alpha 0 say so."""
    inner, _ = streamed
    arms, built = inner["arms"], inner["built"]
    # fails if the tuned model's base were not INT4 RTN of the public weights on the control's grid
    assert built["ortho_tuned"]["base_bit_identical_to_int4_of_public"] is True
    assert built["ortho_tuned"]["base_sha256"] == built["int4_of_public"]["base_sha256"]
    assert arms["ortho_tuned"]["0.0"]["logp_true"] == arms["int4_of_public"]["1.0"]["logp_true"]
    # fails if the trained stream were empty or ignored
    assert arms["ortho_tuned"]["1.0"]["logp_true"] != arms["ortho_tuned"]["0.0"]["logp_true"]
    assert arms["lora"]["1.0"]["logp_true"] != arms["lora"]["0.0"]["logp_true"]
    assert arms["nf4_of_public"]["1.0"] == arms["lora"]["0.0"] and built["nf4_of_public"]["measured_as"] == "lora@0.0"
    assert arms["int4_of_fine_tuned"]["1.0"] == arms["posthoc_hessian"]["0.0"]
    # fails if W1 were the public weights (the merge lost the adapter)
    assert arms["fine_tuned"]["1.0"]["logp_true"] != arms["never_trained"]["1.0"]["logp_true"]


def test_w1_differs_from_public_exactly_at_the_lora_targets(streamed, ckpt):
    _, w1 = streamed
    pub, new = _tensors(ckpt), _tensors(w1)
    assert set(pub) == set(new)
    targets = {f"model.layers.{i}.{PROJ[p]}.{p}.weight" for i in range(2) for p in LLAMA_LINEARS}
    changed = {k for k in pub if not torch.equal(pub[k], new[k])}
    # fails if a target kept the public weights or anything else (embeddings, norms, head) moved
    assert changed == targets
    assert all(new[k].dtype == pub[k].dtype for k in pub)


def _peft_model(ckpt: Path, seed: int, zero_b: bool):
    from transformers import AutoModelForCausalLM

    from libortho.train import LoraSpec, lora_wrap

    m = lora_wrap(AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32), LoraSpec(), seed)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.zeros_like(p) if zero_b else torch.randn(p.shape, generator=g) * 0.1)
    return m


def test_merge_matches_peft_and_zero_adapter_is_public(ckpt, tmp_path):
    """merge_lora_checkpoint against PEFT's own merge_and_unload; control: B = 0 writes the public weights."""
    from libortho.stream import Checkpoint

    m = _peft_model(ckpt, 1, zero_b=False)
    factors = kss.lora_factors(m)
    facts = kss.merge_lora_checkpoint(ckpt, tmp_path / "w1", factors)
    merged = {k: v for k, v in m.merge_and_unload().state_dict().items()}
    new, dtype = _tensors(tmp_path / "w1"), Checkpoint(ckpt).stored_dtype
    assert facts["tensors_merged"] == 14
    for k, v in new.items():
        # fails if the delta's formula (scale, orientation) differed from PEFT's
        assert torch.equal(v, merged[k].to(dtype)), k
    zero = _peft_model(ckpt, 1, zero_b=True)
    kss.merge_lora_checkpoint(ckpt, tmp_path / "w0", kss.lora_factors(zero))
    pub, w0 = _tensors(ckpt), _tensors(tmp_path / "w0")
    assert all(torch.equal(pub[k], w0[k]) for k in pub)  # fails if merging a zero adapter touched any weight
    with pytest.raises(ValueError, match="not tensors of"):  # a target the checkpoint lacks is refused
        kss.merge_lora_checkpoint(ckpt, tmp_path / "bad", {"model.layers.9.mlp.up_proj.weight":
                                                           factors["model.layers.0.mlp.up_proj.weight"]})


def test_load_nf4_and_nf4_of_public_is_lora_at_scale_0(ckpt):
    """The NF4 base built layer by layer: bitsandbytes linears, the table in host memory; the QLoRA model at adapter
    scale 0 computes it exactly (what nf4_of_public records), at scale 1 not (the control)."""
    import bitsandbytes as bnb

    from libortho.modules import HostEmbedding
    from libortho.train import LoraSpec, lora_wrap, set_lora_alpha

    m = load_nf4(ckpt, "cpu", torch.float32)
    assert sum(isinstance(x, bnb.nn.Linear4bit) for x in m.modules()) == 14  # fails if a linear stayed dense
    assert isinstance(m.model.embed_tokens, HostEmbedding) and not any(p.requires_grad for p in m.parameters())
    ids = torch.tensor([[1, 5, 7, 9, 11, 13]])
    with torch.no_grad():
        bare = m(input_ids=ids).logits
        p = lora_wrap(m, LoraSpec(), 0)
        for n, w in p.named_parameters():
            if "lora_B" in n:
                w.normal_()
        p.eval()
        assert torch.equal(set_lora_alpha(p, 0.0)(input_ids=ids).logits, bare)  # fails if the adapter leaked
        assert not torch.equal(set_lora_alpha(p, 1.0)(input_ids=ids).logits, bare)


def test_full_finetune_plan(ckpt):
    from transformers import AutoModelForCausalLM

    n = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(ckpt).parameters())
    plan = kss.full_finetune_plan(ckpt, 6.0)
    # fails if the count missed a tensor (or counted one twice)
    assert plan["parameters"] == n and plan["planned_gib"] == round(16 * n / 2**30, 2) and plan["fits"]
    assert kss.full_finetune_plan(ckpt, 1e-6)["fits"] is False  # the control: a budget it misses
    assert kss.full_finetune_plan(ckpt, None)["fits"] is True  # no budget: nothing to miss


def test_full_finetune_where_the_budget_holds_it(ckpt, tmp_path):
    """Asked and fitting (no budget): W1 is the full fine-tune, the LoRA merge is not built."""
    size = replace(SIZE, arms=("never_trained", "fine_tuned"))
    inner = kss.run_checkpoint(_ctx(ckpt, tmp_path), size, candidate="fine_tuned", full_finetune=True)
    assert inner["full_fine_tune"]["built"] is True and "full fine-tune" in inner["built"]["w1"]["built"]
    assert "lora" not in inner["arms"] and inner["training"]["fine_tuned"]["steps"] == SIZE.finetune.max_steps
    # fails if W1 were the public weights
    assert inner["arms"]["fine_tuned"]["1.0"]["logp_true"] != inner["arms"]["never_trained"]["1.0"]["logp_true"]


def _oom(*_):
    raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")


def test_an_arm_out_of_memory_is_recorded_and_the_run_goes_on(ckpt, tmp_path, monkeypatch):
    """QLoRA out of memory: recorded in did_not_fit, the arms needing W1 skipped with the reason, the candidate's
    claims still decided. The candidate out of memory: the run ends with a step-naming out-of-memory error carrying
    what was measured (the CLI's exit 3)."""
    from libortho.oom import is_oom

    monkeypatch.setattr(kss.StreamedKillSwitch, "_nf4", _oom)  # QLoRA's NF4 base
    size = replace(SIZE, arms=("never_trained", "int4_of_public", "ortho_tuned", "lora", "fine_tuned"))
    inner = kss.run_checkpoint(_ctx(ckpt, tmp_path), size)
    assert "out of memory" in inner["did_not_fit"]["lora"] and "lora did not fit" in inner["skipped"]["fine_tuned"]
    assert inner["did_not_fit"]["lora"].startswith("in lora_arms (kill_switch_stream.py:")  # where, for the user
    assert set(inner["arms"]) == {"never_trained", "int4_of_public", "ortho_tuned"} and len(inner["claims"]) == 5
    monkeypatch.setattr(kss.StreamedKillSwitch, "ortho_tuned", _oom)
    with pytest.raises(kss.StepOutOfMemory, match="ortho_tuned did not fit") as e:
        kss.run_checkpoint(_ctx(ckpt, tmp_path), replace(size, arms=ARMS3))
    # fails if the CLI would not map it to exit 3, or the measured arms were lost
    assert is_oom(e.value) and set(e.value.partial_section["arms"]) == {"never_trained", "int4_of_public"}


def test_run_dispatches_on_streamed(monkeypatch, tmp_path):
    """Experiment 1 (kss.run) goes to the streamed experiment when the context (or the caller) says so, not otherwise."""
    from libortho.experiments import kill_switch

    seen = []
    monkeypatch.setattr(kss, "run_checkpoint", lambda ctx, size, cand, th, arms: seen.append(cand) or {"ok": 1})
    ctx = RunContext(model=str(tmp_path), device="cpu", extra={"memory_policy": {"precision": "int4"}})
    assert kss.run(ctx, streamed=True) == {"ok": 1} and seen == ["ortho_tuned"]
    monkeypatch.setattr(RunContext, "streamed", property(lambda self: True))
    assert kss.run(ctx) == {"ok": 1} and len(seen) == 2
    monkeypatch.setattr(kill_switch, "run", lambda ctx, *a: seen.append("in memory") or {"ok": 2})
    assert kss.run(ctx, streamed=False) == {"ok": 2} and seen[-1] == "in memory"  # the other path
    ctx.extra["full_finetune"] = True  # the in-memory experiment always fine-tunes in full: the flag is refused
    with pytest.raises(ValueError, match="--full-finetune applies to a checkpoint too large"):
        kss.run(ctx, streamed=False)
    del ctx.extra["full_finetune"]
    monkeypatch.undo()
    with pytest.raises(ValueError, match="not built at checkpoint scale"):  # delta needs two models at once
        kss.run_checkpoint(ctx, SIZE, candidate="delta")


def test_full_finetune_refused_over_the_budget_exit_3(ckpt, tmp_path, monkeypatch, capsys):
    """`run --full-finetune` under gtx4050 where the plan misses the budget: one line naming the step and its planned
    memory, exit 3, before any arm is built; the steps before it (convert, with `--experiment all`) saved."""
    from libortho import cli

    monkeypatch.setattr(RunContext, "streamed", property(lambda self: True))  # on a GPU: 4-bit policy + local dir
    monkeypatch.setattr(kss, "CHECKPOINT", replace(SIZE, arms=ARMS3))  # the arms the claims need: a short run
    monkeypatch.setattr(kss, "ADAMW_BYTES_PER_PARAM", 10**6)  # the tiny model "needs" 300 GiB
    built = []
    monkeypatch.setattr(kss.StreamedKillSwitch, "run_arms", lambda *a: built.append(1))
    rc = cli.main(["run", "--experiment", "all", "--model", str(ckpt), "--profile", "gtx4050", "--num-canaries", "4",
                   "--output-dir", str(tmp_path), "--no-progress", "--full-finetune"])
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("libortho: error")]
    assert rc == 3  # fails if the refusal were not an out-of-memory exit
    assert len(err) == 1 and "full_finetune planned" in err[0] and "GiB" in err[0] and "6 GiB budget" in err[0]
    assert built == []  # refused before any arm: fails if the other arms ran first
    payload = json.loads(next(tmp_path.glob("*_results_*.json")).read_text())
    assert payload["status"].startswith("failed: out of memory in kill_switch: full_finetune planned")
    assert payload["exp1_kill_switch"]["full_fine_tune"]["fits"] is False
    assert "convert" in payload  # fails if the step before it were lost


def test_interrupted_run_keeps_the_arms_measured_so_far(ckpt, tmp_path, monkeypatch, capsys):
    """Ctrl-C / SIGTERM (a job's time limit) during the QLoRA arm: exit 130, status interrupted, and the arms
    measured before it are in the JSON (the control: without them the section would be absent)."""
    from libortho import cli

    def interrupt(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(RunContext, "streamed", property(lambda self: True))
    monkeypatch.setattr(kss, "CHECKPOINT", replace(SIZE, arms=(*ARMS3, "lora")))
    monkeypatch.setattr(kss.StreamedKillSwitch, "lora_arms", interrupt)
    rc = cli.main(["run", "--experiment", "1", "--model", str(ckpt), "--profile", "gtx4050", "--num-canaries", "4",
                   "--output-dir", str(tmp_path), "--no-progress"])
    assert rc == 130
    assert "exp1: ortho_tuned in" in capsys.readouterr().err  # the log says how far it got
    payload = json.loads(next(tmp_path.glob("*_results_*.json")).read_text())
    assert payload["status"] == "interrupted"
    sec = payload["exp1_kill_switch"]
    assert sec["status"] == "interrupted" and set(sec["arms"]) == set(ARMS3)


def test_full_finetune_flag_needs_experiment_1(capsys):
    from libortho import cli

    rc = cli.main(["run", "--experiment", "2", "--model", "tiny", "--full-finetune"])
    assert rc == 2 and "--full-finetune: applies to experiment 1" in capsys.readouterr().err


@pytest.mark.gtx4050
def test_one_model_on_the_gpu_at_a_time(tmp_path_factory):
    """On CUDA under the gtx4050 cap (the profile marker caps the allocator): a random 8-layer checkpoint of hidden
    2048 (1.2 GB in bf16) through every arm, a 3 GiB budget so the full-precision arms really offload (0.5 GiB of
    weights on the device). Each arm leaves (almost) nothing allocated after its release, and the run's peak stays
    under 1.6x the checkpoint (two models resident at once would pass it)."""
    from transformers import LlamaConfig

    from libortho.random_checkpoint import write_random_llama

    cfg = LlamaConfig(vocab_size=32000, hidden_size=2048, intermediate_size=8192, num_hidden_layers=8,
                      num_attention_heads=16, num_key_value_heads=4, tie_word_embeddings=False)
    root = tmp_path_factory.mktemp("ks_gpu")
    ckpt = write_random_llama(root / "ckpt", cfg, tokenizer_text="default", device="cuda", progress=False)
    size_gib = sum(f.stat().st_size for f in ckpt.glob("*.safetensors")) / 2**30
    ctx = RunContext(model=str(ckpt), output_dir=root, device="cuda", progress=False, num_canaries=4,
                     extra={"memory_policy": {"precision": "int4", "budget_gib": 3.0}})
    torch.cuda.reset_peak_memory_stats()
    inner = kss.run_checkpoint(ctx, kss.CHECKPOINT)
    assert set(inner["arms"]) == set(kss.STREAMED_ARMS) and inner["did_not_fit"] == {}
    assert inner["offload_gib"] == 0.5
    for arm, b in inner["built"].items():
        if "device_gib_after_release" in b:  # fails if an arm's model outlived its measurement on the device
            assert b["device_gib_after_release"] < 0.1, (arm, b)
    peak = torch.cuda.max_memory_allocated() / 2**30
    print(f"checkpoint {size_gib:.2f} GiB, run peak {peak:.2f} GiB, arm seconds {inner['arm_seconds']}")
    assert peak < 1.6 * size_gib  # fails with two full-precision models resident at once
