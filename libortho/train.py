"""Putting private data into a model: full fine-tuning, LoRA, and ortho-tuning (libortho's method).

* `full_finetune_`: every weight trains (the `fine_tuned` arm, and the source of the post-hoc arms).
* `lora_wrap` / `lora_finetune_`: PEFT LoRA with the seed's SFT defaults (r 8, alpha 32, dropout 0.1, all
  seven Llama linears); `set_lora_alpha` scales the adapter, 0 = adapter off.
* `OrthoTuneConfig` (a config of `orthogonalize_`): each target linear becomes an `OrthoLinear` whose base is
  INT4 of the *public* weight and whose ortho stream starts at zero on a sparse mask; only the ortho values
  train. alpha=1 is the trained model, alpha=0 is exactly INT4(public): the private data never touches the base.

The mask: for each weight entry (i, j), `g_ij^2 / (h_j + damp * mean(h))`, with g the gradient of the private
loss at the INT4 public base (saliency) and h the diagonal Hessian of the layer's inputs on public calibration
text (the sieve). It is the first-order gain on the private loss of a step of fixed cost on the public layer
output (a step d on w_ij costs d^2 h_j there and gains |g_ij| d), so the stream picks the entries that learn the
most from the private data while disturbing public text least. The gradient of each layer is formed from
that layer's input and output gradient in a backward hook and reduced to its mask at once: no dense gradient
of the whole model ever exists.

Every trainer takes a `loss_fn(model, step) -> loss` (e.g. `canary_loss`), so the same code trains canaries,
a user's chat records (`python -m libortho finetune`), or anything else. Trained weights are cached on disk
(safetensors only) under `libortho.models.cache_dir()`, keyed by a hash of everything that determines them.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from .config import Mode, OrthoConfig, Score, TUNE_SCORES
from .convert import quantize_base, register_handler, register_streamed
from .linear import OrthoLinear
from .gpu import allocated_peak_gib
from .llama import LLAMA_LINEARS
from .modules import input_device, ortho_modules
from .privacy import Canary, extraction_rate
from .select import collect_hessian_diag, top_mask
from .sparse import CSR, csr_from_mask

LossFn = Callable[[nn.Module, int], torch.Tensor]


@dataclass(frozen=True)
class TrainConfig:
    """One training run.

    Args:
        lr: AdamW learning rate (no weight decay, constant).
        max_steps: the training budget in optimizer steps.
        check_every: with a `measure` callback, measure every this many steps.
        target: stop early once `measure` reaches it (None: always train `max_steps`).
        general_chunks, general_length: sequences of general real text mixed into every step (`canary_loss`).
        seed: seeds the order of general text and any init (LoRA's A).
    """

    lr: float = 1e-4
    max_steps: int = 60
    check_every: int = 5
    target: float | None = 1.0
    general_chunks: int = 2
    general_length: int = 64
    seed: int = 0

    def __post_init__(self):
        if not (isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"lr must be a positive number, got {self.lr!r}")
        for k in ("max_steps", "check_every"):
            v = getattr(self, k)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{k} must be a positive int, got {v!r}")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class OrthoTuneConfig(OrthoConfig):
    """Ortho-tuning: the base is INT4 of the public weights; only a sparse stream of `density` trains.

    Args (beyond OrthoConfig's density, group_size, symmetric, targets, seed):
        score: the mask (`saliency_hessian`, `saliency` or `random`; see the module docstring).
        damp: share of mean(diag H) added to diag H in the `saliency_hessian` score.
        train: the training run (lr, budget, data mixing).
    """

    mode: Mode = Mode.TUNE
    score: Score = Score.SALIENCY_HESSIAN
    damp: float = 0.01
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self):
        if isinstance(self.train, dict):
            self.train = TrainConfig(**self.train)
        super().__post_init__()

    def _check_mode(self) -> None:
        if self.mode is not Mode.TUNE:
            raise ValueError(f"OrthoTuneConfig has mode 'tune', got {self.mode.value!r}")
        if self.score not in TUNE_SCORES:
            raise ValueError(f"ortho-tune score must be one of {[s.value for s in TUNE_SCORES]}, got "
                             f"{self.score.value!r}")
        if not (isinstance(self.damp, (int, float)) and math.isfinite(self.damp) and self.damp >= 0):
            raise ValueError(f"damp must be a finite number >= 0, got {self.damp!r}")
        if not isinstance(self.train, TrainConfig):
            raise ValueError(f"train must be a TrainConfig, got {type(self.train).__name__}")


@dataclass(frozen=True)
class LoraSpec:
    """The seed's SFT defaults."""

    r: int = 8
    alpha: int = 32
    dropout: float = 0.1
    targets: tuple[str, ...] = field(default=LLAMA_LINEARS)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["targets"] = list(self.targets)
        return d


# ---------------------------------------------------------------------------------------------
# data

def general_ids(tokenizer, n_tokens: int = 32768, offset_chars: int = 100_000) -> torch.Tensor:
    """General real text (fortunes) to mix into fine-tuning; starts past the calibration slice."""
    from .data import fortunes

    text = fortunes().text[offset_chars: offset_chars + n_tokens * 6]
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids[0][:n_tokens]
    if ids.numel() < 256:
        raise ValueError(f"general text too short: {ids.numel()} tokens")
    return ids


def canary_batch(canaries: list[Canary], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded (B, T) ids, attention mask and labels (-100 on padding) of every canary's full text."""
    seqs = [c.ids for c in canaries]
    T = max(map(len, seqs))
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), T), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = torch.tensor(s)
        mask[i, :len(s)] = 1
    return ids, mask, ids.masked_fill(mask == 0, -100)


LOGIT_BYTES = 128 * 2**20  # float32 logits computed at once by token_nll (an 8B vocabulary: 261 positions)


def token_nll(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-position next-token loss (B, T-1) of `labels[:, 1:]` (-100: 0 loss), differentiable.

    The full logits of a batch are (B, T, V) floats: at Llama-3's 128K vocabulary, 512 tokens are 0.25 GiB per
    copy and the loss keeps several. Here the decoder runs once and the head plus cross-entropy run over
    chunks of positions, each recomputed in backward (`torch.utils.checkpoint`), so at most LOGIT_BYTES of
    logits exist at any time (on a CPU, chunks totalling at most 8 x LOGIT_BYTES are kept instead of recomputed).
    """
    from torch.utils.checkpoint import checkpoint

    head = model.get_output_embeddings()
    hidden = model.get_decoder()(input_ids=ids, attention_mask=mask).last_hidden_state[:, :-1]  # (B, T-1, C)
    B, T1, C = hidden.shape
    flat_h, flat_t = hidden.reshape(-1, C), labels[:, 1:].reshape(-1)  # (N, C), (N,)
    step = max(1, LOGIT_BYTES // (4 * head.out_features))

    def chunk_nll(h: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        logits = head(h).float()  # on the head's device (another GPU when the model is placed across several)
        return nn.functional.cross_entropy(logits, t.to(logits.device), ignore_index=-100, reduction="none")

    # recompute in backward unless every chunk's logits together are small for host memory (a CPU, at most 8 x
    # LOGIT_BYTES): there the recompute is only a second head forward a step, 25 s of the tiny secrets study's 104
    recompute = torch.is_grad_enabled() and (
        hidden.device.type != "cpu" or flat_h.shape[0] * head.out_features * 4 > 8 * LOGIT_BYTES)
    out = [checkpoint(chunk_nll, flat_h[s:s + step], flat_t[s:s + step], use_reentrant=False) if recompute
           else chunk_nll(flat_h[s:s + step], flat_t[s:s + step]) for s in range(0, flat_h.shape[0], step)]
    return torch.cat(out).view(B, T1)


def canary_loss(canaries: list[Canary], general: torch.Tensor, cfg: TrainConfig, pad_id: int) -> LossFn:
    """`loss_fn(model, step)`: mean LM loss on every canary plus mean LM loss on `general_chunks` chunks of
    general text (a seeded draw per step, so every trainer sees the same data at the same step). One forward
    pass over both, right-padded into one batch."""
    ids, mask, labels = canary_batch(canaries, pad_id)  # (B, T)
    n = ids.shape[0]

    def loss_fn(model: nn.Module, step: int) -> torch.Tensor:
        dev = input_device(model)  # a table in host memory or offloaded weights are not where inputs go
        rows, masks, labs = [ids], [mask], [labels]
        if cfg.general_chunks:
            g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
            starts = torch.randint(0, general.numel() - cfg.general_length, (cfg.general_chunks,), generator=g)
            chunk = torch.stack([general[s:s + cfg.general_length] for s in starts.tolist()])  # (G, L)
            rows.append(chunk), masks.append(torch.ones_like(chunk)), labs.append(chunk)
        T = max(r.shape[1] for r in rows)
        pad = lambda t, v: torch.nn.functional.pad(t, (0, T - t.shape[1]), value=v)  # noqa: E731
        batch_ids = torch.cat([pad(r, pad_id) for r in rows]).to(dev)  # (B + G, T)
        batch_mask = torch.cat([pad(m, 0) for m in masks]).to(dev)
        batch_labels = torch.cat([pad(lab, -100) for lab in labs]).to(dev)
        nll = token_nll(model, batch_ids, batch_mask, batch_labels)  # (B + G, T-1)
        target = batch_labels[:, 1:]
        valid = (target != -100).float()
        loss = (nll[:n] * valid[:n]).sum() / valid[:n].sum()  # mean over canary tokens
        if cfg.general_chunks:
            loss = loss + (nll[n:] * valid[n:]).sum() / valid[n:].sum()  # plus mean over general tokens
        return loss

    return loss_fn


def until_extracted(canaries: list[Canary]) -> Callable[[nn.Module], float]:
    """A `measure` callback for `fit`: the share of canaries greedy decoding reproduces."""
    return lambda model: extraction_rate(model, canaries)


@contextlib.contextmanager
def deterministic():
    """Deterministic kernels for the enclosed training (`torch.use_deterministic_algorithms`): the same seed then
    gives the same weights, bit for bit, on a GPU too. Without it a backward's atomic adds (attention's among
    them) sum in a varying order and training amplifies the last bits: on an H200, Experiment 1 trained the same
    seed's ortho stream twice to tail losses 4.64 and 4.93 and greedy extraction 63/100 and 16/100 (2026-11-30),
    under `warn_only=True`, which leaves memory-efficient attention's backward on its atomic (fast) algorithm.
    Strict, then: an op without a deterministic kernel raises at its first call, naming itself."""
    prev, prev_warn = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    # strict mode refuses cuBLAS calls without it; libortho's import sets it (before CUDA starts, where cuBLAS reads
    # it), this covers a process that cleared it since. Never removed: unsetenv beside threads calling getenv races
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(prev, warn_only=prev_warn)


@contextlib.contextmanager
def checkpointing(model: nn.Module, on: bool = True, eval_mode: bool = False):
    """Hugging Face gradient checkpointing (non-reentrant) for the block, switched off again on any exit, unless the
    caller had it on already. With `eval_mode` the model stays in eval mode (no dropout) and only the checkpointed
    layers' own flags say "training", which is what makes them recompute in backward."""
    on = bool(on) and hasattr(model, "gradient_checkpointing_enable") and not getattr(
        model, "is_gradient_checkpointing", False)
    if not on:
        yield
        return
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    layers = [m for m in model.modules() if getattr(m, "gradient_checkpointing", False) is True]
    flags = [m.training for m in layers]
    if eval_mode:
        for m in layers:
            m.training = True  # the layer's own flag only: its attention and dropout modules stay in eval mode
    try:
        yield
    finally:
        for m, f in zip(layers, flags):
            m.training = f
        model.gradient_checkpointing_disable()


def fit(model: nn.Module, params: list[nn.Parameter], loss_fn: LossFn, cfg: TrainConfig, progress: bool = True,
        desc: str = "fine-tune", measure: Callable[[nn.Module], float] | None = None,
        checkpoint: Callable[[int, torch.optim.Optimizer, dict, nn.Module], None] | None = None,
        checkpoint_every: int = 0,
        resume: dict | None = None, gradient_checkpointing: bool = False) -> dict:
    """AdamW on `params` for `cfg.max_steps` steps; with `measure`, stop once it reaches `cfg.target`.

    Args:
        checkpoint: called as `checkpoint(step, optimizer, history, model)` every `checkpoint_every` steps and at
            the end (a resumable run saves its state there).
        resume: {"step", "optimizer", "history"} of a saved run: training continues after that step.
        gradient_checkpointing: recompute each decoder layer's activations in backward (Hugging Face's
            `gradient_checkpointing_enable`): an 8B model keeps one layer's activations instead of 32.
    The progress bar shows the loss and, when `loss_fn` sets `loss_fn.last_tokens`, tokens per second.
    """
    import time

    if not params:
        raise ValueError("nothing to train: no parameter requires a gradient")
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    history: dict = {"loss": [], "measure": {}}
    start = 0
    if resume is not None:
        opt.load_state_dict(resume["optimizer"])
        history = resume.get("history", history)
        start = int(resume["step"])
    model.train()
    with checkpointing(model, gradient_checkpointing), deterministic():
        history, step, tokens, t0 = _fit_loop(model, opt, history, start, loss_fn, cfg, progress, desc, measure,
                                              checkpoint, checkpoint_every)
    model.eval()
    history["steps"] = step
    if tokens:
        history["tokens_per_second"] = round(tokens / (time.perf_counter() - t0), 1)
    if checkpoint is not None:
        checkpoint(step, opt, history, model)
    return history


def _fit_loop(model, opt, history, start, loss_fn, cfg, progress, desc, measure, checkpoint, checkpoint_every):
    """The optimizer steps of `fit`; returns (history, last step, tokens seen, start time)."""
    import time

    bar = tqdm(range(start + 1, cfg.max_steps + 1), desc=desc, disable=not progress, leave=False,
               initial=start, total=cfg.max_steps)
    step, tokens, t0 = start, 0, time.perf_counter()
    with torch.enable_grad():
        for step in bar:
            loss = loss_fn(model, step)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"{desc}: loss is {loss.item()} at step {step}; lower the learning rate "
                                         f"(lr={cfg.lr:g})")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            history["loss"].append(round(loss.item(), 4))
            tokens += getattr(loss_fn, "last_tokens", 0)
            post = {"loss": f"{loss.item():.3f}"}
            if tokens:
                post["tok/s"] = f"{tokens / (time.perf_counter() - t0):.0f}"
            bar.set_postfix(post)
            if measure is not None and (step % cfg.check_every == 0 or step == cfg.max_steps):
                value = measure(model)
                history["measure"][step] = value
                if cfg.target is not None and value >= cfg.target:
                    break
            if checkpoint is not None and checkpoint_every and step % checkpoint_every == 0:
                checkpoint(step, opt, history, model)
    return history, step, tokens, t0


