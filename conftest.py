"""Root fixtures: each model is loaded once per session; GPU profiles come from markers.ini."""
from __future__ import annotations

import configparser
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).parent


def gpu_profiles() -> dict[str, dict]:
    """{name: {vram_gib, arch, description}} from markers.ini, the one source of GPU profiles."""
    cp = configparser.ConfigParser()
    if not cp.read(ROOT / "markers.ini"):
        raise FileNotFoundError(f"{ROOT / 'markers.ini'} is missing")
    return {s: {"vram_gib": float(cp[s]["vram_gib"]), "arch": cp[s].get("arch", ""),
                "description": cp[s].get("description", "")} for s in cp.sections()}


def pytest_configure(config):
    for name, p in gpu_profiles().items():
        config.addinivalue_line("markers", f"{name}: GPU profile, {p['vram_gib']:g} GiB budget -- {p['description']}")


def pytest_collection_modifyitems(config, items):
    profiles = gpu_profiles()
    for item in items:
        marked = [m.name for m in item.iter_markers() if m.name in profiles]
        if (marked or item.get_closest_marker("gpu")) and not torch.cuda.is_available():
            item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU (none found); runs with `pytest -m <profile>` on one"))


@pytest.fixture(scope="session")
def tokenizer():
    """The embedded default's tokenizer (shared by the tiny model)."""
    from libortho.models import tokenizer as load_tok

    return load_tok()


@pytest.fixture
def tiny_model(tokenizer):
    """A fresh tiny random Llama (2 layers, hidden 64), same layout as Llama 3."""
    from libortho.models import tiny_llama

    return tiny_llama(seed=0, vocab_size=len(tokenizer))


@pytest.fixture(scope="session")
def smollm2_state():
    """SmolLM2-135M-Instruct (fp32) loaded once; tests copy it through `smollm2`."""
    from libortho.models import load_model

    return load_model("smollm2-135m")


@pytest.fixture
def smollm2(smollm2_state):
    """A private deep copy of SmolLM2-135M, safe to convert in place."""
    import copy

    return copy.deepcopy(smollm2_state.model)


@pytest.fixture(scope="session")
def eval_text():
    """The embedded default evaluation text (Jargon File prose, Debian package jargon-text)."""
    from libortho.data import jargon

    return jargon()


@pytest.fixture(scope="session")
def calib_batches(tokenizer):
    """8 calibration batches of 128 tokens from the fortunes collection (disjoint from eval text)."""
    from libortho.data import fortunes

    ids = tokenizer(fortunes().text[:40000], add_special_tokens=False, return_tensors="pt").input_ids[0]
    return [ids[i * 128:(i + 1) * 128].unsqueeze(0) for i in range(8)]
