import copy
from dataclasses import replace

import pytest
import torch

from libortho.baselines import int4_rtn_
from libortho.modules import ortho_modules, set_alpha
from libortho.linear import OrthoLinear
from libortho.privacy import make_canaries
from libortho.quant import quantize
from libortho import orthogonalize_
from libortho.train import (OrthoTuneConfig, TrainConfig, cached, canary_batch, canary_loss, full_finetune_,
                            lora_finetune_, lora_wrap, mask_scores, set_lora_alpha)

FAST = TrainConfig(lr=1e-2, max_steps=3, check_every=3, general_chunks=1, general_length=16, target=None)


@pytest.fixture
def data(tokenizer):
    """Two short canaries, a stretch of 'general' token ids and two calibration batches."""
    g = torch.Generator().manual_seed(0)
    general = torch.randint(0, len(tokenizer), (256,), generator=g)
    calib = [torch.randint(0, len(tokenizer), (1, 32), generator=g) for _ in range(2)]
    return make_canaries(tokenizer, 2, seed=0, groups=(3, 3)), general, calib


def test_canary_batch_pads_and_masks_labels(tokenizer):
    cs = make_canaries(tokenizer, 2, seed=0, fmt="chat", groups=(3,)) + make_canaries(tokenizer, 1, groups=(3,))
    ids, mask, labels = canary_batch(cs, pad_id=0)
    assert ids.shape == mask.shape == labels.shape and ids.shape[0] == 3
    assert mask[2].sum() == len(cs[2].ids) < ids.shape[1]
    assert (labels[mask == 0] == -100).all() and torch.equal(labels[mask == 1], ids[mask == 1])


def test_mask_score_is_saliency_over_public_hessian():
    g = torch.tensor([[1.0, 2.0], [3.0, 0.0]])
    h = torch.tensor([1.0, 4.0])
    s = mask_scores(g, h, "saliency_hessian", damp=0.0)
    torch.testing.assert_close(s, torch.tensor([[1.0, 1.0], [9.0, 0.0]]))
    torch.testing.assert_close(mask_scores(g, None, "saliency", 0.0), g.pow(2))
    with pytest.raises(ValueError, match="score"):
        OrthoTuneConfig(score="hessian")
    with pytest.raises(ValueError, match="damp"):
        OrthoTuneConfig(damp=-1.0)
    with pytest.raises(ValueError, match="lr"):
        TrainConfig(lr=0.0)


def test_ortho_tune_trains_only_the_stream_and_alpha0_is_int4_public(tiny_model, data):
    cs, general, calib = data
    public = copy.deepcopy(tiny_model)
    ocfg = OrthoTuneConfig(density=0.02, group_size=32, symmetric=False, train=FAST)
    orthogonalize_(tiny_model, ocfg, calibration=calib, loss_fn=canary_loss(cs, general, FAST, 0), progress=False)
    stats = tiny_model.libortho_stats
    assert stats["steps"] == 3 and 0.02 <= stats["density"] < 0.03
    mods = ortho_modules(tiny_model)
    assert len(mods) == 2 * 7 and all(isinstance(m, OrthoLinear) for m in mods.values())
    for name, m in mods.items():  # the base is INT4 of the public weight, never touched by training
        ref = quantize(public.get_submodule(name).weight, 32, symmetric=False)
        assert torch.equal(m.qweight, ref.qweight) and torch.equal(m.scales, ref.scales)
    assert any(m.ortho_values.abs().sum() > 0 for m in mods.values())
    assert not any(p.requires_grad for p in tiny_model.parameters())
    assert torch.equal(tiny_model.model.embed_tokens.weight, public.model.embed_tokens.weight)
    ids = torch.tensor([cs[0].ids])
    int4_rtn_(public, 32, symmetric=False)
    set_alpha(tiny_model, 0.0)
    with torch.no_grad():
        assert torch.equal(tiny_model(input_ids=ids).logits, public(input_ids=ids).logits)


def test_ortho_tune_lowers_the_private_loss(tiny_model, data):
    """Training the stream does something: the private loss at alpha 1 falls below the untrained stream's
    (the control: zero training steps leave it where the INT4 base puts it)."""
    cs, general, calib = data
    loss_fn = canary_loss(cs, general, FAST, 0)
    m0 = copy.deepcopy(tiny_model)
    orthogonalize_(m0, OrthoTuneConfig(density=0.05, group_size=32, train=FAST), calibration=calib, loss_fn=loss_fn,
                   progress=False, train=False)
    orthogonalize_(tiny_model, OrthoTuneConfig(density=0.05, group_size=32, train=replace(FAST, max_steps=10)),
                   calibration=calib, loss_fn=loss_fn, progress=False)
    with torch.no_grad():
        assert loss_fn(tiny_model, 99).item() < loss_fn(m0, 99).item() - 0.05


