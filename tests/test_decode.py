"""StaticDecoder on the CPU (eager; the CUDA-graph runs are in tests/test_kernels.py): a batch of requests with
their own alphas decodes as each request alone."""
import pytest
import torch

from libortho import OrthoConfig, orthogonalize_, set_alpha
from libortho.decode import FUSED, RANGES, StaticDecoder, weight_bytes_per_token
from libortho.models import tiny_llama
from libortho.modules import ortho_modules

ALPHAS = [0.0, 1.0, 0.0, 0.5]
IDS = torch.randint(0, 255, (len(ALPHAS), 6), generator=torch.Generator().manual_seed(0))
NEW = 5


@pytest.fixture(scope="module")
def model():
    """A tiny Llama converted at density 0.1 (fp32, CPU)."""
    return orthogonalize_(tiny_llama(vocab_size=256), OrthoConfig(score="magnitude", group_size=32, density=0.1),
                          progress=False)


def decoder(model, batch, fuse=True):
    return StaticDecoder(model, max_seq=32, dtype=torch.float32, device="cpu", batch=batch, fuse=fuse)


def alone(model):
    """Each request decoded alone at its alpha: ([tokens (NEW,)], [last logits (V,)])."""
    toks, logits = [], []
    for b, a in enumerate(ALPHAS):
        set_alpha(model, a)
        dec = decoder(model, 1)
        toks.append(dec.generate(IDS[b:b + 1], NEW))
        logits.append(dec.logits[0].clone())
    set_alpha(model, 1.0)
    return toks, logits


def worst(logits, ref) -> float:
    return max(((logits[b] - ref[b]).norm() / ref[b].norm()).item() for b in range(len(ref)))


def test_batch_with_own_alphas_decodes_as_each_request_alone(model):
    ref_toks, ref_logits = alone(model)
    dec = decoder(model, len(ALPHAS))
    toks = dec.generate(IDS, NEW, alphas=torch.tensor(ALPHAS))
    assert toks.shape == (len(ALPHAS), NEW)
    assert [t.tolist() for t in toks] == [t.tolist() for t in ref_toks]
    assert worst(dec.logits, ref_logits) < 1e-5
    # control: every request at the first one's alpha (what a kernel reading alpha[0] for all rows would do)
    dec.generate(IDS, NEW, alphas=torch.tensor(ALPHAS[:1] * len(ALPHAS)))
    assert worst(dec.logits, ref_logits) > 1e-3
    assert all(m.row_alpha is None and m.pinned_ortho is None for m in ortho_modules(model).values())


def test_alphas_from_the_model_and_errors(model):
    ref_toks, ref_logits = alone(model)
    dec = decoder(model, len(ALPHAS))
    set_alpha(model, torch.tensor(ALPHAS))  # per-row alphas set on the model are used as they are
    try:
        dec.generate(IDS, NEW)
        assert worst(dec.logits, ref_logits) < 1e-5
        assert all(m.row_alpha is not None for m in ortho_modules(model).values())  # left as the caller set them
    finally:
        set_alpha(model, 1.0)
    with pytest.raises(ValueError, match="3 values for a decoder of batch=4"):
        dec.set_alphas([0.0, 1.0, 1.0])
    with pytest.raises(ValueError, match=r"alpha\[0\] must be finite"):
        dec.set_alphas([-1.0, 0.0, 0.0, 0.0])
    with pytest.raises(ValueError, match=r"this decoder takes \(batch=4, T\)"):
        dec.generate(IDS[:2], NEW)
    with pytest.raises(ValueError, match="batch must be a positive int"):
        decoder(model, 0)


def profiled_step(model, fuse: bool):
    """(the parts labelled, top-level aten ops per step) of 2 decode steps with ranges on."""
    from torch.profiler import ProfilerActivity, profile

    # the elementwise fusions off: every part has its own range here (with them on, see test_triton_decode.py)
    dec = StaticDecoder(model, max_seq=32, dtype=torch.float32, device="cpu", ranges=True, fuse=fuse,
                        fuse_elementwise=False, fuse_attention=False)
    dec.prepare()
    dec.prefill(IDS[:1])
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        dec.decode(2)
    dec._clear_hints()
    ev = prof.events()
    return {e.name[3:] for e in ev if e.name.startswith("lo:")}, dec


@pytest.mark.parametrize("fuse", [True, False])
def test_ranges_label_every_part_of_a_step(model, fuse):
    """With ranges on, the profiler sees every part the breakdown needs (bench/profile_decode.py): the fused
    linears in place of their parts, or the parts."""
    seen, dec = profiled_step(model, fuse)
    not_run = {p for p, names in FUSED.items() for p in names} if fuse else set(FUSED)
    assert seen == set(RANGES) - not_run - {"embedding"} | ({"embedding"} if dec.embed_on_device else set())


