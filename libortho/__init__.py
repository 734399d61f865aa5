"""libortho: an INT4 base from public weights plus a sparse ortho stream, switched by alpha.

    y = base(x) + alpha * ortho(x)      alpha=1: the fine-tuned model; alpha=0: privacy kill switch

    model = AutoModelForCausalLM.from_pretrained(...)
    orthogonalize_(model, OrthoConfig(density=0.01), calibration=calibration_batches(tokenizer))
    with alpha(model, 0.0):
        model.generate(...)                     # the kill switch
    model.save_pretrained("ckpt/")              # base + ortho files; AutoModelForCausalLM.from_pretrained reads it

Importing libortho registers it as a transformers quantization method ("libortho"). The names below load on
first use (transformers alone takes seconds to import; the command line answers bad input before that), and the
registration happens as soon as transformers loads its quantizers, whichever of the two is imported first.
"""
import importlib
import os
import sys

# cuBLAS's fixed-order workspaces, which training's deterministic mode needs (libortho.train.deterministic); read
# when CUDA starts, so set on import. A user's own value is kept
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

_PUBLIC = {
    "OrthoConfig": ".config", "Mode": ".config", "Score": ".config", "Quantizer": ".config", "Backend": ".config",
    "orthogonalize_": ".convert", "merge": ".convert", "convert_checkpoint": ".convert",
    "calibration_batches": ".data",
    "LibOrthoConfig": ".hf", "load": ".hf", "save": ".hf",
    "OrthoLinear": ".linear",
    "alpha": ".modules", "cache_base_": ".modules", "ortho_modules": ".modules", "set_alpha": ".modules",
    "set_backend": ".modules",
    "OrthoTuneConfig": ".train", "TrainConfig": ".train",
}
__all__ = list(_PUBLIC)
__version__ = "0.1.0"


def __getattr__(name: str):
    if name in _PUBLIC:
        value = getattr(importlib.import_module(_PUBLIC[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'libortho' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_PUBLIC))


_QUANTIZERS = "transformers.quantizers.auto"


class _RegisterOnImport:
    """A meta-path finder that lets transformers' quantizer registry load as usual, then registers libortho's
    quantizer in it (importing libortho.hf) before anyone can ask it for "libortho"."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname != _QUANTIZERS:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None:
            return spec
        run = spec.loader.exec_module

        def exec_module(module):
            run(module)
            if "libortho.hf" not in sys.modules:
                importlib.import_module(".hf", __name__)

        spec.loader.exec_module = exec_module
        return spec


if _QUANTIZERS in sys.modules:
    importlib.import_module(".hf", __name__)
elif not any(isinstance(f, _RegisterOnImport) for f in sys.meta_path):
    import importlib.util  # noqa: F401  (used by the finder)

    sys.meta_path.insert(0, _RegisterOnImport())