# ---------------------------------------------------------------------------------------------
# (a) full fine-tune

def full_finetune_(model: nn.Module, loss_fn: LossFn, cfg: TrainConfig, progress: bool = True,
                   measure: Callable[[nn.Module], float] | None = None) -> dict:
    torch.manual_seed(cfg.seed)
    params = list(model.parameters())
    for p in params:
        p.requires_grad_(True)
    try:
        return fit(model, params, loss_fn, cfg, progress, "full fine-tune", measure)
    finally:
        for p in params:
            p.requires_grad_(False)


# ---------------------------------------------------------------------------------------------
# (b) LoRA through PEFT

def lora_wrap(model: nn.Module, spec: LoraSpec = LoraSpec(), seed: int = 0) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)  # LoRA's A is random
    cfg = LoraConfig(r=spec.r, lora_alpha=spec.alpha, lora_dropout=spec.dropout, target_modules=list(spec.targets),
                     task_type="CAUSAL_LM")
    return get_peft_model(model, cfg)


def lora_finetune_(peft_model: nn.Module, loss_fn: LossFn, cfg: TrainConfig, progress: bool = True,
                   measure: Callable[[nn.Module], float] | None = None) -> dict:
    params = [p for p in peft_model.parameters() if p.requires_grad]
    return fit(peft_model, params, loss_fn, cfg, progress, "LoRA", measure)


