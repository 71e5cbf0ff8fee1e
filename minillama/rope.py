"""Rotary position embedding (RoPE), in Meta's interleaved-pair convention.

Meta's Llama-2 rotates the pairs (x0, x1), (x2, x3), ... of each head by the angle
`pos * theta ** (-2i / head_dim)`. Hugging Face rotates the halves (x_i, x_{i+d/2}) instead
and permutes the rows of wq/wk when converting, so the two give the same attention
scores (`minillama.checkpoints.weights` does that permutation when loading HF checkpoints).

The angles are recomputed for every forward pass (cheap: positions x head_dim/2) in
fp32, which keeps them exact whatever dtype the model is cast to.
"""

from __future__ import annotations

from typing import Optional

import torch

SUPPORTED_SCALING = ("linear",)


def rope_inv_freq(head_dim: int, theta: float, scaling: Optional[dict] = None,
                  device: Optional[torch.device] = None) -> torch.Tensor:
    """Inverse frequencies `theta ** (-2i / head_dim)`, i = 0 .. head_dim/2 - 1, in fp32.

    `scaling={"type": "linear", "factor": s}` is Position Interpolation: positions are
    divided by `s`, which is the same as dividing every frequency by `s`.
    """
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64, device=device).float() / head_dim))
    if scaling:
        kind = scaling.get("type", scaling.get("rope_type"))
        if kind not in SUPPORTED_SCALING:
            raise ValueError(f"rope_scaling type {kind!r} is not supported: expected one of {SUPPORTED_SCALING}.")
        factor = float(scaling.get("factor", 0))
        if factor < 1.0:
            raise ValueError(f"rope_scaling factor {factor} is invalid: expected a number >= 1.")
        inv_freq = inv_freq / factor
    return inv_freq


def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float,
                 scaling: Optional[dict] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of the rotation angles, shape [len(positions), head_dim // 2], fp32."""
    inv_freq = rope_inv_freq(head_dim, theta, scaling, device=positions.device)
    angles = torch.outer(positions.float(), inv_freq)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs of x ([B, T, n_heads, head_dim]) by the angles in cos/sin ([T, head_dim/2]).

    Computed in fp32 and cast back, as Meta does with complex numbers:
    (a + ib) * (cos + i sin) = (a cos - b sin) + i (a sin + b cos).
    """
    # BEGIN SOLUTION
    xf = x.float().unflatten(-1, (-1, 2))  # [B, T, H, head_dim/2, 2]
    a, b = xf[..., 0], xf[..., 1]
    cos, sin = cos[:, None, :], sin[:, None, :]  # broadcast over heads
    out = torch.stack((a * cos - b * sin, a * sin + b * cos), dim=-1)
    return out.flatten(-2).type_as(x)
    # END SOLUTION
