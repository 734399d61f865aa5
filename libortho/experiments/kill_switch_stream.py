"""Experiment 1 on a checkpoint too large for the device (issue 16: 8B in 6 GiB): the same canaries, measurements,
claims and JSON as `kill_switch`, every arm built from the checkpoint on disk, one model on the device at a time.

| arm                | built at checkpoint scale                                                                 |
| ------------------ | ----------------------------------------------------------------------------------------- |
| never_trained      | the checkpoint in full precision, offloaded (`stream.load_offloaded`); the MIA reference  |
| int4_of_public     | `convert_checkpoint` posthoc (magnitude) of the checkpoint at alpha 0: the INT4 base alone |
| ortho_tuned        | `convert_checkpoint` with `OrthoTuneConfig`, `canary_loss`, gradient checkpointing; 0 and 1 |
| lora               | QLoRA: NF4 base (`stream.load_nf4`), embeddings in host memory, PEFT r 8 / 32 / 0.1, 7 linears |
| nf4_of_public      | the lora model with its adapter at scale 0: exactly the NF4 public model                  |
| fine_tuned         | W1 = the LoRA deltas merged onto the stored weights shard by shard on the CPU, offloaded  |
| posthoc_hessian    | `convert_checkpoint(W1)` posthoc / hessian, alpha 0 and 1                                 |
| int4_of_fine_tuned | posthoc_hessian at alpha 0: INT4 of W1 alone                                              |
| nf4_of_fine_tuned  | `load_nf4(W1)`: NF4 layer by layer, as the lora arm's base                          |

`delta` needs the public and the fine-tuned model at once and the relearning attack a dense trainable copy:
neither is built here (the JSON's "skipped" says why). A full fine-tune (AdamW, 16 bytes a parameter) is built
only when asked (`--full-finetune`) and the budget holds it: it then replaces the LoRA merge as W1. When it does not
fit, the run ends with `PlannedOutOfMemory` (exit 3) before any arm is built: checked first, not found out later.
"""
from __future__ import annotations

import gc
import hashlib
import importlib
import shutil
import sys
import tempfile
import time
import traceback
from dataclasses import replace
from pathlib import Path

import torch

from ..config import OrthoConfig
from ..gpu import allocated_peak_gib
from ..perplexity import Protocol
from ..stream import offload_budget_gib
from ..train import LoraSpec
from . import RunContext, register
from . import kill_switch
from .kill_switch import (CANDIDATES, CONTROL_OF, SWITCHED, KillSwitch, Size, _quick, plot, print_table,
                          thresholds_for)

ADAMW_BYTES_PER_PARAM = 16  # full fine-tune: fp32 weight, its gradient and AdamW's two moments (activations extra)
STREAMED_ARMS = ("never_trained", "int4_of_public", "ortho_tuned", "lora", "nf4_of_public", "fine_tuned",
                 "posthoc_hessian", "int4_of_fine_tuned", "nf4_of_fine_tuned")
SKIPPED = {"delta": "needs the public and the fine-tuned model at once (orthogonalize_ mode delta); not built at "
                    "checkpoint scale",
           "relearn": "the relearning attack fully fine-tunes a dense copy of the alpha-0 weights; not run at "
                      "checkpoint scale"}


# A checkpoint too large for the device: SMALL-like (|R| = 32, alphas 0 and 1), 10 training steps per arm
# (`--num-canaries` sets the canaries; 4 at the GPU check). Group 128 symmetric at 0.5%: the packed 8B with its
# stream and AdamW moments must fit 6 GiB while training.
CHECKPOINT = Size(name="small", num_canaries=4, num_holdout=4, n_candidates=32, n_candidates_decisive=32,
                  groups=(4, 4), ppl=Protocol(256, 256, 256), calib=(4, 128), density=0.005, group_size=128,
                  symmetric=True, finetune=_quick(1e-4, 10), ortho=_quick(1e-2, 10), lora=_quick(1e-2, 10),
                  alphas={a: (0.0, 1.0) for a in SWITCHED}, arms=STREAMED_ARMS, chunk=32, relearn=None)


class StepOutOfMemory(torch.cuda.OutOfMemoryError):
    """An out-of-memory error whose message names the step (the CLI maps it to exit 3 and, for `names_step`, prints
    the message); `partial_section` carries the arms measured before it."""

    names_step = True


