"""Model configuration: Meta's `params.json` fields plus a few course additions.

`ModelArgs` mirrors the dataclass in Meta's Llama-2 `model.py`, so a `params.json`
from Meta loads with `ModelArgs.from_dict(json.load(f))`. Presets give the shapes of
the models the course talks about (no weights: shapes only).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

ATTN_IMPLS = ("sdpa", "math")
# The value types of ModelArgs' fields, by their annotation (a bool is not accepted as a number).
_FIELD_TYPES = {"int": ((int,), "an integer"), "float": ((int, float), "a finite number"),
                "bool": ((bool,), "true or false"), "str": ((str,), "a string"), "dict": ((dict,), "an object")}


@dataclass
class ModelArgs:
    # --- Meta's params.json fields ---
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: Optional[int] = None  # None = n_heads (no grouped-query attention)
    vocab_size: int = 32000  # Meta writes -1 ("take it from the tokenizer")
    multiple_of: int = 256  # FFN width is rounded up to a multiple of this
    ffn_dim_multiplier: Optional[float] = None
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    # --- course additions ---
    max_seq_len: int = 4096  # longest sequence the model (and its KV cache) accepts
    rope_scaling: Optional[dict] = None  # HF's format, e.g. {"rope_type": "linear", "factor": 2.0}; see rope.py
    hidden_dim: Optional[int] = None  # explicit FFN width (HF `intermediate_size`); None = Meta's rule
    attn_impl: str = "sdpa"  # "sdpa" (fused kernel) or "math" (explicit softmax, for teaching)
    extra: dict = field(default_factory=dict, repr=False)  # unknown params.json keys, kept verbatim

    def __post_init__(self) -> None:
        self._check_types()
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        checks = [
            (self.dim > 0, "dim", "a positive integer"),
            (self.n_layers > 0, "n_layers", "a positive integer"),
            (self.n_heads > 0 and self.dim % self.n_heads == 0, "n_heads", f"a positive divisor of dim={self.dim}"),
            (self.n_kv_heads > 0 and self.n_heads % self.n_kv_heads == 0, "n_kv_heads",
             f"a positive divisor of n_heads={self.n_heads}"),
            ((self.dim // self.n_heads) % 2 == 0, "n_heads", "a value giving an even head_dim (RoPE rotates pairs)"),
            (self.vocab_size > 0, "vocab_size", "a positive integer (resolve -1 from the tokenizer first)"),
            (self.multiple_of > 0, "multiple_of", "a positive integer"),
            (self.max_seq_len > 0, "max_seq_len", "a positive integer"),
            (self.norm_eps > 0, "norm_eps", "a positive float"),
            (self.rope_theta > 0, "rope_theta", "a positive float"),
            (self.attn_impl in ATTN_IMPLS, "attn_impl", f"one of {ATTN_IMPLS}"),
        ]
        for ok, key, expected in checks:
            if not ok:
                raise ValueError(f"ModelArgs.{key}={getattr(self, key)!r} is invalid: expected {expected}.")
        if self.rope_scaling is not None:  # fail when the config is read, not at the first forward pass
            from .rope import check_scaling

            try:
                check_scaling(self.rope_scaling)
            except ValueError as e:
                raise ValueError(f"ModelArgs.rope_scaling={self.rope_scaling!r} is invalid: {e}") from None

    def _check_types(self) -> None:
        """Refuse a value of the wrong type (a config.json with `"dim": 256.0`, `"256"` or `null`)."""
        for f in dataclasses.fields(self):
            value, optional = getattr(self, f.name), f.type.startswith("Optional[")
            types, expected = _FIELD_TYPES[f.type.removeprefix("Optional[").removesuffix("]")]
            if value is None and optional:
                continue
            if (not isinstance(value, types) or (isinstance(value, bool) and bool not in types)
                    or (isinstance(value, float) and not math.isfinite(value))):
                raise ValueError(f"ModelArgs.{f.name}={value!r} is invalid: expected {expected}"
                                 f"{' or null' if optional else ''}.")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def ffn_hidden_dim(self) -> int:
        """SwiGLU width by Meta's rule: 2/3 of 4*dim, times ffn_dim_multiplier, rounded up to multiple_of."""
        if self.hidden_dim is not None:
            return self.hidden_dim
        hidden = int(2 * (4 * self.dim) / 3)
        if self.ffn_dim_multiplier is not None:
            hidden = int(self.ffn_dim_multiplier * hidden)
        return self.multiple_of * ((hidden + self.multiple_of - 1) // self.multiple_of)

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """(in_features, out_features) of the seven linears of one block, in registration order:
        attention wq wk wv wo, then feed-forward w1 w2 w3 (the weight of each is [out, in])."""
        d, hq, hkv, hid = self.dim, self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim, self.ffn_hidden_dim
        return {"wq": (d, hq), "wk": (d, hkv), "wv": (d, hkv), "wo": (hq, d), "w1": (d, hid), "w2": (hid, d),
                "w3": (d, hid)}

    def num_params(self) -> int:
        """Exact parameter count (embeddings and output head counted separately, as in Llama-2)."""
        linears = sum(i * o for i, o in self.linear_shapes().values())
        per_layer = linears + 2 * self.dim  # + two RMSNorm weights
        return 2 * self.vocab_size * self.dim + self.n_layers * per_layer + self.dim

    def to_dict(self) -> dict:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"}
        out.update(self.extra)
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any], *, source: str = "config") -> "ModelArgs":
        """Build from a dict (Meta's params.json or our config.json); unknown keys go to `extra`."""
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        known = {k: v for k, v in d.items() if k in names}
        extra = {k: v for k, v in d.items() if k not in names}
        try:
            return cls(**known, extra=extra)
        except ValueError as e:
            raise ValueError(f"{source}: {e}") from None
        except TypeError as e:  # e.g. a rope_scaling of the wrong shape
            raise ValueError(f"{source}: cannot build ModelArgs ({e}).") from None

    def replace(self, **changes: Any) -> "ModelArgs":
        return dataclasses.replace(self, **changes)