# -- fused q|k|v and gate|up ---------------------------------------------------------------------------------

def generate(model, fuse, batch=1, alphas=None, dec=None):
    dec = dec or decoder(model, batch, fuse)
    ids = IDS[:batch]
    toks = dec.generate(ids, NEW, alphas=None if alphas is None else torch.tensor(alphas))
    return toks, dec.logits.clone(), dec


def rel(a, b) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("alpha", [0.0, 1.0])
def test_fused_decoder_generates_as_the_unfused_one(model, alpha):
    set_alpha(model, alpha)
    try:
        toks, logits, dec = generate(model, True)
        ref_toks, ref_logits, _ = generate(model, False)
    finally:
        set_alpha(model, 1.0)
    assert all(set(f) == set(FUSED) for f in dec.fused) and all(f.active for f in dec._fused_list())
    assert toks.tolist() == ref_toks.tolist()
    assert rel(logits, ref_logits) < 1e-5


def test_fused_decoder_with_per_request_alphas_generates_as_the_unfused_one(model):
    toks, logits, _ = generate(model, True, len(ALPHAS), ALPHAS)
    ref_toks, ref_logits, _ = generate(model, False, len(ALPHAS), ALPHAS)
    assert toks.tolist() == ref_toks.tolist()
    assert rel(logits, ref_logits) < 1e-5
    _, other, _ = generate(model, True, len(ALPHAS), [1.0 - a for a in ALPHAS])  # control: alphas matter here
    assert rel(other, ref_logits) > 1e-3


def test_fused_copy_follows_alpha_and_falls_back_where_parts_disagree(model):
    toks, logits, dec = generate(model, True)
    mods = ortho_modules(model)
    try:
        set_alpha(model, 0.0)  # the same decoder: the fused copies read their parts' alpha
        _, l0, _ = generate(model, True, dec=dec)
        _, r0, _ = generate(model, False)
        assert rel(l0, r0) < 1e-5 and rel(l0, logits) > 1e-3
        mods["model.layers.0.self_attn.k_proj"].set_alpha(1.0)  # one part of layer 0's q|k|v differs
        _, l1, _ = generate(model, True, dec=dec)
        _, r1, _ = generate(model, False)
        assert not dec.fused[0]["qkv"].active and dec.fused[0]["gate_up"].active and dec.fused[1]["qkv"].active
        assert rel(l1, r1) < 1e-5 and rel(l1, l0) > 1e-4
    finally:
        set_alpha(model, 1.0)


def test_fused_copy_follows_its_parts(model, monkeypatch):
    """A part changed in place changes the fused copy through their shared storage (shown with rebuilds off; the
    decoder still rebuilds on the version change); a part whose tensor is replaced is not the copy's storage any
    more, and only a rebuild brings the copy up to date."""
    from torch import nn

    from libortho.decode import _Fused

    _, before, dec = generate(model, True)
    m = ortho_modules(model)["model.layers.1.mlp.up_proj"]
    with torch.no_grad():
        m.ortho_values.mul_(30)  # in place
    try:
        _, ref, _ = generate(model, False)
        assert rel(ref, before) > 1e-3
        with monkeypatch.context() as mp:  # no rebuild allowed: the shared storage carries the change
            mp.setattr(_Fused, "refresh", lambda self: False)
            _, shared, _ = generate(model, True, dec=dec)
        assert rel(shared, ref) < 1e-5
    finally:
        with torch.no_grad():
            m.ortho_values.div_(30)
    old = m.ortho_values
    m.ortho_values = nn.Parameter(old.detach() * 30, requires_grad=False)  # replaced: not the copy's storage
    try:
        _, ref, _ = generate(model, False)
        with monkeypatch.context() as mp:  # control: a decoder that never rebuilds its copies is caught
            mp.setattr(_Fused, "refresh", lambda self: False)
            _, stale, _ = generate(model, True, dec=dec)
        assert rel(stale, ref) > 1e-3
        _, after, _ = generate(model, True, dec=dec)
        assert rel(after, ref) < 1e-5
    finally:
        m.ortho_values = old