class PlannedOutOfMemory(StepOutOfMemory):
    """A step refused before it starts: its planned memory exceeds the budget."""

    planned = True


def full_finetune_plan(path, budget_gib: float | None) -> dict:
    """Memory a full fine-tune of the checkpoint at `path` needs (AdamW, `ADAMW_BYTES_PER_PARAM` bytes a parameter,
    activations not counted) against `budget_gib` (None: no budget, it fits)."""
    from safetensors import safe_open

    from ..stream import Checkpoint

    ckpt = Checkpoint(path)
    n = 0
    for shard in sorted(set(ckpt.weight_map.values())):
        with safe_open(ckpt.path / shard, framework="pt") as f:
            for k in f.keys():
                shape = f.get_slice(k).get_shape()
                n += int(torch.Size(shape).numel())
    planned = n * ADAMW_BYTES_PER_PARAM / 2**30
    return {"parameters": n, "bytes_per_parameter": ADAMW_BYTES_PER_PARAM, "planned_gib": round(planned, 2),
            "budget_gib": budget_gib, "fits": budget_gib is None or planned <= budget_gib}


def lora_factors(peft_model) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    """{checkpoint tensor name: (A (r, in), B (out, r), scale)} of every LoRA layer of `peft_model` at adapter scale
    1 (PEFT's `lora_alpha / r`), on the CPU in float32: the delta of the tensor is `scale * B @ A`."""
    from peft.tuners.lora import LoraLayer

    out = {}
    for name, m in peft_model.named_modules():
        if not isinstance(m, LoraLayer):
            continue
        if getattr(m, "fan_in_fan_out", False) or getattr(m, "use_rslora", {}).get("default", False):
            raise ValueError(f"{name}: fan_in_fan_out / rslora adapters are not merged here")
        key = name.removeprefix("base_model.model.") + ".weight"
        a, b = m.lora_A["default"].weight, m.lora_B["default"].weight  # (r, in), (out, r)
        out[key] = (a.detach().float().cpu(), b.detach().float().cpu(), m.lora_alpha["default"] / m.r["default"])
    if not out:
        raise ValueError("model has no LoRA layer; wrap it with lora_wrap first")
    return out


def merge_lora_checkpoint(src, dst, factors: dict[str, tuple[torch.Tensor, torch.Tensor, float]]) -> dict:
    """Write W1 = W + scale * B @ A (each `factors` entry, onto the stored tensor of that name) as a new safetensors
    checkpoint directory `dst`: one shard in memory at a time, merged on the CPU in float32 and stored in the
    tensor's dtype; every other tensor and file copied as is.

    Returns:
        {"tensors_merged", "shards", "seconds"}.
    """
    from safetensors import safe_open
    from safetensors.torch import save_file

    from ..stream import Checkpoint

    t0 = time.perf_counter()
    ckpt = Checkpoint(src)
    missing = sorted(set(factors) - set(ckpt.weight_map))
    if missing:
        raise ValueError(f"LoRA targets {missing[:2]} are not tensors of {ckpt.path} ({len(missing)} missing)")
    dst = Path(dst)
    dst.mkdir(parents=True, exist_ok=False)
    for f in ckpt.path.iterdir():  # config, index, tokenizer, generation config
        if f.is_file() and not f.name.endswith(".safetensors"):
            shutil.copy2(f, dst / f.name)
    merged = []
    for shard in sorted(set(ckpt.weight_map.values())):
        out = {}
        with safe_open(ckpt.path / shard, framework="pt") as f:
            meta = f.metadata() or {"format": "pt"}
            for k in f.keys():
                t = f.get_tensor(k)
                if k in factors:
                    a, b, scale = factors[k]
                    t = (t.float() + scale * (b @ a)).to(t.dtype)  # (out, in)
                    merged.append(k)
                out[k] = t
        save_file(out, dst / shard, metadata=meta)
        del out
    return {"tensors_merged": len(merged), "shards": len(set(ckpt.weight_map.values())),
            "seconds": round(time.perf_counter() - t0, 1)}