def test_trainable_stream_gradient_matches_dense_autograd():
    """The custom backward (one layer's weight recomputed, values' gradient gathered) equals autograd through
    the dense base + alpha * ortho, for x and for the values."""
    from libortho.sparse import csr_from_mask

    g = torch.Generator().manual_seed(0)
    w = torch.randn(24, 64, generator=g)
    lin = torch.nn.Linear(64, 24)
    m = OrthoLinear.from_linear(lin, quantize(w, 32), csr_from_mask(torch.randn(24, 64, generator=g),
                                                                      torch.rand(24, 64, generator=g) < 0.1))
    m.set_alpha(0.7)
    m.ortho_values.requires_grad_(True)
    x = torch.randn(3, 5, 64, generator=g, requires_grad=True)
    (m(x) * torch.arange(24.0)).sum().backward()
    gx, gv = x.grad.clone(), m.ortho_values.grad.clone()
    x.grad, m.ortho_values.grad = None, None
    dense = m.dequantized_base() + 0.7 * m.ortho_dense()
    (torch.nn.functional.linear(x, dense, m.bias) * torch.arange(24.0)).sum().backward()
    torch.testing.assert_close(gx, x.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gv, m.ortho_values.grad, rtol=1e-5, atol=1e-5)
    assert gv.abs().sum() > 0


def test_tune_needs_a_loss_and_rolls_back_on_failure(tiny_model, data):
    cs, general, calib = data
    with pytest.raises(ValueError, match="loss_fn"):
        orthogonalize_(tiny_model, OrthoTuneConfig(group_size=32), calibration=calib, progress=False)

    def bad_loss(model, step):
        return model(input_ids=torch.tensor([cs[0].ids])).logits.sum() * float("nan")

    before = dict(tiny_model.named_modules())
    with pytest.raises(Exception):
        orthogonalize_(tiny_model, OrthoTuneConfig(group_size=32, score="random", train=FAST), loss_fn=bad_loss,
                       progress=False)
    assert dict(tiny_model.named_modules()) == before and not ortho_modules(tiny_model)


def test_full_finetune_same_seed_same_weights(tokenizer, data):
    from libortho.models import tiny_llama

    cs, general, _ = data
    a, b = tiny_llama(vocab_size=len(tokenizer)), tiny_llama(vocab_size=len(tokenizer))
    ha = full_finetune_(a, canary_loss(cs, general, FAST, 0), FAST, progress=False)
    hb = full_finetune_(b, canary_loss(cs, general, FAST, 0), FAST, progress=False)
    assert ha == hb
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), n
    assert not any(p.requires_grad for p in a.parameters())


def test_lora_alpha0_is_the_public_model(tiny_model, data):
    cs, general, _ = data
    ids = torch.tensor([cs[0].ids])
    with torch.no_grad():
        ref = tiny_model(input_ids=ids).logits
    m = lora_wrap(tiny_model)
    lora_finetune_(m, canary_loss(cs, general, FAST, 0), FAST, progress=False)
    with torch.no_grad():
        assert not torch.equal(m(input_ids=ids).logits, ref)
        assert torch.equal(set_lora_alpha(m, 0.0)(input_ids=ids).logits, ref)


def test_cache_is_safetensors_and_skips_the_build(tmp_path, monkeypatch):
    monkeypatch.setenv("LIBORTHO_CACHE", str(tmp_path))
    calls = []

    def build():
        calls.append(1)
        return {"w": torch.arange(4.0)}, {"history": {"steps": 1}}

    t1, m1, hit1 = cached("unit", {"a": 1}, build)
    t2, m2, hit2 = cached("unit", {"a": 1}, build)
    assert (hit1, hit2) == (False, True) and len(calls) == 1 and torch.equal(t1["w"], t2["w"])
    assert m2["config"] == {"a": 1}
    files = sorted(p.name for p in tmp_path.rglob("*") if p.is_file() and "locks" not in p.relative_to(tmp_path).parts)
    assert files == ["meta.json", "weights.safetensors"]
    cached("unit", {"a": 2}, build)
    assert len(calls) == 2  # another configuration, another key


def test_truncated_cache_entry_is_rebuilt(tmp_path, monkeypatch, capsys):
    from libortho.train import cache_path

    monkeypatch.setenv("LIBORTHO_CACHE", str(tmp_path))
    calls = []

    def build():
        calls.append(1)
        return {"w": torch.arange(4.0)}, {"history": {"steps": 1}}

    cached("unit", {"a": 1}, build)
    f = cache_path("unit", {"a": 1}) / "weights.safetensors"
    f.write_bytes(f.read_bytes()[:20])
    t, _, hit = cached("unit", {"a": 1}, build)
    assert not hit and len(calls) == 2 and torch.equal(t["w"], torch.arange(4.0))
    assert "unreadable" in capsys.readouterr().err
    assert cached("unit", {"a": 1}, build)[2]  # the rebuilt entry is whole again


