"""Rotary position embedding (RoPE), in Meta's interleaved-pair convention, and its scalings.

Meta's Llama-2 rotates the pairs (x0, x1), (x2, x3), ... of each head by the angle
`pos * theta ** (-2i / head_dim)`. Hugging Face rotates the halves (x_i, x_{i+d/2}) instead
and permutes the rows of wq/wk when converting, so the two give the same attention
scores (`minillama.checkpoints.weights` does that permutation when loading HF checkpoints).

The angles are recomputed for every forward pass (cheap: positions x head_dim/2) in
fp32, which keeps them exact whatever dtype the model is cast to.

Longer context: `ModelArgs.rope_scaling` is a dict in Hugging Face's format,
`{"rope_type": "linear" | "ntk" | "dynamic" | "yarn" | "llama3", "factor": s, ...}` (the key `"type"` of
transformers 4.x is read too). Each method is one function below that changes the frequencies; all of them
give the same angles as transformers' `LlamaForCausalLM` (`ntk`, which HF has no type for, equals HF's plain
RoPE with `rope_theta` set to the scaled base).
"""

from __future__ import annotations

import math
from typing import Optional

import torch

ROPE_TYPES = ("linear", "ntk", "dynamic", "yarn", "llama3")
NEEDS_ORIGINAL = ("dynamic", "yarn", "llama3")  # methods that need the trained window length


def scaling_type(scaling: dict) -> str:
    """The method of a rope_scaling dict: its "rope_type" (transformers 5.x) or "type" (4.x)."""
    return scaling.get("rope_type", scaling.get("type"))


def check_scaling(scaling: dict) -> None:
    """Refuse an unknown method, a factor below 1, or a missing original_max_position_embeddings."""
    if not isinstance(scaling, dict):
        raise ValueError(f"rope_scaling {scaling!r} is invalid: expected an object like "
                         f"{{\"rope_type\": \"linear\", \"factor\": 2.0}}.")
    kind = scaling_type(scaling)
    if kind not in ROPE_TYPES:
        raise ValueError(f"rope_scaling type {kind!r} is unknown: expected one of {ROPE_TYPES}.")
    factor = scaling.get("factor")
    if not _is_number(factor) or not 1.0 <= factor < math.inf:
        raise ValueError(f"rope_scaling factor {factor!r} is invalid for {kind!r}: expected a number >= 1.")
    original = scaling.get("original_max_position_embeddings")
    if kind in NEEDS_ORIGINAL and (isinstance(original, bool) or not isinstance(original, int) or original <= 0):
        raise ValueError(f"rope_scaling {kind!r} needs original_max_position_embeddings (the context length the "
                         f"model was trained with) as a positive integer, got {original!r}.")
    low, high = scaling.get("low_freq_factor", 1.0), scaling.get("high_freq_factor", 4.0)
    if kind == "llama3" and not (_is_number(low) and _is_number(high) and 0 < low < high):
        raise ValueError(f"rope_scaling 'llama3' needs numbers 0 < low_freq_factor < high_freq_factor, got "
                         f"{low!r} and {high!r}.")


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


# ---- one function per method --------------------------------------------------------------------------
def linear_inv_freq(inv_freq: torch.Tensor, factor: float) -> torch.Tensor:
    """Position Interpolation (linear): positions are divided by s, i.e. every frequency: `w_i / s`."""
    # BEGIN SOLUTION a5
    return inv_freq / factor
    # END SOLUTION


def ntk_theta(theta: float, factor: float, head_dim: int) -> float:
    """Static NTK-aware scaling: a larger base, `theta' = theta * s ** (d / (d - 2))`, so the lowest
    frequency is divided by s while the highest (w_0 = 1) is unchanged."""
    # BEGIN SOLUTION a5
    return theta * factor ** (head_dim / (head_dim - 2))
    # END SOLUTION


def dynamic_theta(theta: float, factor: float, head_dim: int, seq_len: int, original: int) -> float:
    """Dynamic NTK: the NTK base recomputed from the current length L (the largest position + 1),
    `theta' = theta * (s * L / L0 - (s - 1)) ** (d / (d - 2))` when L > L0, else theta (unscaled)."""
    if seq_len <= original:
        return theta
    return theta * (factor * seq_len / original - (factor - 1)) ** (head_dim / (head_dim - 2))


