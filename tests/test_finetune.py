"""The user's job: chat records -> an ortho-tuned checkpoint (resumable), and generation from it."""
import json

import pytest
import torch

import libortho
from libortho.finetune import STATE_DIR, finetune, load_records
from libortho.models import tiny_llama
from libortho.modules import ortho_modules


@pytest.fixture
def job(tmp_path, tokenizer):
    """A tiny checkpoint with a chat tokenizer and 12 records (fortunes as the assistant's answers)."""
    from libortho.data import fortunes

    tiny_llama(vocab_size=len(tokenizer)).save_pretrained(tmp_path / "ckpt")
    tokenizer.save_pretrained(tmp_path / "ckpt")
    answers = [f for f in fortunes().text.split("\n\n") if 40 < len(f) < 160][:12]
    with open(tmp_path / "r.jsonl", "w") as f:
        for i, a in enumerate(answers):
            rec = ({"messages": [{"role": "user", "content": "Tell me a fortune."},
                                 {"role": "assistant", "content": a}]} if i % 2 else
                   {"instruction": "Tell me a fortune.", "input": "", "output": a})
            f.write(json.dumps(rec) + "\n")
    return tmp_path


def test_records_supervise_the_assistant_turn_only(job, tokenizer):
    records, facts = load_records(job / "r.jsonl", tokenizer)
    assert facts["records"] == 12 and len(records) == 12
    r = records[0]
    n_prompt = sum(1 for t in r.labels if t == -100)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Tell me a fortune."}], tokenize=False,
                                           add_generation_prompt=True)
    assert n_prompt == len(tokenizer(prompt, add_special_tokens=False).input_ids)
    assert r.labels[n_prompt:] == r.ids[n_prompt:]


@pytest.mark.parametrize("line,reason", [
    ("not json", "not valid JSON"),
    ('{"text": "hello"}', "needs 'messages'"),
    ('{"messages": [{"role": "user", "content": "hi"}]}', "last turn must be the assistant"),
    ('{"messages": [{"role": "robot", "content": "hi"}, {"role": "assistant", "content": "x"}]}', "turn 0"),
    ('{"messages": [{"role": "user", "content": " "}, {"role": "assistant", "content": "x"}]}', "empty content"),
    ('{"instruction": "", "output": "x"}', "alpaca"),
])
def test_bad_record_named_by_line(tmp_path, tokenizer, line, reason):
    good = '{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}'
    (tmp_path / "d.jsonl").write_text(good + "\n\n" + line + "\n")
    with pytest.raises(ValueError, match=rf"d\.jsonl:3: .*{reason}"):
        load_records(tmp_path / "d.jsonl", tokenizer)
    (tmp_path / "ok.jsonl").write_text(good + "\n")
    assert len(load_records(tmp_path / "ok.jsonl", tokenizer)[0]) == 1  # control: the good line alone loads


def test_finetune_writes_a_checkpoint_that_switches(job):
    facts = finetune(str(job / "ckpt"), job / "r.jsonl", job / "out", steps=4, group_size=32, batch_size=2,
                     progress=False)
    assert facts["steps"] == 4 and facts["records"] == 12 and facts["nnz"] > 0
    assert {"config.json", "model.safetensors", "ortho.safetensors", "finetune.json"} <= \
        {p.name for p in (job / "out").iterdir()}
    assert not (job / "out" / STATE_DIR).exists()  # the resumable state goes once the job is done
    m = libortho.load(job / "out")
    assert any(x.ortho_values.abs().sum() > 0 for x in ortho_modules(m).values())
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        y1 = m(input_ids=ids).logits
        with libortho.alpha(m, 0.0):
            y0 = m(input_ids=ids).logits
    assert not torch.equal(y0, y1)
    base = libortho.load(job / "out", with_ortho=False)  # the deployment without what was learned
    with torch.no_grad():
        assert torch.equal(base(input_ids=ids).logits, y0)


def _interrupting_at(records_loss, stop: int):
    """`records_loss` whose loss raises KeyboardInterrupt at step `stop` (Ctrl-C in the middle of a run)."""
    def interrupting(*a, **k):
        fn = records_loss(*a, **k)

        def loss(model, step):
            if step == stop:
                raise KeyboardInterrupt
            return fn(model, step)
        loss.last_tokens, loss.steps_per_epoch = 0, fn.steps_per_epoch
        return loss
    return interrupting


def test_interrupted_finetune_resumes_to_the_same_weights(job, monkeypatch):
    """Stopped after step 3 (state saved every step), the same command continues from step 3 and ends with the
    weights of an uninterrupted run, bit for bit."""
    import libortho.finetune as ft

    kw = dict(steps=5, group_size=32, batch_size=2, checkpoint_every=1, progress=False)
    finetune(str(job / "ckpt"), job / "r.jsonl", job / "whole", **kw)
    real, interrupting = ft.records_loss, _interrupting_at(ft.records_loss, 4)
    monkeypatch.setattr(ft, "records_loss", interrupting)
    with pytest.raises(KeyboardInterrupt):
        finetune(str(job / "ckpt"), job / "r.jsonl", job / "split", **kw)
    assert (job / "split" / STATE_DIR / "state.safetensors").is_file()
    monkeypatch.setattr(ft, "records_loss", real)
    facts = finetune(str(job / "ckpt"), job / "r.jsonl", job / "split", **kw)
    assert facts["resumed_from"] == 3
    a, b = libortho.load(job / "whole"), libortho.load(job / "split")
    for (n, x), y in zip(ortho_modules(a).items(), ortho_modules(b).values()):
        assert torch.equal(x.ortho_values, y.ortho_values), n


