"""libortho: an INT4 base from public weights plus a sparse ortho stream, switched by alpha.

    y = base(x) + alpha * ortho(x)      alpha=1: the fine-tuned model; alpha=0: privacy kill switch

    model = AutoModelForCausalLM.from_pretrained(...)
    orthogonalize_(model, OrthoConfig(density=0.01), calibration=calibration_batches(tokenizer))
    with alpha(model, 0.0):
        model.generate(...)                     # the kill switch
    model.save_pretrained("ckpt/")              # base + ortho files; AutoModelForCausalLM.from_pretrained reads it

Importing libortho registers it as a transformers quantization method ("libortho").
"""
from .config import Backend, Mode, OrthoConfig, Quantizer, Score
from .convert import merge, orthogonalize_
from .data import calibration_batches
from .hf import LibOrthoConfig, load, save
from .linear import OrthoLinear
from .modules import alpha, cache_base_, ortho_modules, set_alpha, set_backend
from .train import OrthoTuneConfig, TrainConfig

__all__ = ["OrthoConfig", "OrthoTuneConfig", "TrainConfig", "Mode", "Score", "Quantizer", "Backend", "OrthoLinear",
           "LibOrthoConfig", "orthogonalize_", "alpha", "set_alpha", "set_backend", "merge", "save", "load",
           "ortho_modules", "cache_base_", "calibration_batches"]
__version__ = "0.1.0"