def yarn_inv_freq(inv_freq: torch.Tensor, factor: float, head_dim: int, theta: float, original: int,
                  beta_fast: float = 32, beta_slow: float = 1, truncate: bool = True) -> torch.Tensor:
    """YaRN ("NTK-by-parts"): frequency i is interpolated by a ramp r_i between 0 and 1,
    `w_i' = (1 - r_i) * w_i + r_i * w_i / s`. Pair i turns `L0 * w_i / 2pi` times over the trained window;
    pairs turning more than beta_fast times keep their frequency (r = 0), fewer than beta_slow times are
    divided by s (r = 1), and r is linear in i between the two (HF rounds the bounds outwards)."""
    # BEGIN SOLUTION a5
    def pair_index(turns: float) -> float:  # the i at which L0 * w_i / 2pi == turns
        return head_dim * math.log(original / (turns * 2 * math.pi)) / (2 * math.log(theta))

    low, high = pair_index(beta_fast), pair_index(beta_slow)
    if truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    if low == high:
        high += 0.001  # as HF: avoid a division by zero
    ramp = ((torch.arange(len(inv_freq), dtype=torch.float32, device=inv_freq.device) - low) / (high - low)).clamp(0, 1)
    return inv_freq * (1 - ramp) + inv_freq / factor * ramp
    # END SOLUTION


def yarn_attention_factor(scaling: dict) -> float:
    """YaRN's attention temperature, multiplied into cos and sin (so scores by its square):
    `0.1 * ln(s) + 1`, or `attention_factor` when given (DeepSeek's mscale / mscale_all_dim ratio too)."""
    factor = scaling["factor"]

    def mscale(m: float = 1.0) -> float:
        return 1.0 if factor <= 1 else 0.1 * m * math.log(factor) + 1.0

    if scaling.get("attention_factor") is not None:
        return float(scaling["attention_factor"])
    if scaling.get("mscale") and scaling.get("mscale_all_dim"):
        return mscale(scaling["mscale"]) / mscale(scaling["mscale_all_dim"])
    return mscale()


def llama3_inv_freq(inv_freq: torch.Tensor, factor: float, original: int, low_freq_factor: float = 1.0,
                    high_freq_factor: float = 4.0) -> torch.Tensor:
    """Llama 3.1: by wavelength `lambda_i = 2pi / w_i`, short waves (lambda < L0 / high_freq_factor) keep their
    frequency, long waves (lambda > L0 / low_freq_factor) are divided by s, and those between are blended with
    `g = (L0 / lambda - low) / (high - low)`: `w' = (1 - g) * w / s + g * w`."""
    wavelen = 2 * math.pi / inv_freq
    smooth = (original / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    blended = (1 - smooth) * inv_freq / factor + smooth * inv_freq
    out = torch.where(wavelen > original / low_freq_factor, inv_freq / factor, blended)
    return torch.where(wavelen < original / high_freq_factor, inv_freq, out)


# ---- the angles the model uses ------------------------------------------------------------------------
def rope_inv_freq(head_dim: int, theta: float, scaling: Optional[dict] = None,
                  device: Optional[torch.device] = None, seq_len: Optional[int] = None) -> torch.Tensor:
    """Inverse frequencies `theta ** (-2i / head_dim)`, i = 0 .. head_dim/2 - 1, in fp32, after `scaling`.

    seq_len: the current length (largest position + 1), which only `dynamic` reads (None: unscaled).
    """
    if scaling:
        check_scaling(scaling)
        kind, factor = scaling_type(scaling), scaling["factor"]
        if kind == "ntk":
            theta = ntk_theta(theta, factor, head_dim)
        elif kind == "dynamic" and seq_len is not None:
            theta = dynamic_theta(theta, factor, head_dim, seq_len, scaling["original_max_position_embeddings"])
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64, device=device).float() / head_dim))
    kind = scaling_type(scaling) if scaling else None
    if kind == "linear":
        inv_freq = linear_inv_freq(inv_freq, scaling["factor"])
    elif kind == "yarn":
        extra = {k: scaling[k] for k in ("beta_fast", "beta_slow", "truncate") if scaling.get(k) is not None}
        inv_freq = yarn_inv_freq(inv_freq, scaling["factor"], head_dim, theta,
                                 scaling["original_max_position_embeddings"], **extra)
    elif kind == "llama3":
        extra = {k: scaling[k] for k in ("low_freq_factor", "high_freq_factor") if k in scaling}
        inv_freq = llama3_inv_freq(inv_freq, scaling["factor"], scaling["original_max_position_embeddings"], **extra)
    return inv_freq


