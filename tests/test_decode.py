"""StaticDecoder on the CPU (eager; the CUDA-graph runs are in tests/test_kernels.py): a batch of requests with
their own alphas decodes as each request alone."""
import pytest
import torch

from libortho import OrthoConfig, orthogonalize_, set_alpha
from libortho.decode import RANGES, StaticDecoder, weight_bytes_per_token
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


def decoder(model, batch):
    return StaticDecoder(model, max_seq=32, dtype=torch.float32, device="cpu", batch=batch)


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


def test_ranges_label_every_part_of_a_step(model):
    """With ranges on, the profiler sees every part the breakdown needs (bench/profile_decode.py)."""
    from torch.profiler import ProfilerActivity, profile

    dec = StaticDecoder(model, max_seq=32, dtype=torch.float32, device="cpu", ranges=True)
    dec.prepare()
    dec.prefill(IDS[:1])
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        dec.decode(2)
    dec._clear_hints()
    seen = {e.name[3:] for e in prof.events() if e.name.startswith("lo:")}
    assert seen == set(RANGES) - {"embedding"} | ({"embedding"} if dec.embed_on_device else set())


def test_weight_bytes_count_the_stream_only_when_read(model):
    on, off = weight_bytes_per_token(model, True), weight_bytes_per_token(model, False)
    stream = sum(sum(t.numel() * t.element_size() for t in (m.ortho_crow, m.ortho_col, m.ortho_values))
                 for m in ortho_modules(model).values())
    assert on - off == stream > 0
