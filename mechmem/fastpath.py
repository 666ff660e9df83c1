"""A lean forward pass for Pythia (GPT-NeoX) bridges that fires the bridge's own attention hook points.

Feature extraction needs a forward that reaches the last layer's `hook_pattern`, nothing more.
TransformerBridge's forward does more: 107 aten ops a layer against Hugging Face's 55 (layer-norm
statistics recomputed in float32 for hooks nobody set, three q/k/v matmuls, compatibility-mode
scrubs of the pattern, a KV cache filled and dropped) under about 15 Python wrappers a layer.
`pattern_forward` walks the bridge's *processed* leaf modules instead (the very LayerNorm, Linear
and rotary modules compatibility mode produced, so the weights are the bridge's) and calls the
bridge's real HookPoints `blocks.{l}.attn.hook_attn_scores` and `blocks.{l}.attn.hook_pattern`,
going on with whatever a hook returns. A hook under those names sees, and may edit, exactly what
it sees in the bridge's forward; tests hold the patterns equal to the bridge's.

It applies (`supports`) only to a bridge of a parallel-residual, rotary GPT-NeoX with hooks on
no hook point other than attention scores and patterns; anything else (other architectures, a
legacy HookedTransformer, a user hook on the residual stream) uses the model's own forward.
No padding mask, no KV cache, no gradients: it is a feature extractor, not a replacement model.
"""

from __future__ import annotations

import torch
from jaxtyping import Float, Int
from torch import Tensor

_PATTERN_HOOKS = ("hook_pattern", "hook_attn_scores")


def supports(model) -> bool:
    """Whether `pattern_forward` computes exactly what this model's forward computes, as hooked now."""
    cfg = getattr(model, "cfg", None)
    if cfg is None or not hasattr(model, "original_model") or not hasattr(model, "blocks"):
        return False  # not a TransformerBridge (e.g. a legacy HookedTransformer)
    architecture = getattr(cfg, "architecture", None) or getattr(cfg, "original_architecture", None)
    if architecture != "GPTNeoXForCausalLM" or not getattr(cfg, "parallel_attn_mlp", False):
        return False
    if any(getattr(cfg, flag, False) for flag in ("use_attn_result", "use_split_qkv_input", "use_attn_in")):
        return False
    for name, point in model.hook_dict.items():
        hooked = point._forward_hooks or point._forward_pre_hooks or point._backward_hooks
        if hooked and not name.endswith(_PATTERN_HOOKS):
            return False
    return True


class _Leaves:
    """The plain torch modules a bridge computes with, gathered once per model."""

    def __init__(self, model):
        self.embed = model.embed.original_component
        self.rotary = model.rotary_emb.original_component
        self.layers = []
        for block in model.blocks:
            attn, mlp = block.attn, block.mlp
            self.layers.append(dict(
                ln1=block.ln1.original_component, ln2=block.ln2.original_component,
                q=attn.q.original_component, k=attn.k.original_component, v=attn.v.original_component,
                o=attn.o.original_component, rope=attn._apply_rotary_pos_emb,
                mlp_in=mlp.submodules["in"].original_component, act=mlp.original_component.act,
                mlp_out=mlp.submodules["out"].original_component,
                hook_scores=attn.hook_attn_scores, hook_pattern=attn.hook_pattern,
            ))


def _leaves(model) -> _Leaves:
    # Kept on the model itself (a cache keyed by the model would keep its weights alive forever).
    if "_mechmem_leaves" not in model.__dict__:
        model.__dict__["_mechmem_leaves"] = _Leaves(model)
    return model.__dict__["_mechmem_leaves"]


@torch.no_grad()
def pattern_forward(model, tokens: Int[Tensor, "batch pos"], *, stop_after_layer: int | None = None
                    ) -> Float[Tensor, "batch pos d_model"]:
    """Run the blocks up to `stop_after_layer`'s attention pattern (default: the last layer's).

    Returns the residual stream entering that layer. The bridge's pattern and score hooks fire
    on the way, with their usual names.
    """
    leaves = _leaves(model)
    b, s = tokens.shape
    n_heads, d_head = model.cfg.n_heads, model.cfg.d_head
    last = len(leaves.layers) - 1 if stop_after_layer is None else stop_after_layer
    x = leaves.embed(tokens)
    cos, sin = leaves.rotary(x, torch.arange(s, device=tokens.device)[None])
    future = torch.ones(s, s, dtype=torch.bool, device=tokens.device).triu_(1)
    for layer, L in enumerate(leaves.layers):
        h = L["ln1"](x)
        q = L["q"](h).view(b, s, n_heads, d_head).transpose(1, 2)
        k = L["k"](h).view(b, s, n_heads, d_head).transpose(1, 2)
        q, k = L["rope"](q, k, cos, sin)
        scores = (q @ k.transpose(-2, -1) * d_head**-0.5).masked_fill_(future, float("-inf"))
        pattern = L["hook_pattern"](torch.softmax(L["hook_scores"](scores), dim=-1))
        if layer == last:
            return x
        v = L["v"](h).view(b, s, n_heads, d_head).transpose(1, 2)
        z = (pattern @ v).transpose(1, 2).reshape(b, s, n_heads * d_head)
        x = L["mlp_out"](L["act"](L["mlp_in"](L["ln2"](x)))) + L["o"](z) + x  # parallel residual
    return x