def test_state_of_another_job_is_refused(job):
    kw = dict(steps=2, group_size=32, checkpoint_every=1, progress=False)
    finetune(str(job / "ckpt"), job / "r.jsonl", job / "out", **kw)
    from libortho.finetune import load_state

    (job / "out" / STATE_DIR).mkdir()
    (job / "out" / STATE_DIR / "state.json").write_text(json.dumps({"fingerprint": "other", "step": 1}))
    (job / "out" / STATE_DIR / "state.safetensors").write_bytes(b"")
    assert load_state(job / "out" / STATE_DIR, "mine") is None  # unreadable tensors: start over


def test_cli_finetune_then_generate(job, capsys):
    from libortho.cli import main

    rc = main(["finetune", "--model", str(job / "ckpt"), "--data", str(job / "r.jsonl"), "--output",
               str(job / "out"), "--steps", "2", "--group-size", "32", "--no-progress", "--device", "cpu"])
    assert rc == 0
    facts = json.loads((job / "out" / "finetune.json").read_text())
    assert facts["run_facts"]["memory"]["cap_applied"] is False and facts["steps"] == 2
    for alpha in ("0", "1"):
        assert main(["generate", "--model", str(job / "out"), "--alpha", alpha, "--prompt", "Tell me a fortune.",
                     "--max-new-tokens", "3", "--device", "cpu"]) == 0
    (job / "bad.jsonl").write_text('{"messages": []}\n')
    assert main(["finetune", "--model", str(job / "ckpt"), "--data", str(job / "bad.jsonl"), "--output",
                 str(job / "o2"), "--steps", "2"]) == 2
    assert "bad.jsonl:1:" in capsys.readouterr().err
    assert main(["generate", "--model", str(job / "out"), "--alpha", "nan", "--prompt", "x"]) == 2


def _md5s(d):
    import hashlib

    return {p.name: hashlib.md5(p.read_bytes()).hexdigest() for p in sorted(d.iterdir()) if p.is_file()}


def test_cli_finetune_never_overwrites_or_races(job, capsys, monkeypatch):
    """What a second command must not destroy: a finished checkpoint (its finetune.json too, even on bad numbers),
    the --model directory itself, a folder of other files, another job's resumable state, a job in progress (its
    --output is locked). Each refusal exits 2 before anything is written; the controls run into new folders."""
    import hashlib

    from safetensors.torch import save_file

    from libortho.cli import main
    from libortho.models import cache_lock

    base = ["--data", str(job / "r.jsonl"), "--steps", "2", "--group-size", "32", "--no-progress", "--device", "cpu"]
    ckpt, out = job / "ckpt", job / "out"
    assert main(["finetune", "--model", str(ckpt), "--output", str(out), *base]) == 0  # the control
    kept, model_kept = _md5s(out), _md5s(ckpt)

    def refused(args, says):
        assert main(["finetune", *args]) == 2
        assert says in capsys.readouterr().err
        assert _md5s(out) == kept and _md5s(ckpt) == model_kept

    refused(["--model", str(ckpt), "--output", str(out), *base], "already holds a finished checkpoint")
    refused(["--model", str(ckpt), "--output", str(ckpt), *base], "is the --model directory")
    for flag, bad, says in (("--group-size", "0", "--group-size must be positive"), ("--lr", "nan", "--lr must"),
                            ("--checkpoint-every", "-1", "--checkpoint-every must")):
        refused(["--model", str(ckpt), "--output", str(out), *base, flag, bad], says)
    refused(["--model", str(ckpt), "--output", str(out), "--data", str(job / "r.jsonl"), "--epochs", "inf"],
            "--epochs must be a positive finite number")
    refused(["--model", str(out), "--output", str(job / "o3"), *base], "already a libortho checkpoint")
    # Path("") is the current directory: it wrote the checkpoint there
    assert main(["finetune", "--model", str(ckpt), "--output", "", *base]) == 2
    assert "empty path" in capsys.readouterr().err
    (job / "mine").mkdir()
    (job / "mine" / "notes.txt").write_text("the user's own file")
    refused(["--model", str(ckpt), "--output", str(job / "mine"), *base], "is not empty")
    assert (job / "mine" / "notes.txt").read_text() == "the user's own file"
    other = job / "other" / STATE_DIR
    other.mkdir(parents=True)
    save_file({"opt.0.step": torch.zeros(1)}, other / "state.safetensors")
    (other / "state.json").write_text(json.dumps({"fingerprint": "another job", "step": 7, "history": {},
                                                  "param_groups": []}))
    refused(["--model", str(ckpt), "--output", str(job / "other"), *base], "state of another job")
    assert sorted(p.name for p in (job / "other").iterdir()) == [STATE_DIR]  # no finetune.json written over it
    busy = job / "busy"
    with cache_lock("finetune-" + hashlib.sha256(str(busy.resolve()).encode()).hexdigest()[:16]):
        refused(["--model", str(ckpt), "--output", str(busy), *base], "in use by another libortho finetune")
    assert main(["finetune", "--model", str(ckpt), "--output", str(busy), *base]) == 0  # free again: the control
    # what a run that failed while saving leaves (its finetune.json says failed): not a finished checkpoint
    left = job / "left"
    left.mkdir()
    (left / "config.json").write_text("{}")
    (left / "model.safetensors").write_bytes(b"partial")
    (left / "finetune.json").write_text(json.dumps({"status": "failed: OSError: [Errno 28] No space left"}))
    assert main(["finetune", "--model", str(ckpt), "--output", str(left), *base]) == 0
    assert json.loads((left / "finetune.json").read_text())["status"] == "complete"


