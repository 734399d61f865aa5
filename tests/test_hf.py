"""libortho as a transformers quantization method: save_pretrained -> AutoModelForCausalLM.from_pretrained."""
import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import AutoModelForCausalLM

import libortho  # noqa: F401  (registers the "libortho" quantization method)
from libortho import OrthoConfig, load, orthogonalize_, save, set_alpha
from libortho.hf import FORMAT_VERSION, ORTHO_FILE, LibOrthoConfig, combined_hash, file_sha256
from libortho.models import tiny_llama
from libortho.modules import ortho_modules

IDS = torch.randint(0, 255, (1, 12), generator=torch.Generator().manual_seed(0))


def converted(model_seed=0, **kw):
    cfg = dict(score="magnitude", group_size=32, density=0.1) | kw
    return orthogonalize_(tiny_llama(seed=model_seed, vocab_size=256), OrthoConfig(**cfg), progress=False)


def logits(m, alpha):
    set_alpha(m, alpha)
    with torch.no_grad():
        return m(input_ids=IDS).logits


@given(st.integers(0, 1000), st.sampled_from([0.01, 0.2, 1.0]), st.booleans(), st.sampled_from([32, -1]))
@settings(max_examples=5, deadline=None)
def test_save_pretrained_from_pretrained_bit_exact(tmp_path_factory, seed, density, symmetric, group_size):
    d = tmp_path_factory.mktemp("ckpt")
    m = converted(seed, density=density, symmetric=symmetric, group_size=group_size, score="random", seed=seed)
    m.save_pretrained(d)
    assert {p.name for p in d.iterdir()} >= {"config.json", "model.safetensors", ORTHO_FILE}
    m2 = AutoModelForCausalLM.from_pretrained(d)
    sd1, sd2 = m.state_dict(), m2.state_dict()
    assert sd1.keys() == sd2.keys()
    for k in sd1:
        assert torch.equal(sd1[k], sd2[k]), k
    for a in (0.0, 1.0):
        assert torch.equal(logits(m, a), logits(m2, a))
    assert m2.libortho_config == m.libortho_config


def test_bf16_model_round_trips(tmp_path):
    m = converted().to(torch.bfloat16)
    m.save_pretrained(tmp_path)
    m2 = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert next(iter(ortho_modules(m2).values())).scales.dtype == torch.bfloat16
    sd1, sd2 = m.state_dict(), m2.state_dict()
    assert sd1.keys() == sd2.keys() and all(torch.equal(sd1[k], sd2[k]) for k in sd1)
    # logits: not bit for bit, because `.to(bfloat16)` also rounds the rotary inv_freq buffer, which
    # from_pretrained recomputes in fp32 (transformers' behaviour for any bf16 model)
    for a in (0.0, 1.0):
        torch.testing.assert_close(logits(m, a), logits(m2, a), rtol=0.05, atol=0.02)


def test_config_json_records_the_method(tmp_path):
    m = converted()
    m.save_pretrained(tmp_path)
    qc = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "libortho" and set(qc["layers"]) == set(ortho_modules(m))
    assert qc["base_sha256"].keys() == {"model.safetensors"} and qc["ortho_sha256"]
    assert qc["ortho_config"]["density"] == 0.1


def test_without_ortho_file_loads_base_only_and_refuses_alpha(tmp_path):
    m = converted()
    m.save_pretrained(tmp_path)
    (tmp_path / ORTHO_FILE).unlink()
    base = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert all(not x.has_ortho and x.nnz == 0 for x in ortho_modules(base).values())
    assert all(x.alpha.item() == 0 for x in ortho_modules(base).values())
    assert torch.equal(logits(base, 0.0), logits(m, 0.0))
    with pytest.raises(ValueError, match="without its ortho stream"):
        set_alpha(base, 1.0)
    # the control: with the file present, the same call restores the stream (the check above can fail)
    m.save_pretrained(tmp_path)
    assert torch.equal(logits(AutoModelForCausalLM.from_pretrained(tmp_path), 1.0), logits(m, 1.0))


def test_load_with_ortho_false_ignores_the_file(tmp_path):
    m = converted()
    save(m, tmp_path)
    base = load(tmp_path, with_ortho=False)
    assert not any(x.has_ortho for x in ortho_modules(base).values())
    assert torch.equal(logits(base, 0.0), logits(m, 0.0))


@pytest.mark.parametrize("with_ortho", [True, False])
def test_swapped_base_refused(tmp_path, with_ortho):
    """A base from another model of the same shape: refused whether or not the ortho file is loaded."""
    a, b = tmp_path / "a", tmp_path / "b"
    converted(0).save_pretrained(a)
    converted(1).save_pretrained(b)
    load(a, with_ortho=with_ortho)  # control: the untouched checkpoint loads
    (a / "model.safetensors").write_bytes((b / "model.safetensors").read_bytes())
    with pytest.raises(ValueError, match="not the base this checkpoint was saved with"):
        load(a, with_ortho=with_ortho)