def _llama3_scaling(factor: float) -> dict:
    """Llama-3.1's RoPE scaling (Meta's apply_scaling; HF's rope_type "llama3") of its 8,192 trained positions."""
    return {"rope_type": "llama3", "factor": factor, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192}


PRESETS: dict[str, ModelArgs] = {
    # The embedded course model (see data/tiny/MODEL_CARD.md when it is shipped).
    "tiny": ModelArgs(dim=256, n_layers=4, n_heads=8, n_kv_heads=4, vocab_size=2048, multiple_of=32,
                      norm_eps=1e-5, max_seq_len=256),
    "llama2-7b": ModelArgs(dim=4096, n_layers=32, n_heads=32, vocab_size=32000, multiple_of=256,
                           norm_eps=1e-5, max_seq_len=4096),
    "llama2-13b": ModelArgs(dim=5120, n_layers=40, n_heads=40, vocab_size=32000, multiple_of=256,
                            norm_eps=1e-5, max_seq_len=4096),
    "llama3-8b": ModelArgs(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, vocab_size=128256,
                           multiple_of=1024, ffn_dim_multiplier=1.3, norm_eps=1e-5, rope_theta=500000.0,
                           max_seq_len=8192),
    # Llama-3.1/3.2 as in Meta's params.json and HF's config.json: 128K context by `llama3` RoPE scaling of
    # the 8,192 trained positions. The 3.2 models tie the output head to the embedding (HF's
    # tie_word_embeddings, read by load_model); num_params() counts the head apart, as for an untied model.
    "llama3.2-1b": ModelArgs(dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, vocab_size=128256, multiple_of=256,
                             ffn_dim_multiplier=1.5, norm_eps=1e-5, rope_theta=500000.0, max_seq_len=131072,
                             rope_scaling=_llama3_scaling(32.0)),
    "llama3.2-3b": ModelArgs(dim=3072, n_layers=28, n_heads=24, n_kv_heads=8, vocab_size=128256, multiple_of=256,
                             ffn_dim_multiplier=1.0, norm_eps=1e-5, rope_theta=500000.0, max_seq_len=131072,
                             rope_scaling=_llama3_scaling(32.0)),
    "llama3.1-8b": ModelArgs(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, vocab_size=128256, multiple_of=1024,
                             ffn_dim_multiplier=1.3, norm_eps=1e-5, rope_theta=500000.0, max_seq_len=131072,
                             rope_scaling=_llama3_scaling(8.0)),
}


def get_preset(name: str) -> ModelArgs:
    """A fresh copy of a preset's ModelArgs."""
    if name not in PRESETS:
        raise ValueError(f"Unknown preset {name!r}: expected one of {sorted(PRESETS)}.")
    return dataclasses.replace(PRESETS[name])


# The dtype names accepted everywhere (CLI flags, load_model, the memory model): this table is their one owner.
DTYPES = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16, "float16": torch.float16,
           "half": torch.float16, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}


def parse_dtype(dtype) -> Optional[torch.dtype]:
    """None, a torch.dtype, or one of 'fp32', 'fp16', 'bf16' (and their long names)."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if str(dtype).lower() not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is unknown: expected one of {sorted(DTYPES)}.")
    return DTYPES[str(dtype).lower()]


def dtype_bytes(dtype) -> int:
    """Bytes per element of a dtype given by name ('bf16') or as a torch.dtype."""
    return parse_dtype(dtype).itemsize


def dtype_name(dtype) -> str:
    """The short name ('fp32', 'fp16', 'bf16') of a dtype given as a torch.dtype or any accepted name."""
    dtype = parse_dtype(dtype)
    return next(name for name in ("fp32", "fp16", "bf16") if DTYPES[name] == dtype)