def test_fusing_adds_no_second_copy_and_state_dict_is_unchanged(tmp_path):
    """The parts become views of their fused copy: the model and its fused copies hold the packed weights once
    (row pointers aside). `state_dict` still gives each part whole, so a checkpoint saved after decoding loads
    back to the same model (safetensors refuses tensors that share memory)."""
    from safetensors.torch import load_file, save_file

    m = orthogonalize_(tiny_llama(vocab_size=256), OrthoConfig(score="magnitude", group_size=32, density=0.1),
                       progress=False)
    sd_before = {k: v.clone() for k, v in m.state_dict().items()}

    def storage_bytes(tensors) -> int:
        return sum({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}.values())

    packed = lambda: [t for o in ortho_modules(m).values()  # noqa: E731
                      for t in (o.qweight, o.scales, o.zeros, o.ortho_col, o.ortho_values) if t is not None]
    alone_bytes = storage_bytes(packed())
    dec = decoder(m, 1)
    fused = [f.module for f in dec._fused_list()]
    both = storage_bytes(packed() + [t for f in fused for t in (f.qweight, f.scales, f.zeros, f.ortho_col,
                                                                f.ortho_values) if t is not None])
    # fails if fusing kept a second copy of q|k|v and gate|up (the o and down projections are not fused)
    assert both == alone_bytes, (both, alone_bytes)
    part = ortho_modules(m)["model.layers.0.self_attn.k_proj"]
    assert part.qweight.untyped_storage().data_ptr() == fused[0].qweight.untyped_storage().data_ptr()
    sd = m.state_dict()
    assert sd.keys() == sd_before.keys() and all(torch.equal(sd[k], sd_before[k]) for k in sd)
    from libortho.modules import state_without_tied

    save_file({k: v for k, v in state_without_tied(m).items()}, tmp_path / "m.safetensors")  # tied head aside
    back = load_file(tmp_path / "m.safetensors")
    assert all(torch.equal(back[k], sd_before[k]) for k in back)
    # a saver that groups tensors by storage would keep one per group: the parts' own tensors share one (the
    # control: the check below can fail), their state_dict entries must not (OrthoLinear clones views there)
    names = [f"model.layers.0.self_attn.{p}.qweight" for p in ("q_proj", "k_proj", "v_proj")]
    own = dict(m.named_buffers())
    assert len({own[n].untyped_storage().data_ptr() for n in names}) == 1
    assert len({sd[n].untyped_storage().data_ptr() for n in names}) == 3
    from transformers import AutoModelForCausalLM

    m.save_pretrained(tmp_path / "hf")  # after decoding, through Hugging Face's saver: the same model back
    sd2 = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").state_dict()
    assert sd2.keys() == sd_before.keys() and all(torch.equal(sd2[k], sd_before[k]) for k in sd2)


def test_fuse_launches_fewer_ops_per_token(model):
    from torch.profiler import ProfilerActivity, profile

    n = {}
    for fuse in (True, False):
        dec = decoder(model, 1, fuse)
        dec.prepare()
        dec.prefill(IDS[:1])
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            dec.decode(1)
        dec._clear_hints()
        n[fuse] = sum(1 for e in prof.events() if e.name in ("aten::linear", "aten::mul", "aten::addcmul"))
    layers = len(dec.layers)
    # per layer: 5 linears -> 2; rotary's 2 x (mul, addcmul) -> 1 x; the linears' own ops may add more
    assert n[False] - n[True] >= layers * (3 + 2), n


def test_weight_bytes_count_the_stream_only_when_read(model):
    on, off = weight_bytes_per_token(model, True), weight_bytes_per_token(model, False)
    stream = sum(sum(t.numel() * t.element_size() for t in (m.ortho_crow, m.ortho_col, m.ortho_values))
                 for m in ortho_modules(model).values())
    assert on - off == stream > 0


def test_unshared_fused_copy_generates_the_same_and_leaves_the_parts_their_own():
    """share=False (bench/profile_decode.py --share both): the same tokens and logits as the shared copy, and the
    parts keep storage of their own. Control: with sharing the parts are views of the copy."""
    from libortho.linear import in_larger_storage

    m = orthogonalize_(tiny_llama(vocab_size=256), OrthoConfig(score="magnitude", group_size=32, density=0.1),
                       progress=False)
    own = StaticDecoder(m, max_seq=32, dtype=torch.float32, device="cpu", fuse=True, share=False)
    toks = own.generate(IDS[:1], NEW)
    assert own.fuse and not any(in_larger_storage(p.qweight) for p in ortho_modules(m).values())
    shared = StaticDecoder(m, max_seq=32, dtype=torch.float32, device="cpu", fuse=True)
    assert shared.generate(IDS[:1], NEW).tolist() == toks.tolist() and rel(shared.logits, own.logits) < 1e-6
    assert in_larger_storage(ortho_modules(m)["model.layers.0.self_attn.q_proj"].qweight)


