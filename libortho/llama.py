"""What libortho knows about the Llama family (Llama 3 / 3.1 / 3.2, SmolLM2): which linears exist."""

ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")
LLAMA_LINEARS = ATTENTION + MLP


def is_target(name: str, targets) -> bool:
    """`model.layers.3.mlp.up_proj` is a target when its last component is in `targets`."""
    return name.rsplit(".", 1)[-1] in targets