def test_cli_interrupted_finetune_says_so_and_resumes(job, capsys, monkeypatch):
    """Ctrl-C at step 4 (a state every step): exit 130, finetune.json says interrupted at step 3 and stderr how to
    go on; the same command then resumes from step 3 and completes."""
    import libortho.finetune as ft
    from libortho.cli import main

    real, interrupting = ft.records_loss, _interrupting_at(ft.records_loss, 4)
    args = ["finetune", "--model", str(job / "ckpt"), "--data", str(job / "r.jsonl"), "--output", str(job / "out"),
            "--steps", "5", "--group-size", "32", "--checkpoint-every", "1", "--no-progress", "--device", "cpu"]
    monkeypatch.setattr(ft, "records_loss", interrupting)
    assert main(args) == 130
    facts = json.loads((job / "out" / "finetune.json").read_text())
    assert facts["status"] == "interrupted" and facts["step"] == 3
    assert "resumes from step 3" in capsys.readouterr().err
    monkeypatch.setattr(ft, "records_loss", real)
    monkeypatch.chdir(job)  # the same model typed another way (relative, trailing slash) is the same job
    args[args.index("--model") + 1] = "ckpt/"
    assert main(args) == 0
    facts = json.loads((job / "out" / "finetune.json").read_text())
    assert facts["status"] == "complete" and facts["resumed_from"] == 3


def test_cli_generate_refuses_an_empty_prompt_and_a_missing_stream(job, capsys):
    from libortho.cli import main

    out = job / "out"
    assert main(["finetune", "--model", str(job / "ckpt"), "--data", str(job / "r.jsonl"), "--output", str(out),
                 "--steps", "1", "--group-size", "32", "--no-progress", "--device", "cpu"]) == 0
    gen = ["generate", "--model", str(out), "--max-new-tokens", "2", "--device", "cpu"]
    assert main([*gen, "--prompt", "", "--no-chat"]) == 2 and "--prompt is empty" in capsys.readouterr().err
    (out / "ortho.safetensors").unlink()
    assert main([*gen, "--prompt", "hi"]) == 2 and "ortho.safetensors is missing" in capsys.readouterr().err
    assert main([*gen, "--prompt", "hi", "--alpha", "0"]) == 0  # the kill switch needs no stream
    assert main(["run", "--model", str(out), "--experiment", "2"]) == 2
    assert "is a libortho checkpoint" in capsys.readouterr().err
    for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json"):
        (out / f).unlink(missing_ok=True)
    assert main([*gen, "--prompt", "hi", "--alpha", "0"]) == 2 and "no tokenizer" in capsys.readouterr().err


def test_a_stop_while_the_state_is_swapped_keeps_a_whole_state(job, monkeypatch):
    """save_state moves the old state aside, the new one in, then removes the old: stopped between the two renames
    (here: the second rename raises), the state being written is found and resumed, not discarded."""
    from pathlib import Path

    from libortho.finetune import load_state, saved_step, save_state

    kw = dict(steps=2, group_size=32, checkpoint_every=1, progress=False)
    finetune(str(job / "ckpt"), job / "r.jsonl", job / "out", **kw)
    m = libortho.load(job / "out")
    opt = torch.optim.AdamW([p for mod in ortho_modules(m).values() for p in [mod.ortho_values]], lr=1e-3)
    d = job / "st" / STATE_DIR
    save_state(d, 1, opt, {"loss": [1.0]}, m, "fp")
    real = Path.rename

    def stop_on_the_new_state(self, target):
        if self.name.endswith(".tmp"):
            raise KeyboardInterrupt
        return real(self, target)

    monkeypatch.setattr(Path, "rename", stop_on_the_new_state)
    with pytest.raises(KeyboardInterrupt):
        save_state(d, 2, opt, {"loss": [1.0, 0.5]}, m, "fp")
    monkeypatch.setattr(Path, "rename", real)
    assert not d.exists()  # the old state is aside, the new one not yet in
    assert saved_step(d) == 2 and load_state(d, "fp")["step"] == 2