def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float,
                 scaling: Optional[dict] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of the rotation angles, shape [len(positions), head_dim // 2], fp32.

    `dynamic` takes its length from the positions (as HF does, also one token at a time with a KV cache:
    keys already cached keep the angles they were given); `yarn` multiplies cos and sin by its attention factor.
    """
    dynamic = bool(scaling) and scaling_type(scaling) == "dynamic" and positions.numel() > 0
    seq_len = int(positions.max()) + 1 if dynamic else None
    inv_freq = rope_inv_freq(head_dim, theta, scaling, device=positions.device, seq_len=seq_len)
    angles = torch.outer(positions.float(), inv_freq)
    cos, sin = angles.cos(), angles.sin()
    if scaling and scaling_type(scaling) == "yarn":
        m = yarn_attention_factor(scaling)
        cos, sin = cos * m, sin * m
    return cos, sin


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs of x ([B, T, n_heads, head_dim]) by the angles in cos/sin ([T, head_dim/2]).

    Computed in fp32 and cast back, as Meta does with complex numbers:
    (a + ib) * (cos + i sin) = (a cos - b sin) + i (a sin + b cos).
    """
    # BEGIN SOLUTION a1
    # One complex multiplication, as Meta does: the pairs read as complex numbers in place (no copy in fp32).
    # Written out with real tensors (a*cos - b*sin, a*sin + b*cos, then a stack) it is the same arithmetic in
    # seven strided element-wise ops and as many in the backward pass: several times slower on the CPU.
    if torch.compiler.is_compiling():  # torch.compile fuses this real form into one kernel; complex it cannot
        a, b = x.float().unflatten(-1, (-1, 2)).unbind(-1)
        c, s = cos[:, None, :], sin[:, None, :]
        return torch.stack((a * c - b * s, a * s + b * c), dim=-1).flatten(-2).type_as(x)
    xc = torch.view_as_complex(x.float().contiguous().unflatten(-1, (-1, 2)))  # [B, T, H, head_dim/2]
    rot = torch.complex(cos, sin)[:, None, :]  # [T, 1, head_dim/2]: broadcast over heads
    return torch.view_as_real(xc * rot).flatten(-2).type_as(x)
    # END SOLUTION


# ---- the command line's TYPE:FACTOR ------------------------------------------------------------------
def scaling_from_spec(spec: str, original: int, flag: str = "--rope-scaling") -> Optional[dict]:
    """The rope_scaling dict of a spec written "TYPE:FACTOR" ("linear:4", "ntk:4", "dynamic:4", "yarn:4",
    "llama3:8"; `minillama train --rope-scaling`, `minillama eval --variants`), or "none" / "base" (None: the
    trained angles, the position table only extended). `flag` names the spec in an error.

    `original` is the window the checkpoint was trained with. It becomes original_max_position_embeddings only
    for the methods that read it (NEEDS_ORIGINAL), as in transformers: its rope init functions read it for yarn
    and llama3, while its linear and dynamic read no such key (their config check warns of it as unrecognised;
    HF's dynamic takes config.max_position_embeddings as the trained window: minillama's dynamic keeps the window
    in the dict, and the HF export moves it there). ntk, which HF has no type for, reads none either."""
    text = spec.strip().lower() if isinstance(spec, str) else spec
    if text in ("none", "base"):
        return None
    kind, sep, factor = text.partition(":") if isinstance(text, str) else (None, "", "")
    if kind not in ROPE_TYPES:
        raise ValueError(f"{flag} {spec!r}: unknown type {kind!r}: expected TYPE:FACTOR with TYPE one of "
                         f"{ROPE_TYPES} (e.g. linear:4), or none (also written base).")
    try:
        value = float(factor)
    except ValueError:
        raise ValueError(f"{flag} {spec!r}: the factor {factor!r} is not a number: expected TYPE:FACTOR, "
                         f"e.g. {kind}:4.") from None
    if not 1.0 < value < math.inf:
        raise ValueError(f"{flag} {spec!r}: the factor must be above 1 (it divides the positions or stretches "
                         f"the wavelengths by that much), got {factor}.")
    scaling = {"rope_type": kind, "factor": value}
    if kind in NEEDS_ORIGINAL:
        scaling["original_max_position_embeddings"] = int(original)
    check_scaling(scaling)
    return scaling
