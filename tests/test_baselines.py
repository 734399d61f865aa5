import torch

from libortho import OrthoConfig, orthogonalize_, set_alpha
from libortho.baselines import int4_rtn_, nf4_, nf4_bits_per_weight
from libortho.models import tiny_llama

IDS = torch.randint(0, 255, (1, 10), generator=torch.Generator().manual_seed(0))


def test_int4_rtn_equals_libortho_alpha_zero():
    a, b = tiny_llama(vocab_size=256), tiny_llama(vocab_size=256)
    bits = int4_rtn_(a, group_size=32)
    orthogonalize_(b, OrthoConfig(group_size=32, symmetric=True, score="magnitude"), progress=False)
    set_alpha(b, 0.0)
    assert torch.equal(a(input_ids=IDS).logits, b(input_ids=IDS).logits)
    assert bits == 4 + 32 / 32


def test_nf4_runs_on_cpu_and_stays_close():
    m = tiny_llama(vocab_size=256)
    ref = m(input_ids=IDS).logits
    assert nf4_(m) == nf4_bits_per_weight()
    import bitsandbytes as bnb

    assert isinstance(m.model.layers[0].self_attn.q_proj, bnb.nn.Linear4bit)
    out = m(input_ids=IDS).logits
    assert torch.isfinite(out).all() and 0 < (out - ref).abs().max() < 1.0