def test_concurrent_callers_build_a_cache_entry_once(tmp_path, monkeypatch):
    """Two callers of one key at once (xdist workers, run(procs) helpers, two CLI runs): one builds, the other waits
    and reads its entry. Without the lock in `cached` both build (the premise below shows they overlap)."""
    import threading
    import time

    monkeypatch.setenv("LIBORTHO_CACHE", str(tmp_path))
    started, calls, hits = threading.Barrier(2), [], []

    def build():
        calls.append(threading.get_ident())
        time.sleep(0.5)  # long enough that an unlocked second caller would find no entry and build too
        return {"w": torch.arange(4.0)}, {"history": {"steps": 1}}

    def call():
        started.wait()
        hits.append(cached("unit", {"a": 1}, build)[2])

    threads = [threading.Thread(target=call) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and sorted(hits) == [False, True]  # the second caller read the first one's entry


@pytest.mark.parametrize("per_chunk,recomputed", [(5, True), (6, False)])
def test_token_nll_in_chunks_is_the_models_loss_and_gradient(tiny_model, monkeypatch, per_chunk, recomputed):
    """The loss through the head in chunks of positions (logits never whole) equals HF's loss over full logits,
    value and gradient, with each chunk recomputed in backward (46 positions over 8 chunks' worth) and kept (46
    within 8 chunks' worth: the CPU's case); the control: chunks reassembled in the wrong order are caught."""
    import torch.utils.checkpoint as ckpt
    import libortho.train as tr

    calls = []
    real_checkpoint = ckpt.checkpoint
    monkeypatch.setattr(ckpt, "checkpoint", lambda *a, **k: (calls.append(1), real_checkpoint(*a, **k))[1])

    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, tiny_model.config.vocab_size, (2, 24), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 20:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    monkeypatch.setattr(tr, "LOGIT_BYTES", 4 * tiny_model.config.vocab_size * per_chunk)
    w = tiny_model.model.layers[0].mlp.up_proj.weight
    w.requires_grad_(True)
    ref = tiny_model(input_ids=ids, attention_mask=mask, labels=labels).loss
    (g_ref,) = torch.autograd.grad(ref, w)
    nll = tr.token_nll(tiny_model, ids, mask, labels)
    assert nll.shape == (2, 23) and (nll[1, 19:] == 0).all()
    loss = nll.sum() / (labels[:, 1:] != -100).sum()
    (g_chunk,) = torch.autograd.grad(loss, w)
    w.requires_grad_(False)
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(g_chunk, g_ref)
    assert bool(calls) == recomputed  # the path this case is about was taken
    # the control: a reassembly in the wrong order (chunks reversed) is caught per position
    real_cat = torch.cat
    monkeypatch.setattr(torch, "cat", lambda ts, *a, **k: real_cat(list(ts)[::-1], *a, **k))
    wrong = tr.token_nll(tiny_model, ids, mask, labels)
    monkeypatch.setattr(torch, "cat", real_cat)
    assert not torch.allclose(wrong, nll)


def test_gradient_checkpointing_trains_the_same_stream(tiny_model, data):
    """gradient_checkpointing=True recomputes activations in backward, in the saliency pass too (the recomputing
    forwards are not counted as calls of a layer), and gives the same masks and trained values."""
    cs, general, calib = data
    outs = []
    for gc in (False, True):
        m = copy.deepcopy(tiny_model)
        calls = []
        # a pre-hook inside the checkpointed forward (a recompute stops early, before forward hooks would fire)
        m.model.layers[0].mlp.register_forward_pre_hook(lambda *a: calls.append(1))
        ocfg = OrthoTuneConfig(density=0.02, group_size=32, symmetric=False, score="saliency", train=FAST)
        orthogonalize_(m, ocfg, loss_fn=canary_loss(cs, general, FAST, 0), progress=False, gradient_checkpointing=gc)
        # the saliency pass and 3 steps, each forward once more in backward when checkpointed (it did engage)
        assert len(calls) == (1 + FAST.max_steps) * (2 if gc else 1)
        assert not getattr(m.model, "gradient_checkpointing", False)  # switched off again after training
        outs.append(torch.cat([x.ortho_values for x in ortho_modules(m).values()]))
    assert outs[0].abs().sum() > 0
    torch.testing.assert_close(outs[0], outs[1])


GPU = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none found): determinism of GPU "
                         "kernels; on a CPU every kernel already sums in one order")