def notes(n_canaries: int) -> list[str]:
    """What a reader of the section must know to judge its claims."""
    out = ["streamed: one model on the device at a time, built from the checkpoint; the full-precision arms ran "
           "with accelerate offloading, the INT4 and NF4 arms resident with the embedding table in host memory"]
    if n_canaries < 6:  # below 6 the small-size thresholds cannot all be met, whatever was measured
        from scipy.stats import beta

        upper = float(beta.ppf(0.975, 1, n_canaries))  # Clopper-Pearson 97.5% bound of 0 extractions in n
        out.append(f"{n_canaries} canaries: not every claim can pass at this size (the smallest one-sided Wilcoxon p "
                   f"of {n_canaries} pairs is {2.0 ** -n_canaries:g}; the upper bound of 0 extractions in "
                   f"{n_canaries} is {upper:.2f}, above the 0.5 margin): a failed claim says nothing here; decide "
                   "them with --num-canaries 8 or more")
    return out


def base_digest(model) -> str:
    """sha256 of every OrthoLinear's INT4 base (packed weights, scales, zeros), in name order: equal digests are
    bit-identical bases."""
    from ..modules import ortho_modules

    h = hashlib.sha256()
    for name, m in sorted(ortho_modules(model).items()):
        h.update(name.encode())
        for t in (m.qweight, m.scales, m.zeros):
            if t is not None:
                h.update(t.detach().contiguous().view(torch.uint8).cpu().numpy().tobytes())
    return h.hexdigest()


