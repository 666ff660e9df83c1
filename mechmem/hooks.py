"""Hook names, built in one place: the shared language between stages.

TransformerBridge (TransformerLens 4) and the legacy HookedTransformer expose the same names.
"""


def pattern_hook(layer: int) -> str:
    """Softmax attention weights of a layer, shape [batch, head, query, key]."""
    return f"blocks.{layer}.attn.hook_pattern"


def z_hook(layer: int) -> str:
    """Per-head attention output before W_O, shape [batch, pos, head, d_head]."""
    return f"blocks.{layer}.attn.hook_z"


def is_pattern_hook(name: str) -> bool:
    return name.startswith("blocks.") and name.endswith(".attn.hook_pattern")


def layer_of(name: str) -> int:
    """Layer index of a `blocks.{l}.…` hook name."""
    return int(name.split(".")[1])
