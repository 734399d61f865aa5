"""Root fixtures: each model is loaded once per session; GPU profiles come from libortho/markers.ini
(package data, read through libortho.gpu.profiles(), the same file an installed wheel uses)."""
from __future__ import annotations

import pytest
import torch


def gpu_profiles() -> dict[str, dict]:
    """{name: {vram_gib, arch, description}} from markers.ini, the one source of GPU profiles."""
    from libortho.gpu import profiles

    return {n: {"vram_gib": p.vram_gib, "arch": p.arch, "description": p.description}
            for n, p in profiles().items()}


def pytest_addoption(parser):
    parser.addoption("--model", default=None,
                     help="GPU benchmarks: also measure this model (HF id, local dir, .gguf, smollm2-135m)")
    # here, not in bench/conftest.py: a plain `pytest --candidate X` (testpaths) reads only this file's options
    parser.addoption("--candidate", default="ortho_tuned",
                     help="Experiment 1: the arm tested as the switch (ortho_tuned, lora: claims hold; delta, "
                          "int4_of_fine_tuned, nf4_of_fine_tuned, posthoc_*: claims fail)")


def pytest_configure(config):
    for name, p in gpu_profiles().items():
        config.addinivalue_line("markers", f"{name}: GPU profile, {p['vram_gib']:g} GiB budget -- {p['description']}")


def _marked_profiles(item, profiles) -> list[str]:
    return [m.name for m in item.iter_markers() if m.name in profiles]


def pytest_collection_modifyitems(config, items):
    """GPU tests are collected and skipped (never deselected) on machines that cannot run them, so
    `pytest -m gtx4050 bench/` on a CPU reports each skip with its reason and exits 0."""
    profiles = gpu_profiles()
    cuda = torch.cuda.is_available()
    total = torch.cuda.get_device_properties(0).total_memory / 2**30 if cuda else 0.0
    for item in items:
        marked = _marked_profiles(item, profiles)
        if (marked or item.get_closest_marker("gpu")) and not cuda:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU (none found); runs with `pytest -m <profile>` on one"))
        elif marked:
            need = min(profiles[n]["vram_gib"] for n in marked)
            if total < 0.97 * need:  # nominal sizes: an "80 GB" H100 reports 79.6 GiB
                item.add_marker(pytest.mark.skip(reason=f"GPU has {total:.1f} GiB, profile {marked} needs {need:g} GiB"))


@pytest.fixture(autouse=True)
def _gpu_profile_cap(request):
    """For a test marked with a GPU profile: cap the allocator to that profile's budget for its duration."""
    from libortho.gpu import apply_cap, profiles, release_cap

    profs = profiles()
    marked = _marked_profiles(request.node, profs)
    if not marked or not torch.cuda.is_available():
        yield None
        return
    prof = min((profs[n] for n in marked), key=lambda p: p.vram_gib)
    request.node.stash[_PROFILE_KEY] = (prof, apply_cap(prof))
    try:
        yield prof
    finally:
        release_cap()


_PROFILE_KEY = pytest.StashKey()


@pytest.fixture
def gpu_profile(request, _gpu_profile_cap):
    """(Profile, cap report) the test runs under; the allocator is already capped to its budget."""
    if _gpu_profile_cap is None:
        pytest.skip("not marked with a GPU profile, or no CUDA")
    return request.node.stash[_PROFILE_KEY]


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