class StreamedKillSwitch(KillSwitch):
    """Experiment 1 over a checkpoint directory: canaries and data as `KillSwitch`, arms built by `run_arms` from
    the checkpoint (the public model is never resident; see the module docstring).

    Args:
        path: a Hugging Face safetensors checkpoint directory with its tokenizer.
        budget_gib: the device budget (the profile's), for the offloaded models and the full fine-tune plan.
        workdir: where W1 is written (default: a temporary directory, removed by `close`).
        log: where progress lines go.
    """

    def __init__(self, path, size: Size = CHECKPOINT, seed: int = 0, fmt: str = "plain", text: str = "default",
                 device: str = "cuda", progress: bool = True, budget_gib: float | None = None, workdir=None,
                 log=print):
        from transformers import AutoTokenizer

        if size.lr_grid:  # each arm is trained once here, streamed from the checkpoint: no grid of lrs
            raise ValueError(f"a streamed checkpoint trains each arm at its budget's lr; got lr_grid {size.lr_grid} "
                             "(pass a Size with lr_grid={})")
        torch.manual_seed(seed)
        self.path = Path(path)
        tok = AutoTokenizer.from_pretrained(self.path)
        self.public = None  # never resident: each arm is built from the checkpoint when it is measured
        # measurements are not cached on disk: a path does not identify a checkpoint's contents
        self._prepare(str(self.path), tok, str(self.path), {"public_model": "checkpoint as stored",
                                                             "key": str(self.path)},
                      size, seed, fmt, text, device, progress, measure_cache=False)
        self.cuda = str(device).startswith("cuda")
        self.dtype = torch.bfloat16 if self.cuda else torch.float32
        self.budget_gib = budget_gib
        self.offload_gib = offload_budget_gib(budget_gib)
        self._own_workdir = workdir is None
        self.workdir = Path(tempfile.mkdtemp(prefix="libortho_exp1_")) if workdir is None else Path(workdir)
        self.w1: Path | None = None
        self.built: dict[str, dict] = {}
        self.skipped: dict[str, str] = dict(SKIPPED)
        self.full_ft: dict = {}
        self.did_not_fit: dict[str, str] = {}  # arm -> the out-of-memory error it met (the run went on)
        self.digests: dict[str, str] = {}
        self.log = log

    # -- helpers ------------------------------------------------------------------------------------
    def _measure(self, arm: str, model, alphas: dict) -> None:
        """Evaluate `model` once per {reported alpha: setter or None}, storing `KillSwitch.evaluate`'s entries."""
        for a, set_ in alphas.items():
            if set_ is not None:
                set_(model)
            self.results.setdefault(arm, {})[str(float(a))] = self.evaluate(model)

    def _record(self, arm: str, t0: float, built: str, **facts) -> None:
        s = round(time.perf_counter() - t0, 1)
        self.built[arm] = {"built": built, "seconds": s, **facts}
        if self.cuda:  # the run's peak so far (not reset: the CLI's meter reads the step's peak at its end)
            self.built[arm]["device_peak_gib_so_far"] = allocated_peak_gib(self.device)
        self.seconds[arm] = s
        self.log(f"  {arm}: {s:.1f} s ({built})")
        if not self.progress:  # a long run without bars still says where it is (a killed run's log shows how far)
            peak = self.built[arm].get("device_peak_gib_so_far")
            print(f"exp1: {arm} in {s:.1f} s" + (f", device peak so far {peak:.2f} GiB" if peak else ""),
                  file=sys.stderr)

    def _free(self, model) -> float:
        """Release `model`'s device memory (accelerate hooks included); GiB still allocated afterwards."""
        from ..stream import release

        return round(release(model) / 2**30, 3)  # release() collects garbage and empties the cache itself

    def _arm(self, arm: str, build, *args):
        """`build(*args)`, one arm; an out-of-memory error is recorded in `did_not_fit` and the run goes on with the
        device freed (the failed model is referenced only by the traceback, gone after the except clause).
        Returns what `build` returns, None when it did not fit."""
        from ..oom import is_oom

        try:
            return build(*args)
        except Exception as e:  # noqa: BLE001 - only out-of-memory is a result; anything else is raised
            if not is_oom(e):
                raise
            pkg = str(Path(importlib.import_module("libortho").__file__).resolve().parent)
            where = [f for f in traceback.extract_tb(e.__traceback__) if f.filename.startswith(pkg)]
            # where in the arm (conversion, masks, training, scoring): the innermost libortho frame
            at = f"in {where[-1].name} ({Path(where[-1].filename).name}:{where[-1].lineno}): " if where else ""
            msg = at + " ".join(str(e).split())[:300]
        gc.collect()
        if self.cuda:
            torch.cuda.empty_cache()
        if self.results.pop(arm, None) is not None:  # a half-measured arm is no result (its alpha 0 without its 1)
            msg += " (its partial measurements dropped)"
        self.did_not_fit[arm] = msg
        self.log(f"  {arm}: did not fit ({msg[:120]})")
        return None

    def _want(self, *arms: str) -> bool:
        return any(a in self.size.arms for a in arms)

    def _offloaded(self, path: Path, how: str):
        from ..models import LOAD_LOG
        from ..stream import load_offloaded

        m = load_offloaded(path, self.offload_gib, self.dtype, self.device)
        LOAD_LOG.append({"source": str(path), "bits": None, "dtype": str(self.dtype).removeprefix("torch."),
                         "device": str(self.device), "how": how, "reference": True})
        return m

    def _convert(self, path: Path, config: OrthoConfig, how: str, calibration=None, **kw):
        from ..convert import convert_checkpoint
        from ..models import LOAD_LOG

        m = convert_checkpoint(path, config, calibration=calibration, device=self.device, dtype=self.dtype,
                               head_bits=4, host_embeddings=True, progress=self.progress, **kw)
        LOAD_LOG.append({"source": str(path), "bits": 4, "dtype": str(self.dtype).removeprefix("torch."),
                         "device": str(self.device), "how": how})
        return m

    def _nf4(self, path: Path):
        from ..models import LOAD_LOG

        from ..stream import load_nf4

        m = load_nf4(path, self.device, self.dtype)
        LOAD_LOG.append({"source": str(path), "bits": 4, "dtype": str(self.dtype).removeprefix("torch."),
                         "device": str(self.device),
                         "how": "bitsandbytes NF4 layer by layer (stream.load_nf4), embeddings in host memory",
                         "quantized_linears": 7 * len(m.model.layers)})
        return m

    def _posthoc(self, score: str) -> OrthoConfig:
        return OrthoConfig(density=self.size.density, group_size=self.size.group_size, symmetric=self.size.symmetric,
                           mode="posthoc", score=score, seed=self.seed)

    # -- arms ---------------------------------------------------------------------------------------
    def never_trained(self) -> None:
        t0 = time.perf_counter()
        m = self._offloaded(self.path, f"accelerate offload, {self.offload_gib:g} GiB on the device (never_trained)")
        self.reference_stats(m)  # the loss-ratio reference of every arm's membership scores
        self._measure("never_trained", m, {1.0: None})
        left = self._free(m)
        self._record("never_trained", t0, f"the checkpoint in {str(self.dtype).removeprefix('torch.')}, accelerate "
                     f"offloading with {self.offload_gib:g} GiB on the device; also the MIA reference",
                     device_gib_after_release=left)

    def int4_of_public(self) -> None:
        from ..modules import set_alpha

        t0 = time.perf_counter()
        cfg = self._posthoc("magnitude")
        m = self._convert(self.path, cfg, "streamed conversion, posthoc (int4_of_public)")
        self.digests["int4_of_public"] = base_digest(m)
        self._measure("int4_of_public", m, {1.0: lambda x: set_alpha(x, 0.0)})
        left = self._free(m)
        self._record("int4_of_public", t0, f"convert_checkpoint posthoc (magnitude) of the checkpoint, INT4 RTN group "
                     f"{cfg.group_size} {'symmetric' if cfg.symmetric else 'asymmetric'}, measured at alpha 0 (the "
                     "INT4 base alone, the stream not read)", base_sha256=self.digests["int4_of_public"],
                     device_gib_after_release=left)

    def ortho_tuned(self) -> None:
        from ..modules import set_alpha

        t0 = time.perf_counter()
        m = self._convert(self.path, self.ocfg, "streamed conversion, ortho-tune (ortho_tuned)",
                          calibration=self.calib, loss_fn=self._loss(self.size.ortho), gradient_checkpointing=True)
        st = m.libortho_stats
        self.digests["ortho_tuned"] = base_digest(m)
        self.train_info["ortho_tuned"] = {"steps": st.get("steps"), "cached": False, "nnz": st.get("nnz"),
                                          "density": st.get("density"), "final_loss": (st.get("loss") or [None])[-1],
                                          "config": self.ocfg.to_dict(), "gradient_checkpointing": True}
        self._measure("ortho_tuned", m, {a: (lambda x, a=a: set_alpha(x, a))
                                         for a in self.size.alphas_for("ortho_tuned")})
        left = self._free(m)
        same = self.digests.get("int4_of_public")
        self._record("ortho_tuned", t0, f"convert_checkpoint with OrthoTuneConfig ({self.ocfg.score.value}, density "
                     f"{self.ocfg.density:g}) and canary_loss, gradient checkpointing, {st.get('steps')} steps",
                     base_sha256=self.digests["ortho_tuned"],
                     base_bit_identical_to_int4_of_public=None if same is None else same == self.digests["ortho_tuned"],
                     device_gib_after_release=left)

    def lora_arms(self) -> dict:
        """lora (adapter scale 0 and 1) and nf4_of_public (scale 0); returns the LoRA factors for W1."""
        from ..train import fit, lora_wrap, set_lora_alpha

        t0 = time.perf_counter()
        spec = LoraSpec()
        m = lora_wrap(self._nf4(self.path), spec, self.seed)
        params = [p for p in m.parameters() if p.requires_grad]
        hist = fit(m, params, self._loss(self.size.lora), self.size.lora, self.progress, "LoRA",
                   gradient_checkpointing=True)
        m.eval()
        self.train_info["lora"] = {"steps": hist["steps"], "cached": False, "config": spec.to_dict(),
                                   "final_loss": hist["loss"][-1], "base": "bitsandbytes NF4",
                                   "gradient_checkpointing": True}
        self._measure("lora", m, {a: (lambda x, a=a: set_lora_alpha(x, a)) for a in self.size.alphas_for("lora")})
        if "nf4_of_public" in self.size.arms:
            self.results["nf4_of_public"] = {"1.0": self.results["lora"]["0.0"]}
        factors = lora_factors(m)
        left = self._free(m)
        self._record("lora", t0, "QLoRA: NF4 base (stream.load_nf4: bitsandbytes, block 64, double quant, head "
                     f"unquantized), embeddings in host memory, PEFT LoRA r {spec.r}, alpha {spec.alpha}, dropout "
                     f"{spec.dropout} on {', '.join(spec.targets)}, gradient checkpointing, {hist['steps']} steps; "
                     "measured at adapter scale 0 and 1",
                     device_gib_after_release=left)
        if "nf4_of_public" in self.size.arms:
            self.built["nf4_of_public"] = {"built": "the lora model with its adapter at scale 0 (set_lora_alpha 0): "
                                                    "exactly the NF4 public model", "seconds": 0.0,
                                           "measured_as": "lora@0.0"}
        return factors

    def build_w1(self, factors: dict) -> None:
        t0 = time.perf_counter()
        self.w1 = self.workdir / "w1"
        facts = merge_lora_checkpoint(self.path, self.w1, factors)
        self.built["w1"] = {"built": "the LoRA deltas (scale * B @ A) merged onto the stored weights tensor by tensor "
                                     "on the CPU, one shard in memory at a time", "path": str(self.w1), **facts,
                            "seconds": round(time.perf_counter() - t0, 1)}

    def full_finetune_w1(self, plan: dict) -> None:
        """W1 = a full fine-tune of the checkpoint (the budget holds it): loaded whole, AdamW on every weight."""
        from transformers import AutoModelForCausalLM

        from ..models import LOAD_LOG
        from ..train import full_finetune_

        t0 = time.perf_counter()
        m = AutoModelForCausalLM.from_pretrained(self.path, dtype=torch.float32).to(self.device)
        LOAD_LOG.append({"source": str(self.path), "bits": None, "dtype": "float32", "device": str(self.device),
                         "how": f"full fine-tune (asked; planned {plan['planned_gib']} GiB fits)", "reference": True})
        hist = full_finetune_(m, self._loss(self.size.finetune), self.size.finetune, self.progress)
        self.train_info["fine_tuned"] = {"steps": hist["steps"], "cached": False, "final_loss": hist["loss"][-1]}
        self.w1 = self.workdir / "w1"
        m.to(self.dtype).save_pretrained(self.w1)
        self.tok.save_pretrained(self.w1)
        self._free(m)
        self.built["w1"] = {"built": "full fine-tune of the checkpoint (AdamW on every weight), saved as safetensors",
                            "path": str(self.w1), "seconds": round(time.perf_counter() - t0, 1)}

    def fine_tuned(self) -> None:
        t0 = time.perf_counter()
        m = self._offloaded(self.w1, f"accelerate offload, {self.offload_gib:g} GiB on the device (fine_tuned = W1)")
        self._measure("fine_tuned", m, {1.0: None})
        left = self._free(m)
        self._record("fine_tuned", t0, f"W1 ({self.built['w1']['built']}), accelerate offloading with "
                     f"{self.offload_gib:g} GiB on the device", device_gib_after_release=left)

    def posthoc_of_w1(self, score: str) -> None:
        from ..modules import set_alpha

        t0 = time.perf_counter()
        arm = f"posthoc_{score}"
        cfg = self._posthoc(score)
        m = self._convert(self.w1, cfg, f"streamed conversion of W1, posthoc {score}",
                          calibration=self.calib if score == "hessian" else None)
        self._measure(arm, m, {a: (lambda x, a=a: set_alpha(x, a)) for a in self.size.alphas_for(arm)})
        left = self._free(m)
        self._record(arm, t0, f"convert_checkpoint(W1) posthoc, score {score}, density {cfg.density:g}, INT4 RTN "
                     f"group {cfg.group_size} {'symmetric' if cfg.symmetric else 'asymmetric'}",
                     device_gib_after_release=left)
        if score == "hessian" and "int4_of_fine_tuned" in self.size.arms:
            self.results["int4_of_fine_tuned"] = {"1.0": self.results[arm]["0.0"]}
            self.built["int4_of_fine_tuned"] = {"built": "posthoc_hessian at alpha 0: the INT4 RTN base of W1 alone "
                                                         "(the stream not read)", "seconds": 0.0,
                                                "measured_as": f"{arm}@0.0"}

    def nf4_of_fine_tuned(self) -> None:
        t0 = time.perf_counter()
        m = self._nf4(self.w1)
        self._measure("nf4_of_fine_tuned", m, {1.0: None})
        left = self._free(m)
        self._record("nf4_of_fine_tuned", t0, "load_nf4(W1): bitsandbytes NF4 (block 64, double quant) layer "
                     "by layer, "
                     "head in the compute dtype, embeddings in host memory",
                     device_gib_after_release=left)

    # -- the run ------------------------------------------------------------------------------------
    def run_arms(self, full_finetune: bool = False) -> None:
        """Build and measure every arm of the size, one model on the device at a time; with `full_finetune`, W1 is
        a full fine-tune (`run_checkpoint` refuses one the budget does not hold before any arm)."""
        plan = full_finetune_plan(self.path, self.budget_gib)
        self.full_ft = {"asked": full_finetune, **plan}
        self.log(f"exp1 (streamed): {self.path}, {len(self.canaries)} canaries, device {self.device}, "
                 f"offload {self.offload_gib:g} GiB")
        self.never_trained()  # always: the MIA reference of every arm (nothing is measured without it)
        if self._want("int4_of_public"):
            self._arm("int4_of_public", self.int4_of_public)
        if self._want("ortho_tuned"):
            self._arm("ortho_tuned", self.ortho_tuned)
        w1_arms = [a for a in self.size.arms if a in ("fine_tuned", "int4_of_fine_tuned", "nf4_of_fine_tuned")
                   or a.startswith("posthoc_")]
        full = full_finetune and plan["fits"]
        factors = None
        if self._want("lora", "nf4_of_public") or (w1_arms and not full):  # W1 is the LoRA merge unless full
            factors = self._arm("lora", self.lora_arms)
        if w1_arms and (full or factors is not None):
            if full:
                self._arm("full_finetune", self.full_finetune_w1, plan)
            else:
                self.build_w1(factors)
        if w1_arms and self.w1 is None:
            for arm in w1_arms:
                self.skipped[arm] = f"needs W1, which was not built ({'full_finetune' if full else 'lora'} did not fit)"
        elif w1_arms:
            if self._want("fine_tuned"):
                self._arm("fine_tuned", self.fine_tuned)
            for score in ("hessian", "magnitude", "random"):
                if self._want(f"posthoc_{score}") or (score == "hessian" and self._want("int4_of_fine_tuned")):
                    self._arm(f"posthoc_{score}", self.posthoc_of_w1, score)
            if self._want("nf4_of_fine_tuned"):
                self._arm("nf4_of_fine_tuned", self.nf4_of_fine_tuned)
        for arm in ("posthoc_magnitude", "posthoc_random"):
            if arm not in self.size.arms:
                self.skipped.setdefault(arm, "not in this size (each is one more conversion of W1)")
        self.full_ft["built"] = bool(full)

    def refusal(self, candidate: str) -> StepOutOfMemory | None:
        """The out-of-memory error that ends the run once every arm that fits is measured: the candidate, its
        control or an asked full fine-tune did not fit. None otherwise."""
        for arm in (candidate, CONTROL_OF[candidate], "full_finetune"):  # what the run was asked to decide / build
            if arm in self.did_not_fit:
                return StepOutOfMemory(f"{arm} did not fit ({self.did_not_fit[arm][:200]}); every other arm is "
                                       "measured and saved")
        return None

    def report(self, candidate: str = "ortho_tuned", thresholds: dict | None = None) -> dict:
        inner = super().report(candidate, thresholds)
        inner.update(streamed=True, checkpoint=str(self.path), built=self.built, skipped=self.skipped,
                     did_not_fit=self.did_not_fit, full_fine_tune=self.full_ft, budget_gib=self.budget_gib,
                     offload_gib=self.offload_gib, dtype=str(self.dtype).removeprefix("torch."))
        inner["mia"]["reference"] = "the checkpoint in full precision, offloaded (never_trained)"
        inner["notes"] = notes(len(self.canaries))
        return inner

    def partial(self) -> dict:
        """What is measured so far, for a run that stopped early (no claims)."""
        return {"streamed": True, "status": "partial", "model": self.name, "arms": self.results, "built": self.built,
                "skipped": self.skipped, "did_not_fit": self.did_not_fit, "full_fine_tune": self.full_ft,
                "training": self.train_info, "arm_seconds": self.seconds, "oom_retries": self.oom_events,
                "num_canaries": len(self.canaries), "size": self.size.to_dict()}

    def close(self) -> None:
        """Remove W1 (and the temporary directory) when this object made it."""
        if self._own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)


