"""libortho: an INT4 base from public weights plus a sparse ortho stream, switched by alpha.

    y = base(x) + alpha * ortho(x)      alpha=1: the fine-tuned model; alpha=0: privacy kill switch
"""
from .config import Backend, Mode, OrthoConfig, Score
from .convert import cache_base_, load, orthogonalize_, save, set_alpha
from .linear import OrthoLinear

__all__ = ["OrthoConfig", "Mode", "Score", "Backend", "OrthoLinear", "orthogonalize_", "set_alpha", "save",
           "load", "cache_base_"]
__version__ = "0.1.0"
