"""The user's own job: ortho-tune a model on chat records, resumably (`python -m libortho finetune`).

    finetune("ckpt-8b/", "records.jsonl", "out/", density=0.01, steps=50, device="cuda")

Records are JSON lines in either of the shapes the seeds' SFT data uses:

    {"messages": [{"role": "user", "content": "..."}, {"role": "assistant", "content": "..."}]}
    {"instruction": "...", "input": "...", "output": "..."}       (alpaca; `input` may be absent or empty)

Each is rendered through the tokenizer's chat template; the loss is taken on the last assistant turn only. The
base is INT4 of the public weights (a local checkpoint is read layer by layer, so an 8B model trains in 6 GiB);
only the sparse stream trains. `output/` is a libortho checkpoint (`save_pretrained`): `model.safetensors` is
built from the public weights alone, `ortho.safetensors` holds what was learned; the tokenizer sits beside it.
While training, `output/.train_state/` holds the last checkpoint of the run; the same command resumes from it.
"""
from __future__ import annotations

import hashlib
import json
import math
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

STATE_DIR = ".train_state"
ROLES = ("system", "user", "assistant")


@dataclass
class Record:
    """One training example: token ids and labels (-100 outside the supervised assistant turn)."""

    ids: list[int]
    labels: list[int]
    line: int


def _messages(obj, where: str) -> list[dict]:
    if not isinstance(obj, dict):
        raise ValueError(f"{where}: a record must be a JSON object, got {type(obj).__name__}")
    if "messages" in obj:
        msgs = obj["messages"]
        if not isinstance(msgs, list) or not msgs:
            raise ValueError(f"{where}: 'messages' must be a non-empty list of {{role, content}} turns")
        for k, m in enumerate(msgs):
            if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
                raise ValueError(f"{where}: turn {k} must be {{\"role\": one of {list(ROLES)}, \"content\": text}}, "
                                 f"got {json.dumps(m)[:80]}")
            if not m["content"].strip():
                raise ValueError(f"{where}: turn {k} ({m['role']}) has empty content")
        if msgs[-1]["role"] != "assistant":
            raise ValueError(f"{where}: the last turn must be the assistant's (it is what the model learns), "
                             f"got {msgs[-1]['role']!r}")
        return msgs
    if "instruction" in obj and "output" in obj:
        ins, inp, out = obj["instruction"], obj.get("input") or "", obj["output"]
        if not all(isinstance(x, str) for x in (ins, inp, out)) or not ins.strip() or not out.strip():
            raise ValueError(f"{where}: alpaca 'instruction' and 'output' must be non-empty text ('input' text or "
                             "absent)")
        return [{"role": "user", "content": ins + (f"\n\n{inp}" if inp.strip() else "")},
                {"role": "assistant", "content": out}]
    raise ValueError(f"{where}: a record needs 'messages' (a list of role/content turns) or alpaca 'instruction' "
                     f"and 'output'; it has {sorted(obj)[:6]}")