def run_checkpoint(ctx: RunContext, size: Size | None = None, candidate: str = "ortho_tuned",
                   thresholds: dict | None = None, full_finetune: bool | None = None, workdir=None,
                   arms: tuple[str, ...] | None = None) -> dict:
    """Experiment 1 of the checkpoint directory `ctx.model` (see the module docstring): the JSON section of
    `kill_switch.run`, plus "streamed", "built" (how each arm was built, its seconds), "skipped" and
    "full_fine_tune".

    Args:
        full_finetune: build W1 as a full fine-tune (default `ctx.extra["full_finetune"]`, the `--full-finetune` flag).
        workdir: where W1 is written and kept (default: a temporary directory, removed at the end).
        arms: the arms to build (default the size's).
    Raises:
        PlannedOutOfMemory: a full fine-tune asked that the budget does not hold, before any arm is built.
    """
    size = size or CHECKPOINT
    if arms is not None:
        size = replace(size, arms=tuple(arms))
    if ctx.num_canaries:
        size = replace(size, num_canaries=ctx.num_canaries, num_holdout=ctx.num_canaries)
    if candidate not in CANDIDATES or candidate not in size.arms or CONTROL_OF[candidate] not in size.arms:
        raise ValueError(f"--candidate {candidate}: not built at checkpoint scale; choose from "
                         f"{', '.join(a for a in CANDIDATES if a in size.arms and CONTROL_OF[a] in size.arms)}")
    full_finetune = bool(ctx.extra.get("full_finetune")) if full_finetune is None else full_finetune
    if full_finetune:  # checked before any computation: minutes of other arms are no use to who asked for this one
        p = full_finetune_plan(ctx.model, ctx.budget_gib)
        if not p["fits"]:
            err = PlannedOutOfMemory(
                f"full_finetune planned {p['planned_gib']:g} GiB ({p['parameters'] / 1e9:.2f}B parameters x "
                f"{p['bytes_per_parameter']} bytes for AdamW, activations not counted) over the {p['budget_gib']:g} "
                "GiB budget: refused before any arm (drop --full-finetune: W1 is then the QLoRA merge)")
            err.partial_section = {"streamed": True, "status": "refused", "full_fine_tune": {"asked": True, **p}}
            raise err
    log = print if ctx.progress else (lambda *_: None)
    exp = StreamedKillSwitch(ctx.model, size, ctx.seed, ctx.canary_format, ctx.text, ctx.device, ctx.progress,
                             ctx.budget_gib, workdir, log)
    t0 = time.perf_counter()
    try:
        exp.run_arms(full_finetune)
        err = exp.refusal(candidate)
        if err is not None and {candidate, CONTROL_OF[candidate]} & exp.did_not_fit.keys():
            raise err  # the claims cannot be decided (a full fine-tune that ran out of memory leaves them decidable)
        inner = exp.report(candidate, thresholds_for(size.name, thresholds))
        inner["seconds"] = round(time.perf_counter() - t0, 1)
        inner["plot"] = str(plot(inner, ctx.artifact("exp1_kill_switch.png")))
        print_table(inner)
        for arm, msg in exp.did_not_fit.items():
            print(f"did not fit: {arm}: {msg}")
        for note in inner["notes"]:
            print(f"note: {note}")
        if err is not None:
            err.partial_section = inner
            raise err
        return inner
    except BaseException as e:  # KeyboardInterrupt / SIGTERM too: the arms measured so far go into the JSON
        if getattr(e, "partial_section", None) is None:
            try:
                e.partial_section = exp.partial()
            except Exception:  # noqa: BLE001 - the original error is what the user needs
                pass
        raise
    finally:
        exp.close()


@register("kill_switch")
def run(ctx: RunContext, size: Size | None = None, arms: tuple[str, ...] | None = None, candidate: str | None = None,
        thresholds: dict | None = None, streamed: bool | None = None) -> dict:
    """`run --experiment 1`: `run_checkpoint` when `streamed` (default `ctx.streamed`: a checkpoint directory whose
    full precision misses the GPU budget), else the in-memory experiment (`kill_switch.run`)."""
    if not (ctx.streamed if streamed is None else streamed):
        if ctx.extra.get("full_finetune"):
            raise ValueError("--full-finetune applies to a checkpoint too large for the device (the streamed "
                             "experiment); the in-memory experiment always fine-tunes in full: drop the flag")
        return kill_switch.run(ctx, size, arms, candidate, thresholds)
    candidate = candidate or ctx.extra.get("candidate") or "ortho_tuned"
    # same seed, same numbers: no atomics-order noise in backward; restored after (later experiments, other tests)
    before = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled())
    if str(ctx.device).startswith("cuda"):
        torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        return run_checkpoint(ctx, size, candidate, thresholds, arms=arms)
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])