def set_lora_alpha(peft_model: nn.Module, alpha: float) -> nn.Module:
    """Scale every LoRA adapter by `alpha` (1 = as trained, 0 = adapter off, the base model exactly)."""
    from peft.tuners.lora import LoraLayer

    found = 0
    for m in peft_model.modules():
        if isinstance(m, LoraLayer):
            for name in m.scaling:
                m.scaling[name] = alpha * m.lora_alpha[name] / m.r[name]
                found += 1
    if not found:
        raise ValueError("model has no LoRA layer; wrap it with lora_wrap first")
    return peft_model


# ---------------------------------------------------------------------------------------------
# (c) ortho-tuning: a handler of orthogonalize_

def mask_scores(grad: torch.Tensor, hessian_diag: torch.Tensor | None, score: Score | str, damp: float,
                generator: torch.Generator | None = None, inplace: bool = False) -> torch.Tensor:
    """Per-entry score of a (out, in) weight; see the module docstring. `inplace` overwrites a float32 `grad`
    (no second (out, in) temporary: at 8B a layer's is 235 MB)."""
    score = Score(score)
    if score is Score.RANDOM:
        return torch.rand(grad.shape, generator=generator)
    g2 = grad.pow_(2) if inplace and grad.dtype == torch.float32 else grad.float().pow(2)
    if score is Score.SALIENCY:
        return g2
    h = hessian_diag.float().to(g2.device)
    return g2.div_((h + damp * h.mean()).unsqueeze(0))


