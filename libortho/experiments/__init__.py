"""Experiments users run; each takes a `RunContext` and returns its section of the results JSON.

A new experiment is one decorated function: `@register("name")`.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

EXPERIMENTS: dict[str, Callable] = {}


def register(name: str):
    def deco(fn):
        EXPERIMENTS[name] = fn
        return fn
    return deco


@dataclass
class RunContext:
    """What every experiment gets from the command line."""

    model: str = "smollm2-135m"
    output_dir: Path = Path("out")
    seed: int = 0
    device: str = "cpu"
    text: str = "default"
    profile: str | None = None
    num_canaries: int | None = None
    canary_format: str = "plain"
    quantization_bits: int | None = None  # as asked on the command line (None: not asked)
    no_quantization: bool = False
    progress: bool = True
    size: str = "auto"  # quick | full | auto (full on a GPU, quick on a CPU)
    extra: dict = field(default_factory=dict)  # run_facts of the JSON (memory_policy: what load_bits applies)
    run_id: str = ""  # names every file of this run (the CLI sets it to the results JSON's stem)

    def artifact(self, name: str) -> Path:
        """Path of a file this run writes beside its JSON (`<run_id>_<name>`): no other run can take it."""
        return Path(self.output_dir) / (f"{self.run_id}_{name}" if self.run_id else name)

    @property
    def full_size(self) -> bool:
        """Run the acceptance size? `auto` does so on a GPU only (it takes hours on 2 CPU cores)."""
        return self.size == "full" or (self.size == "auto" and str(self.device).startswith("cuda"))

    @property
    def load_bits(self) -> int | None:
        """Bits to load the model in, as the memory policy decided (`extra["memory_policy"]["precision"]`:
        "int4", "int8", or "full" / absent = None, as stored). Every experiment passes it to `load_model`."""
        return {"int4": 4, "int8": 8}.get((self.extra.get("memory_policy") or {}).get("precision"))


    @property
    def budget_gib(self) -> float | None:
        """The profile's GPU budget (None without --profile)."""
        return (self.extra.get("memory_policy") or {}).get("budget_gib")

    @property
    def streamed(self) -> bool:
        """Read the checkpoint layer by layer instead of loading it: a local checkpoint directory on a GPU whose
        budget the policy met by going to 4-bit (the full-precision model does not fit)."""
        return self.load_bits == 4 and Path(self.model).is_dir() and str(self.device).startswith("cuda")

    @property
    def random_weights(self) -> bool:
        """The model is a random test model (run_facts.model.weights, or `tiny`)."""
        return (self.extra.get("model") or {}).get("weights") == "random" or self.model == "tiny"


ORDER = ("convert", "kill_switch", "null_test")  # `run --experiment all` runs them in this order


def load_all() -> dict[str, Callable]:
    """Import the experiment modules so they register themselves; the dict is in `ORDER` (then any other, by
    name), whatever order the modules were first imported in."""
    # kill_switch_stream registers experiment 1 (both paths); secrets_study and utility are not in ORDER ("all")
    from . import demo, kill_switch_stream, null, secrets_study, utility  # noqa: F401

    rank = {n: i for i, n in enumerate(ORDER)}
    return dict(sorted(EXPERIMENTS.items(), key=lambda kv: (rank.get(kv[0], len(ORDER)), kv[0])))