def load_records(path, tokenizer, max_length: int = 512) -> tuple[list[Record], dict]:
    """Every record of a JSONL file, tokenized through the chat template; (records, facts).

    Raises ValueError naming the file, the line and the reason for the first bad record, before any training.
    Records longer than `max_length` tokens are cut (counted in the facts).
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{p}: no such file (pass a JSONL file of chat records)")
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("the tokenizer has no chat template: finetune renders records through it; use a chat "
                         "model's tokenizer")
    if max_length < 2:
        raise ValueError(f"max_length must be at least 2, got {max_length}")
    records, cut = [], 0
    with open(p, encoding="utf-8") as f:
        try:
            lines = f.readlines()
        except UnicodeDecodeError as e:
            raise ValueError(f"{p}: not UTF-8 text ({e.reason})") from None
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{p}:{n}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
        msgs = _messages(obj, where)
        prompt = tokenizer.apply_chat_template(msgs[:-1], tokenize=False, add_generation_prompt=True)
        full = tokenizer.apply_chat_template(msgs, tokenize=False)
        ids = tokenizer(full, add_special_tokens=False).input_ids
        n_prompt = len(tokenizer(prompt, add_special_tokens=False).input_ids) if full.startswith(prompt) else 0
        if n_prompt >= len(ids):
            raise ValueError(f"{where}: the assistant turn renders to no tokens")
        if len(ids) > max_length:
            ids, cut = ids[:max_length], cut + 1
        labels = [-100] * min(n_prompt, len(ids)) + ids[n_prompt:]
        if all(t == -100 for t in labels[1:]):
            raise ValueError(f"{where}: the prompt alone fills max_length={max_length}; raise --max-length")
        records.append(Record(ids, labels, n))
    if not records:
        raise ValueError(f"{p}: no records (the file is empty)")
    digest = hashlib.sha256(p.read_bytes()).hexdigest()
    return records, {"file": str(p), "sha256": digest, "records": len(records), "cut_to_max_length": cut,
                     "max_length": max_length, "tokens": sum(len(r.ids) for r in records)}


def records_loss(records: list[Record], batch_size: int, seed: int, pad_id: int):
    """`loss_fn(model, step)`: mean token loss of the supervised turns of one batch; each epoch visits every
    record once in a seeded order. Sets `loss_fn.last_tokens` (tokens in the batch) for the tokens/s display."""
    from .modules import input_device
    from .train import token_nll

    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    per_epoch = math.ceil(len(records) / batch_size)

    def order(epoch: int) -> list[int]:
        return torch.randperm(len(records), generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch)).tolist()

    def loss_fn(model: nn.Module, step: int) -> torch.Tensor:
        epoch, k = divmod(step - 1, per_epoch) if step else (0, 0)
        batch = [records[i] for i in order(epoch)[k * batch_size:(k + 1) * batch_size]]
        T = max(len(r.ids) for r in batch)
        ids = torch.full((len(batch), T), pad_id, dtype=torch.long)
        labels = torch.full((len(batch), T), -100, dtype=torch.long)
        mask = torch.zeros((len(batch), T), dtype=torch.long)
        for i, r in enumerate(batch):
            ids[i, :len(r.ids)], labels[i, :len(r.ids)], mask[i, :len(r.ids)] = (
                torch.tensor(r.ids), torch.tensor(r.labels), 1)
        dev = input_device(model)
        loss_fn.last_tokens = int(mask.sum())
        labels = labels.to(dev)
        nll = token_nll(model, ids.to(dev), mask.to(dev), labels)  # (B, T-1), logits never whole
        valid = labels[:, 1:] != -100
        return nll.sum() / valid.sum().clamp(min=1)  # mean over the supervised tokens, as HF's loss

    loss_fn.last_tokens = 0
    loss_fn.steps_per_epoch = per_epoch
    return loss_fn


# -- resumable state: safetensors only --------------------------------------------------------------------------

def save_state(directory: Path, step: int, optimizer: torch.optim.Optimizer, history: dict, model: nn.Module,
               fingerprint: str) -> None:
    """The stream (masks and values) and the optimizer's moments at `step`, written atomically."""
    from .modules import ortho_modules

    d = Path(directory)
    tmp = d.with_name(d.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    tensors = {}
    for n, m in ortho_modules(model).items():
        if m.nnz:
            tensors.update({f"stream.{n}.crow": m.ortho_crow, f"stream.{n}.col": m.ortho_col,
                            f"stream.{n}.values": m.ortho_values.detach()})
    opt = optimizer.state_dict()
    for i, st in opt["state"].items():
        for k, v in st.items():
            tensors[f"opt.{i}.{k}"] = v if isinstance(v, torch.Tensor) else torch.tensor(v)
    save_file({k: v.contiguous().cpu() for k, v in tensors.items()}, tmp / "state.safetensors")
    meta = {"step": step, "history": history, "param_groups": opt["param_groups"], "fingerprint": fingerprint}
    (tmp / "state.json").write_text(json.dumps(meta, default=str))
    # the old state aside, the new one in, the old one removed: a stop at any point leaves one whole state among
    # d, d.tmp and d.old (`state_dirs`)
    old = d.with_name(d.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if d.exists():
        d.rename(old)
    tmp.rename(d)
    shutil.rmtree(old, ignore_errors=True)


def state_dirs(directory: Path) -> list[Path]:
    """Where a resumable state may be, newest first: the state, the one being written, the one being replaced."""
    d = Path(directory)
    return [d, d.with_name(d.name + ".tmp"), d.with_name(d.name + ".old")]


def saved_step(directory: Path) -> int | None:
    """The step of the newest whole state under `directory` (None: no state)."""
    for d in state_dirs(directory):
        try:
            if (d / "state.safetensors").is_file():
                return int(json.loads((d / "state.json").read_text())["step"])
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return None


class OtherJobState(ValueError):
    """--output holds the resumable state of another job (other model, data or settings)."""


def load_state(directory: Path, fingerprint: str) -> dict | None:
    """What `tune_stream_(resume=...)` needs, or None when there is no state of this same job to resume."""
    from .sparse import CSR

    for d in state_dirs(directory):
        try:
            meta = json.loads((d / "state.json").read_text())
            tensors = load_file(d / "state.safetensors")
            break
        except (OSError, ValueError, SafetensorError):
            continue  # absent, or unreadable: the next place, else start over rather than resume from garbage
    else:
        return None
    if meta.get("fingerprint") != fingerprint:
        raise OtherJobState(f"{d} holds the state of another job (other model, data or settings); remove it or use "
                         "another --output")
    streams = {}
    for k in tensors:
        if k.startswith("stream.") and k.endswith(".crow"):
            n = k[len("stream."):-len(".crow")]
            crow, col, values = (tensors[f"stream.{n}.{x}"] for x in ("crow", "col", "values"))
            streams[n] = CSR(crow, col, values, (crow.numel() - 1, 0))
    state: dict = {}
    for k, v in tensors.items():
        if k.startswith("opt."):
            _, i, name = k.split(".", 2)
            state.setdefault(int(i), {})[name] = v
    return {"step": meta["step"], "history": meta["history"], "streams": streams,
            "optimizer": {"state": state, "param_groups": meta["param_groups"]}}


# -- the output directory: never another job's, never the user's model ---------------------------------------------

# what a finetune writes into --output besides the checkpoint files: its facts, its resumable state (and their
# temporaries), the write probe of the command line
OWN = ("finetune.json", STATE_DIR, STATE_DIR + ".tmp", STATE_DIR + ".old", ".libortho_write_test")
# what a finetune's save writes: a run that failed or was stopped while saving leaves some of these
SAVED = re.compile(r"(config\.json|generation_config\.json|model.*\.safetensors(\.index\.json)?|ortho\.safetensors|"
                   r"tokenizer.*|special_tokens_map\.json|chat_template\.jinja|vocab\.json|merges\.txt|\..*\.tmp\d*)")


def check_output(output, model=None) -> None:
    """Refuse an --output that would lose something (ValueError), before anything is read or written: the model's
    own directory, a finished checkpoint, or a directory holding files this job did not write. Allowed: a new or
    empty directory, one holding a resumable state (whose job is checked when it is read) or the facts of a run
    that did not finish."""
    out = Path(output)
    if not str(output).strip():
        raise ValueError("--output is empty; pass a directory")
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"--output {out} is a file; pass a directory")
    if model is not None and Path(str(model)).is_dir() and out.exists() and out.resolve() == Path(str(model)).resolve():
        raise ValueError(f"--output {out} is the --model directory: the checkpoint would replace the model's own "
                         "weights; pass another directory")
    if not out.is_dir():
        return
    names = sorted(p.name for p in out.iterdir())
    facts = out / "finetune.json"
    status = None
    if facts.is_file():
        try:
            status = json.loads(facts.read_text()).get("status")
        except (ValueError, OSError, AttributeError):
            status = "unreadable"
    # finished: finetune.json says complete (or, written by an older libortho, says nothing) beside the checkpoint
    if status == "complete" or (status is None and facts.is_file() and "config.json" in names):
        raise ValueError(f"--output {out} already holds a finished checkpoint (finetune.json: {status}); pass a new "
                         "directory or remove it first")
    # a run of this tool that failed or was stopped (its finetune.json says so) may have left checkpoint files
    own = OWN if status is None else OWN + tuple(n for n in names if SAVED.fullmatch(n))
    other = [n for n in names if n not in own]
    if other and not any(d.is_dir() for d in state_dirs(out / STATE_DIR)):
        raise ValueError(f"--output {out} is not empty and holds no finetune state to resume ({', '.join(other[:4])}"
                         f"{', ...' if len(other) > 4 else ''}); pass a new or empty directory")


# -- the job ------------------------------------------------------------------------------------------------------

def finetune(model: str, data, output, *, density: float = 0.01, group_size: int = 64, symmetric: bool = True,
             steps: int | None = None, epochs: float | None = None, lr: float = 1e-3, batch_size: int = 1,
             max_length: int = 512, seed: int = 0, device: str = "cpu", score: str = "saliency_hessian",
             checkpoint_every: int = 10, progress: bool = True, log=print) -> dict:
    """Ortho-tune `model` on the chat records of `data`; write the checkpoint to `output`. Returns the facts.

    Args:
        model: a local checkpoint directory (read layer by layer), or any source `libortho.models.load_model`
            knows (loaded whole).
        steps / epochs: the training budget (one of them; default one epoch).
        score: the mask (`saliency_hessian` calibrates on public text first, `saliency`, `random`).
        checkpoint_every: save a resumable state every this many steps (0: only at the end).
    """
    from transformers import AutoTokenizer

    from .convert import convert_checkpoint, orthogonalize_
    from .data import calibration_batches
    from .models import load_model
    from .train import OrthoTuneConfig, TrainConfig

    out = Path(output)
    check_output(out, model)
    if steps is not None and epochs is not None:
        raise ValueError("give --steps or --epochs, not both")
    local = Path(str(model)).is_dir()
    tok = AutoTokenizer.from_pretrained(model) if local else load_model(model).tokenizer
    records, facts = load_records(data, tok, max_length)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    loss_fn = records_loss(records, batch_size, seed, pad)
    if steps is None:
        steps = max(1, math.ceil((epochs or 1.0) * loss_fn.steps_per_epoch))
    train = TrainConfig(lr=lr, max_steps=steps, target=None, general_chunks=0, seed=seed)
    config = OrthoTuneConfig(density=density, group_size=group_size, symmetric=symmetric, score=score, seed=seed,
                             train=train)
    # a local model by its resolved path: `ckpt`, `./ckpt/` and `/abs/ckpt` are one job (resuming must not depend
    # on how the path was typed)
    name = str(Path(str(model)).resolve()) if local else str(model)
    fingerprint = hashlib.sha256(json.dumps([name, facts["sha256"], config.to_dict(), batch_size, max_length],
                                            sort_keys=True).encode()).hexdigest()[:16]
    out.mkdir(parents=True, exist_ok=True)
    state_dir = out / STATE_DIR
    resume = load_state(state_dir, fingerprint)
    if resume is not None:
        log(f"resuming from step {resume['step']} ({state_dir})")
    calib = calibration_batches(tok, 8, 256) if score == "saliency_hessian" else None
    cuda = str(device).startswith("cuda")

    def checkpoint(step, opt, history, trained):
        save_state(state_dir, step, opt, history, trained, fingerprint)

    # on a GPU the activations of one layer at a time (a 6 GiB card holds the packed 8B model and little else)
    kw = dict(loss_fn=loss_fn, checkpoint=checkpoint, checkpoint_every=checkpoint_every, resume=resume,
              gradient_checkpointing=cuda)
    if local:  # read layer by layer: on a GPU the base, head and stream are resident, the embeddings in host memory
        m = convert_checkpoint(model, config, calibration=calib, device=device,
                               dtype=torch.bfloat16 if cuda else None, head_bits=4 if cuda else 16,
                               host_embeddings=cuda, progress=progress, **kw)
    else:
        m = load_model(model, device=device).model
        orthogonalize_(m, config, calibration=calib, progress=progress, **kw)
    m.save_pretrained(out)
    tok.save_pretrained(out)
    st = m.libortho_stats
    facts.update(steps=st.get("steps"), loss_first=(st.get("loss") or [None])[0], loss_last=(st.get("loss") or
                 [None])[-1], tokens_per_second=st.get("tokens_per_second"), nnz=st.get("nnz"),
                 density=st.get("density"), device_peak_gib=st.get("device_peak_gib"), resumed_from=resume["step"] if resume else None, output=str(out),
                 config=config.to_dict(), seconds=round(st.get("seconds", st.get("convert_seconds", 0.0)), 1))
    facts["status"] = "complete"
    # the facts first, then the state: a stop between the two leaves a checkpoint that says it is complete
    (out / "finetune.json").write_text(json.dumps(facts, indent=1, default=str))
    shutil.rmtree(state_dir, ignore_errors=True)
    return facts