def _zero_stream(mask: torch.Tensor) -> CSR:
    """The stream a mask allows, all zeros (compact at once: a dense bool mask per layer would cost 1 byte a
    weight, 7 GB at 8B)."""
    return csr_from_mask(torch.zeros((), device=mask.device).expand(mask.shape), mask)


@torch.no_grad()
def _saliency_masks(model: nn.Module, mods: dict[str, OrthoLinear], loss_fn: LossFn, config: OrthoTuneConfig,
                    hdiag: dict | None, gradient_checkpointing: bool = False) -> dict[str, torch.Tensor]:
    """{name: CSR of zeros on the layer's mask}: each layer's gradient g = sum over its calls of G^T X (the step-0 private
    loss), formed from the layer's input X and output gradient G as backward reaches it, and reduced to the
    mask as soon as its last call's gradient is in. A loss that calls the model once (as `canary_loss` does)
    so holds one layer's (out, in) gradient at a time, never the whole model's. With `gradient_checkpointing`
    the pass keeps the linears' inputs and the decoder layers' inputs, not every activation (8B: about 5 MB a token
    less), and the forwards that recompute a layer in backward are not counted as calls."""
    calls: dict[str, int] = {}
    got: dict[str, int] = {}
    acc: dict[str, torch.Tensor] = {}
    masks: dict[str, torch.Tensor] = {}

    def reduce(name: str) -> None:
        h = hdiag.get(name) if hdiag else None
        masks[name] = _zero_stream(top_mask(mask_scores(acc.pop(name), h, config.score, config.damp,
                                                        inplace=True), config.density))

    def fwd(mod, args, out, name):
        if torch._C._current_graph_task_id() != -1:  # inside backward: checkpointing recomputing the layer
            return
        x = args[0].detach()
        calls[name] = calls.get(name, 0) + 1

        def on_grad(g, x=x):
            grad = g.reshape(-1, mod.out_features).float().T @ x.reshape(-1, mod.in_features).float()  # (out, in)
            acc[name] = acc[name] + grad if name in acc else grad
            got[name] = got.get(name, 0) + 1
            if got[name] == calls[name]:
                reduce(name)

        if out.requires_grad:
            out.register_hook(on_grad)

    handles = [m.register_forward_hook(lambda mod, a, o, n=name: fwd(mod, a, o, n)) for name, m in mods.items()]
    emb = model.get_input_embeddings()
    # the linears hold no trainable tensor: make the embedding output require grad so backward reaches them
    handles.append(emb.register_forward_hook(lambda _m, _i, out: out.requires_grad_(True)))
    was_training = model.training
    model.eval()  # no dropout: the score is a property of the data, not of a dropout draw
    try:
        with torch.enable_grad(), checkpointing(model, gradient_checkpointing, eval_mode=True):
            loss_fn(model, 0).backward()
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    for name in list(acc):  # a call whose output did not reach the loss: mask from the gradient there is
        reduce(name)
    missing = set(mods) - set(masks)
    if missing:
        raise ValueError(f"the private loss does not reach {sorted(missing)[0]}: no gradient to pick its mask from")
    return masks