def _reorder_metadata(path):
    """Rewrite a safetensors file with its header's metadata keys in reverse order, the same tensors and offsets
    (what a second save of the same model may write: safetensors orders that dict differently run to run)."""
    b = path.read_bytes()
    n = int.from_bytes(b[:8], "little")
    header = json.loads(b[8:8 + n])
    meta = header.pop("__metadata__")
    text = json.dumps({"__metadata__": dict(reversed(list(meta.items()))), **header}, separators=(",", ":")).encode()
    assert len(meta) > 1 and len(text) <= n
    path.write_bytes(b[:8] + text + b" " * (n - len(text)) + b[8 + n:])  # same header length: offsets unchanged


def test_base_with_reordered_metadata_loads_and_a_changed_byte_does_not(tmp_path):
    """The recorded base hash is of the content, not the bytes: the same base written with its metadata in another
    order loads (a hash of the file's bytes refused it); the control: one changed byte of the weights is refused."""
    m = converted()
    m.save_pretrained(tmp_path)
    f = tmp_path / "model.safetensors"
    before = f.read_bytes()
    _reorder_metadata(f)
    assert f.read_bytes() != before
    assert torch.equal(logits(load(tmp_path), 1.0), logits(m, 1.0))
    b = bytearray(f.read_bytes())
    b[-1] ^= 1
    f.write_bytes(bytes(b))
    with pytest.raises(ValueError, match="not the base this checkpoint was saved with"):
        load(tmp_path)


