"""Where each weight lives in Meta's and in HF's checkpoints, and the q/k permutation between them.

Meta rotates interleaved pairs (x0, x1), (x2, x3), ... of each head; HF rotates halves (x_i, x_{i + d/2}).
So HF stores the output rows of wq and wk (and of a LoRA B on them) in another order inside each head:
    w_hf = w_meta.view(heads, head_dim // 2, 2, in).transpose(1, 2).reshape(out, in)
and HF -> Meta swaps the same two axes back. Checkpoints (minillama.checkpoints) and LoRA adapters
(minillama.lora) both import this one module.
"""

from __future__ import annotations

import re
from typing import Optional

import torch

from .config import ModelArgs

# Meta name -> HF name. Layer entries map the module path inside `layers.N.`.
_TOP_NAMES = {"tok_embeddings": "model.embed_tokens", "norm": "model.norm", "output": "lm_head"}
_LAYER_NAMES = {
    "attention.wq": "self_attn.q_proj", "attention.wk": "self_attn.k_proj",
    "attention.wv": "self_attn.v_proj", "attention.wo": "self_attn.o_proj",
    "feed_forward.w1": "mlp.gate_proj", "feed_forward.w2": "mlp.down_proj", "feed_forward.w3": "mlp.up_proj",
    "attention_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
}


def _rename(name: str, top: dict, layer: dict, src_prefix: str, dst_prefix: str) -> Optional[str]:
    module, _, param = name.rpartition(".")  # e.g. ("layers.0.attention.wq", "weight")
    if module in top:
        return f"{top[module]}.{param}"
    m = re.fullmatch(re.escape(src_prefix) + r"(\d+)\.(.+)", module)
    if m and m.group(2) in layer:
        return f"{dst_prefix}{m.group(1)}.{layer[m.group(2)]}.{param}"
    return None


def meta_to_hf_name(name: str) -> Optional[str]:
    """'layers.0.attention.wq.weight' -> 'model.layers.0.self_attn.q_proj.weight' (None if unknown)."""
    return _rename(name, _TOP_NAMES, _LAYER_NAMES, "layers.", "model.layers.")


def hf_to_meta_name(name: str) -> Optional[str]:
    """'model.layers.0.self_attn.q_proj.weight' -> 'layers.0.attention.wq.weight' (None if unknown)."""
    inv = lambda d: {v: k for k, v in d.items()}  # noqa: E731
    return _rename(name, inv(_TOP_NAMES), inv(_LAYER_NAMES), "model.layers.", "layers.")


def permute_meta_to_hf(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Reorder the output rows of a q/k projection (or a LoRA B) from Meta's pairs to HF's halves."""
    out, rest = w.shape[0], w.shape[1:]
    return w.reshape(n_heads, out // n_heads // 2, 2, *rest).transpose(1, 2).reshape(out, *rest)


def permute_hf_to_meta(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Inverse of permute_meta_to_hf."""
    out, rest = w.shape[0], w.shape[1:]
    return w.reshape(n_heads, 2, out // n_heads // 2, *rest).transpose(1, 2).reshape(out, *rest)


def qk_heads(meta_name: str, args: ModelArgs) -> Optional[int]:
    if ".attention.wq." in meta_name:
        return args.n_heads
    if ".attention.wk." in meta_name:
        return args.n_kv_heads
    return None