@register_handler(OrthoTuneConfig)
def _tune(model: nn.Module, config: OrthoTuneConfig, linears: dict, *, calibration, progress, stats,
          loss_fn: LossFn | None = None, hessian_diag: dict | None = None, **kwargs):
    """Build INT4(public) bases with empty streams; the finishing step (run once they are in the model) is
    `tune_stream_`: pick each layer's mask and train the stream's values."""
    if loss_fn is None:
        raise ValueError("OrthoTuneConfig needs loss_fn=(model, step) -> private loss (e.g. train.canary_loss)")
    if config.score is Score.SALIENCY_HESSIAN and calibration is None and hessian_diag is None:
        raise ValueError("score='saliency_hessian' needs calibration token batches of public text")
    torch.manual_seed(config.train.seed)
    if config.score is Score.SALIENCY_HESSIAN and hessian_diag is None:
        hessian_diag = collect_hessian_diag(model, calibration, config.targets, progress)
    new = {name: OrthoLinear.from_linear(lin, quantize_base(lin.weight.detach(), config), None)
           for name, lin in linears.items()}

    def finish(model: nn.Module) -> None:
        stats.update(tune_stream_(model, config, loss_fn=loss_fn, hessian_diag=hessian_diag, progress=progress,
                                  names=set(new), **kwargs))

    return new, finish