def test_checkpoint_recording_file_hashes_still_loads(tmp_path):
    """Checkpoints saved before the content hash recorded each base file's sha256 of bytes (and the stream the
    combined hash of those): they still load; a swapped base is still refused (test_swapped_base_refused)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    m = converted()
    m.save_pretrained(tmp_path)
    cfg_path = tmp_path / "config.json"
    cfg = json.loads(cfg_path.read_text())
    raw = {n: file_sha256(tmp_path / n) for n in cfg["quantization_config"]["base_sha256"]}
    assert raw != cfg["quantization_config"]["base_sha256"]  # the two hashes differ, so this is the old path
    cfg["quantization_config"]["base_sha256"] = raw
    cfg_path.write_text(json.dumps(cfg))
    with safe_open(str(tmp_path / ORTHO_FILE), "pt") as h:
        tensors, meta = {k: h.get_tensor(k) for k in h.keys()}, h.metadata()
    cfg["quantization_config"]["format_version"] = "2"  # as those checkpoints say, with no architecture record
    del cfg["quantization_config"]["architecture"]
    save_file(tensors, tmp_path / ORTHO_FILE, metadata={**meta, "base_sha256": combined_hash(raw), "version": "2"})
    cfg["quantization_config"]["ortho_sha256"] = file_sha256(tmp_path / ORTHO_FILE)
    cfg_path.write_text(json.dumps(cfg))
    old = load(tmp_path)
    assert torch.equal(logits(old, 1.0), logits(m, 1.0))
    old.save_pretrained(tmp_path / "again")  # saved again: in this format, content hashes
    again = json.loads((tmp_path / "again" / "config.json").read_text())["quantization_config"]
    assert again["format_version"] == FORMAT_VERSION and again["base_sha256"] != raw


def test_newer_format_refused_by_name(tmp_path):
    """A checkpoint of a format this libortho does not know is refused as such, before any hash check (which would
    otherwise call it a swapped base). Saying FORMAT_VERSION itself loads (the control)."""
    m = converted()
    m.save_pretrained(tmp_path)
    cfg_path = tmp_path / "config.json"
    cfg = json.loads(cfg_path.read_text())
    assert cfg["quantization_config"]["format_version"] == FORMAT_VERSION
    load(tmp_path)
    cfg["quantization_config"]["format_version"] = str(int(FORMAT_VERSION) + 1)
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="upgrade libortho"):
        load(tmp_path)


def test_base_and_ortho_of_another_model_refused(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    converted(0).save_pretrained(a)
    converted(1).save_pretrained(b)
    for f in ("model.safetensors", ORTHO_FILE):  # B's pair beside A's config.json
        (a / f).write_bytes((b / f).read_bytes())
    with pytest.raises(ValueError, match="not the base"):
        load(a)


def test_ortho_of_another_base_refused(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    converted(0).save_pretrained(a)
    converted(1).save_pretrained(b)
    (a / ORTHO_FILE).write_bytes((b / ORTHO_FILE).read_bytes())
    with pytest.raises(ValueError, match="belongs to a different base"):
        load(a)
    load(a, with_ortho=False)  # the base itself is intact


def test_stream_of_another_checkpoint_on_the_same_base_refused(tmp_path):
    """Two streams over one base with the same counts per layer (another mask): only the recorded stream hash tells
    them apart; before it was checked, the other job's stream loaded silently. Edited bytes are refused the same
    way (they had crashed inside the CSR with an IndexError)."""
    a, b = tmp_path / "a", tmp_path / "b"
    ma = converted(0, score="magnitude")
    ma.save_pretrained(a)
    converted(0, score="random").save_pretrained(b)
    assert all(json.loads((d / "config.json").read_text())["quantization_config"]["base_sha256"] ==
               json.loads((a / "config.json").read_text())["quantization_config"]["base_sha256"] for d in (b,))
    good = (a / ORTHO_FILE).read_bytes()
    (a / ORTHO_FILE).write_bytes((b / ORTHO_FILE).read_bytes())
    with pytest.raises(ValueError, match="not the stream this checkpoint was saved with"):
        load(a)
    (a / ORTHO_FILE).write_bytes(good[:-400] + b"\x7f" * 400)
    with pytest.raises(ValueError, match="not the stream this checkpoint was saved with"):
        load(a)
    (a / ORTHO_FILE).write_bytes(good)
    assert torch.equal(logits(load(a), 1.0), logits(ma, 1.0))  # the control: its own stream loads


@pytest.mark.parametrize("key,value", [("num_hidden_layers", 3), ("intermediate_size", 96)])
def test_edited_architecture_refused_before_loading(tmp_path, key, value):
    """config.json edited after the save (a layer more: HF would fill it with random weights and generate)."""
    converted(0).save_pretrained(tmp_path)
    cfg_path = tmp_path / "config.json"
    cfg = json.loads(cfg_path.read_text())
    assert cfg[key] != value
    load(tmp_path)  # the control
    cfg_path.write_text(json.dumps({**cfg, key: value}))
    with pytest.raises(ValueError, match=f"says {key}={value}, but the checkpoint was saved with"):
        load(tmp_path)


def test_config_that_is_not_an_object_refused(tmp_path):
    (tmp_path / "config.json").write_text("[]")
    with pytest.raises(ValueError, match="not an object"):
        load(tmp_path)


def test_truncated_ortho_and_edited_config_refused(tmp_path):
    converted().save_pretrained(tmp_path)
    data = (tmp_path / ORTHO_FILE).read_bytes()
    (tmp_path / ORTHO_FILE).write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated or not a safetensors"):
        load(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    del cfg["quantization_config"]["layers"]
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"lacks \['layers'\]"):
        load(tmp_path)
    with pytest.raises(FileNotFoundError, match="not a saved checkpoint"):
        load(tmp_path / "nowhere")


def test_base_only_save_removes_a_stale_stream(tmp_path):
    m = converted()
    m.save_pretrained(tmp_path)
    base = load(tmp_path, with_ortho=False)
    base.save_pretrained(tmp_path)
    assert not (tmp_path / ORTHO_FILE).exists()
    assert torch.equal(logits(load(tmp_path), 0.0), logits(m, 0.0))


def test_save_into_a_file_refused(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(NotADirectoryError):
        converted().save_pretrained(f)


def test_generate_on_loaded_model(tmp_path):
    converted().save_pretrained(tmp_path)
    m = load(tmp_path)
    for a in (0.0, 1.0):
        set_alpha(m, a)
        assert m.generate(IDS, max_new_tokens=4, do_sample=False, pad_token_id=2).shape == (1, 16)


def test_config_class_refuses_missing_fields():
    with pytest.raises(ValueError, match="lacks"):
        LibOrthoConfig.from_dict({"quant_method": "libortho"})


@pytest.mark.slow
def test_smollm2_round_trip(smollm2, calib_batches, tmp_path):
    """The real model: bit-exact logits at alpha 0 and 1 after save_pretrained / from_pretrained."""
    orthogonalize_(smollm2, OrthoConfig(density=0.01, group_size=64, symmetric=True), calibration=calib_batches[:2],
                   progress=False)
    ids = calib_batches[3][:, :32]
    ref = {}
    for a in (0.0, 1.0):
        set_alpha(smollm2, a)
        with torch.no_grad():
            ref[a] = smollm2(input_ids=ids).logits
    smollm2.save_pretrained(tmp_path)
    m = AutoModelForCausalLM.from_pretrained(tmp_path)
    for a in (0.0, 1.0):
        set_alpha(m, a)
        with torch.no_grad():
            assert torch.equal(m(input_ids=ids).logits, ref[a])
    base = load(tmp_path, with_ortho=False)
    with torch.no_grad():
        assert torch.equal(base(input_ids=ids).logits, ref[0.0])


def test_import_is_light_and_registers_when_transformers_loads(tmp_path):
    """`import libortho` imports neither torch nor transformers (the CLI answers bad input at once), yet a
    process that imports libortho first and transformers after still loads a libortho checkpoint."""
    import subprocess
    import sys

    converted().save_pretrained(tmp_path)
    light = "import sys, libortho; print('torch' in sys.modules, 'transformers' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", light], capture_output=True, text=True).stdout.split() == \
        ["False", "False"]
    code = ("import libortho\nfrom transformers import AutoModelForCausalLM\n"
            f"m = AutoModelForCausalLM.from_pretrained({str(tmp_path)!r})\n"
            "print(type(m.model.layers[0].mlp.up_proj).__name__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.stdout.strip() == "OrthoLinear", out.stderr[-500:]
    # control: without libortho, transformers does not know the method (the check above can fail)
    bare = code.replace("import libortho\n", "")
    assert "OrthoLinear" not in subprocess.run([sys.executable, "-c", bare], capture_output=True, text=True).stdout