def test_embed_gather_is_checked_and_needs_a_cuda_decoder(model):
    with pytest.raises(ValueError, match="embed_gather must be"):
        StaticDecoder(model, max_seq=32, dtype=torch.float32, device="cpu", embed_gather="gpu")
    # on a CPU the table is on the decoder's device: nothing to gather through the host, whatever the mode
    for mode in ("auto", "device", "host"):
        assert not StaticDecoder(model, max_seq=32, dtype=torch.float32, device="cpu",
                                 embed_gather=mode).gather_on_device


def test_embed_gather_device_mode_says_why_it_cannot(monkeypatch):
    """The checks before any probe, on any machine: a CPU decoder, no Triton, a head wider than the table (its
    argmax could name a row the GPU would read past the table). "device" raises with the reason; "auto" falls
    back, warning on a CUDA decoder only."""
    from types import SimpleNamespace

    from libortho.kernels import triton_decode as td

    stub = SimpleNamespace(embed_on_device=False, embed=torch.zeros(10, 4), device=torch.device("cpu"),
                           dtype=torch.float32, model=SimpleNamespace(lm_head=torch.nn.Linear(4, 10)))
    with pytest.raises(ValueError, match="runs on cpu, not a CUDA GPU"):
        StaticDecoder._device_gather(stub, "device")
    assert StaticDecoder._device_gather(stub, "auto") is False
    assert StaticDecoder._device_gather(stub, "host") is False
    stub.device = torch.device("cuda")  # never used: each check below refuses before the probe
    with monkeypatch.context() as mp:
        mp.setattr(td, "triton", None)
        with pytest.raises(ValueError, match="Triton is not importable"):
            StaticDecoder._device_gather(stub, "device")
        with pytest.warns(UserWarning, match="through the host every token"):
            assert StaticDecoder._device_gather(stub, "auto") is False
    if td.triton is not None:
        stub.model.lm_head = torch.nn.Linear(4, 12)
        with pytest.raises(ValueError, match="12 outputs for a table of 10 rows"):
            StaticDecoder._device_gather(stub, "device")


@pytest.mark.gpu
def test_host_table_rows_read_by_the_gpu_decode_as_through_the_host():
    """A host embedding table (the gtx4050 placement): the GPU reading rows from the pinned table decodes the same
    tokens and logits, bit for bit, as the row copied through the host, and no decode step copies the token to the
    host (control: the host path copies it down at every step)."""
    from torch.profiler import ProfilerActivity, profile

    from libortho.modules import HostEmbedding

    m = orthogonalize_(tiny_llama(vocab_size=256), OrthoConfig(score="magnitude", group_size=32, density=0.1),
                       progress=False).to("cuda", torch.bfloat16)
    m.model.embed_tokens = HostEmbedding.from_embedding(m.model.embed_tokens, "cuda")
    ids = torch.randint(0, 255, (2, 6), generator=torch.Generator().manual_seed(0)).cuda()
    runs, d2h = {}, {}
    for mode in ("host", "device"):
        dec = StaticDecoder(m, max_seq=48, batch=2, embed_gather=mode)
        assert dec.gather_on_device == (mode == "device") and not dec.embed_on_device
        runs[mode] = (dec.generate(ids, 8).tolist(), dec.logits.float().cpu())
        with profile(activities=[ProfilerActivity.CUDA]) as prof:  # the graph replays: only transfers are seen
            dec.decode(4)
            torch.cuda.synchronize()
        d2h[mode] = sum(1 for e in prof.events() if "DtoH" in e.name or "Device -> Pageable" in e.name)
    assert m.model.embed_tokens.weight.is_pinned()  # pinned in place by the device mode
    assert runs["device"][0] == runs["host"][0] and torch.equal(runs["device"][1], runs["host"][1])
    # a cast of the model gives the table new (pageable) storage: the decoder pins and reads that one, never the
    # pointer it captured before (control: the old pointer differs)
    old = dec._gather_table
    m.model.embed_tokens.float()  # bf16 -> fp32 holds every value: the same rows
    assert dec.generate(ids, 8).tolist() == runs["host"][0]
    w = m.model.embed_tokens.weight
    assert w.dtype == torch.float32 and w.is_pinned() and dec._gather_table == (w.data_ptr(), w.dtype) != old
    # decode() reads the position once per call (its bounds check); the host path adds one copy per token
    assert d2h["device"] <= 1 and d2h["host"] >= d2h["device"] + 4, d2h