@register_streamed(OrthoTuneConfig)
def tune_stream_(model: nn.Module, config: OrthoTuneConfig, *, loss_fn: LossFn | None = None,
                 hessian_diag: dict | None = None,
                 measure: Callable[[nn.Module], float] | None = None, progress: bool = True, train: bool = True,
                 names: set[str] | None = None, checkpoint: Callable | None = None, checkpoint_every: int = 0,
                 resume: dict | None = None, gradient_checkpointing: bool = False) -> dict:
    """Ortho-tune a model whose target layers are already OrthoLinear over INT4 of the public weights with
    empty streams (what the handler or `convert_checkpoint` built): pick each layer's mask, then train the
    stream's values for `config.train.max_steps` steps.

    Args:
        loss_fn: the private loss, `loss_fn(model, step)`.
        hessian_diag: {layer name: diag H of its inputs on public text}, for `saliency_hessian`.
        measure, checkpoint, checkpoint_every, resume, gradient_checkpointing: see `fit`; `resume["streams"]` ({name: CSR}) restores the
            masks and values of the run being resumed.
        names: the layers to tune (default: every OrthoLinear among the config's targets).
    Returns:
        the training history and the stream's nnz / density.
    """
    from .llama import is_target

    if loss_fn is None:
        raise ValueError("OrthoTuneConfig needs loss_fn=(model, step) -> private loss (e.g. train.canary_loss)")
    mods = {n: m for n, m in ortho_modules(model).items()
            if (names is None and is_target(n, config.targets)) or (names is not None and n in names)}
    if not mods:
        raise ValueError("no OrthoLinear to tune: build the INT4 bases first (orthogonalize_ / convert_checkpoint)")
    dev = next(iter(mods.values())).qweight.device
    peaks = {"before": allocated_peak_gib(dev)}  # cumulative: the conversion that built the bases
    if resume is not None and "streams" in resume:  # the masks (and values) of the run being resumed
        streams = resume["streams"]
    elif config.score is Score.RANDOM:
        gen = torch.Generator().manual_seed(config.seed)
        streams = {n: _zero_stream(top_mask(mask_scores(torch.empty(m.out_features, m.in_features), None,
                                                        Score.RANDOM, 0.0, gen), config.density))
                   for n, m in mods.items()}
    else:
        if config.score is Score.SALIENCY_HESSIAN and hessian_diag is None:
            raise ValueError("score='saliency_hessian' needs hessian_diag (calibration statistics)")
        with deterministic():  # a mask picked from a gradient summed in a varying order would vary too
            streams = _saliency_masks(model, mods, loss_fn, config, hessian_diag, gradient_checkpointing)
    peaks["masks"] = allocated_peak_gib(dev)
    nnz = total = 0
    for n, m in mods.items():
        st = streams[n]
        m.set_ortho_(CSR(st.crow, st.col, st.values, (m.out_features, m.in_features)))
        m.alpha.fill_(1.0)
        nnz, total = nnz + m.nnz, total + m.in_features * m.out_features
    for p in model.parameters():
        p.requires_grad_(False)
    stats = {"nnz": nnz, "density": nnz / total}
    if not train:
        return stats
    if all(m.qweight.device.type == "cpu" for m in mods.values()):
        for m in mods.values():  # dequantize each base once for the whole run: CPU speed (a dense copy)
            m.cache_base_()
    values = [m.ortho_values for m in mods.values()]
    for v in values:
        v.requires_grad_(True)
    try:
        stats.update(fit(model, values, loss_fn, config.train, progress, "ortho-tune", measure,
                         checkpoint=checkpoint, checkpoint_every=checkpoint_every, resume=resume,
                         gradient_checkpointing=gradient_checkpointing))
    finally:
        for v in values:
            v.requires_grad_(False)
    peaks["training"] = allocated_peak_gib(dev)
    if any(v is not None for v in peaks.values()):
        stats["device_peak_gib"] = peaks  # torch's peak so far after each phase: where a small card's budget goes
    return stats