@GPU
def test_memory_efficient_attention_backward_repeats_only_under_deterministic():
    """The premise of `train.deterministic`: attention's memory-efficient backward sums in a varying order under
    warn_only=True (what Exp 1 ran with), and in one order inside `deterministic()`. If the first half ever fails,
    torch made that kernel deterministic by default and the guard is no longer what makes training repeat."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from libortho.train import deterministic

    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v, dy = (torch.randn(2, 9, 1024, 64, device="cuda", generator=g) for _ in range(4))  # (B, H, T, D) fp32

    def grads(n: int) -> set:
        out = set()
        for _ in range(n):
            qq = q.clone().requires_grad_(True)
            with sdpa_kernel(SDPBackend.EFFICIENT_ATTENTION):
                torch.nn.functional.scaled_dot_product_attention(qq, k, v, is_causal=True).backward(dy)
            out.add(hash(qq.grad.cpu().numpy().tobytes()))
        return out

    before = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        import warnings
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            assert len(grads(20)) > 1, "warn_only=True gave 20 identical gradients: the atomics are gone"
        with deterministic():
            assert len(grads(20)) == 1
        # deterministic() gave back the mode it found (warn_only)
        assert torch.are_deterministic_algorithms_enabled() and torch.is_deterministic_algorithms_warn_only_enabled()
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])
    assert torch.are_deterministic_algorithms_enabled() == before[0]  # restored on exit


@GPU
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])  # bf16 attention takes the flash backward
def test_training_on_a_gpu_repeats_bit_for_bit(dtype):
    """Same seed, same weights on a GPU, for each trainer Exp 1 uses (the stream with its saliency mask, full
    fine-tuning, LoRA), with sequences long enough for attention's backward to split its sums. Token ids only
    (no tokenizer: a GPU machine need not have the embedded model)."""
    from libortho.models import tiny_llama
    from libortho.privacy import Canary

    V = 512
    g = torch.Generator().manual_seed(0)
    general = torch.randint(0, V, (8192,), generator=g)
    calib = [torch.randint(0, V, (1, 256), generator=g) for _ in range(2)]
    cs = [Canary("u", "s", "plain", tuple(torch.randint(0, V, (12,), generator=g).tolist()),
                 tuple(torch.randint(0, V, (6,), generator=g).tolist())) for _ in range(4)]
    cfg = TrainConfig(lr=3e-3, max_steps=6, check_every=6, general_chunks=4, general_length=1024, target=None)
    loss = canary_loss(cs, general, cfg, 0)
    runs = {"ortho": [], "full": [], "lora": []}
    for _ in range(2):
        m = tiny_llama(seed=0, vocab_size=V, hidden_size=256, layers=2).cuda().to(dtype)
        orthogonalize_(m, OrthoTuneConfig(density=0.02, group_size=32, train=cfg),
                       calibration=calib, loss_fn=loss, progress=False)
        runs["ortho"].append([t.cpu() for t in m.state_dict().values()])
        trained = {"ortho": [t.cpu() for k, t in m.state_dict().items() if k.endswith("ortho_values")]}
        m = tiny_llama(seed=0, vocab_size=V, hidden_size=256, layers=2).cuda().to(dtype)
        full_finetune_(m, loss, cfg, progress=False)
        runs["full"].append([t.cpu() for t in m.state_dict().values()])
        m = lora_wrap(tiny_llama(seed=0, vocab_size=V, hidden_size=256, layers=2).cuda().to(dtype), seed=0)
        lora_finetune_(m, loss, cfg, progress=False)
        runs["lora"].append([p.detach().cpu() for p in m.parameters() if p.requires_grad])
        trained["lora"] = [p.detach().cpu() for n, p in m.named_parameters() if "lora_B" in n]
    # the control: training changed what each trainer trains (a no-op trainer would repeat bit for bit too); the
    # stream's values and LoRA's B start at zero, full fine-tuning from the seed's initial weights
    init = [t.cpu() for t in tiny_llama(seed=0, vocab_size=V, hidden_size=256, layers=2).cuda().to(dtype).state_dict().values()]
    assert trained["ortho"] and any(v.abs().sum() > 0 for v in trained["ortho"])
    assert trained["lora"] and any(v.abs().sum() > 0 for v in trained["lora"])
    assert not all(torch.equal(x, y) for x, y in zip(runs["full"][0], init))
    for name, (a, b) in runs.items():
        assert len(a) == len(b) > 0
        assert all(torch.equal(x, y) for x, y in zip(a, b)), f"{name}: two runs of one seed differ"