# ---------------------------------------------------------------------------------------------
# on-disk cache of trained weights (safetensors only)

def config_key(config: dict) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:16]


# Bump when the training code changes what a run's weights are, float rounding included (2: ortho_value_grad
# reduces over contiguous rows): a cached arm trained by older code is then trained again, so "same seed, same
# numbers" compares like with like.
TRAINING_VERSION = 2


def cache_path(kind: str, config: dict) -> Path:
    """Where `cached(kind, config, ...)` keeps its entry (the directory may not exist yet); keyed by `config` and
    `TRAINING_VERSION`."""
    from .models import cache_dir

    return cache_dir() / "exp1" / f"{kind}-{config_key({**config, 'training_version': TRAINING_VERSION})}"


def cached(kind: str, config: dict, build: Callable[[], tuple[dict[str, torch.Tensor], dict]]
           ) -> tuple[dict[str, torch.Tensor], dict, bool]:
    """Tensors and metadata from the cache, or from `build()` (then written atomically). Returns (.., hit).

    An entry that cannot be read (a truncated file) is removed and rebuilt, with a note on stderr."""
    from .models import read_or_build

    d = cache_path(kind, config)
    (tensors, meta), hit = read_or_build(d.name, lambda remove: _read_entry(d, remove),
                                         lambda: _build_entry(d, config, build))
    return tensors, meta, hit


def _read_entry(d: Path, remove: bool) -> tuple[dict[str, torch.Tensor], dict] | None:
    """A cache entry's tensors and metadata, or None (absent or unreadable; `remove`: an unreadable one is removed,
    with a note)."""
    if (d / "weights.safetensors").is_file() and (d / "meta.json").is_file():
        try:
            return load_file(d / "weights.safetensors"), json.loads((d / "meta.json").read_text())
        except (SafetensorError, OSError, ValueError) as e:  # JSONDecodeError is a ValueError
            if not remove:
                return None
            import sys

            print(f"libortho: cache entry {d} is unreadable ({type(e).__name__}); rebuilding it", file=sys.stderr)
            shutil.rmtree(d, ignore_errors=True)
    return None


def _build_entry(d: Path, config: dict, build) -> tuple[dict[str, torch.Tensor], dict]:
    tensors, meta = build()
    tmp = d.with_name(d.name + f".tmp{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp / "weights.safetensors")
    (tmp / "meta.json").write_text(json.dumps({"config": config, **meta}, indent=1, default=str))
    if d.exists():  # a concurrent builder won: keep theirs
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        tmp.rename(d)
    return tensors, meta
