"""What a training run is told: `TrainConfig` and the rules its settings follow.

`SETTINGS` says what each setting accepts; `TrainConfig` checks its fields with it, and `minillama train` checks
its flags with the same rules before it loads anything (`check_settings`, `check_4bit_needs_lora`,
`check_extras_need_lora`). Owner of the optimizer names (`OPTIMIZERS`, and which AdamW implementation the
trainer runs: `adamw_is_fused`) and of the AMP modes (`AMP_MODES`, `resolve_amp` for a device); the memory
model and the CLI read them here without importing the training loop.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from dataclasses import dataclass
from typing import Optional

import torch

from ..quant import QUANT_TYPES
from ..rope import check_scaling

AMP_MODES = ("off", "fp16", "bf16")
OPTIMIZERS = ("adamw", "adamw8bit", "paged_adamw8bit", "sgd")


@dataclass
class TrainConfig:
    steps: int = 1000
    batch_size: int = 16          # micro-batch: rows per forward pass
    grad_accum: int = 1           # micro-batches per optimizer step
    lr: float = 2e-3
    min_lr_ratio: float = 0.1     # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 100
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0        # 0: no clipping
    optimizer: str = "adamw"
    amp: str = "off"              # "off" | "fp16" | "bf16" (autocast; fp16 with a GradScaler)
    checkpointing: int = 0        # 0: off; k: every k-th block recomputes its activations
    lora_r: int = 0               # 0: full fine-tuning (or whatever adapters the model already has)
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    lora_targets: str = "wq,wv"   # comma-separated Meta names, or "all"
    rope_scaling: Optional[dict] = None  # HF format (see minillama.rope); None: the model's own
    max_seq_len: int = 0          # 0: the model's own; N: positions up to N (the table extended)
    train_embeddings: bool = False  # with LoRA: the token embeddings train in full too (LongLoRA)
    train_norms: bool = False     # with LoRA: the RMSNorm weights train too
    load_in_4bit: bool = False    # QLoRA: the blocks' linears in 4 bits (needs lora_r > 0)
    quant_type: str = "nf4"       # "nf4" | "fp4"
    double_quant: bool = False    # the 4-bit constants themselves in 8 bits
    quant_blocksize: int = 64     # values per absmax block: a power of two from 32 to 4096
    kernels: bool = True          # hand-written backward passes (minillama.kernels): equal, less memory
    compile: bool = False         # torch.compile each transformer block (compile_blocks)
    eval_every: int = 250
    eval_rows: int = 64           # held-out rows per evaluation set
    save_every: int = 500
    seed: int = 0
    data_sha256: str = ""         # of the training data file(s) (the CLI records it): resuming on other data is refused
    val_data_sha256: str = ""     # of the held-out data file, likewise

    def __post_init__(self):
        check_settings(dataclasses.asdict(self))
        check_4bit_needs_lora(self.load_in_4bit, self.lora_r)
        check_extras_need_lora(self.train_embeddings, self.train_norms, self.lora_r)


def _integer(low: int):
    return lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= low


def _number(low: float, high: float = math.inf, *, above_low: bool = False, below_high: bool = False):
    """A finite number (not a bool) in [low, high]; above_low / below_high make that end open."""
    def ok(v) -> bool:
        return (isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                and (v > low if above_low else v >= low) and (v < high if below_high else v <= high))
    return ok


# What each training setting accepts: TrainConfig checks its fields, and `minillama train` checks its flags
# with the same rules before it loads anything.
SETTINGS = {
    **{key: (_integer(1), "a positive integer")
       for key in ("steps", "batch_size", "grad_accum", "eval_every", "eval_rows", "save_every")},
    **{key: (_integer(0), "an integer >= 0") for key in ("warmup_steps", "checkpointing", "lora_r")},
    "seed": (_integer(-2**63), "an integer"),
    "lr": (_number(0, above_low=True), "a positive number"),
    "min_lr_ratio": (_number(0, 1), "a number in [0, 1] (the cosine ends at lr * min_lr_ratio)"),
    "weight_decay": (_number(0), "a number >= 0"),
    "grad_clip": (_number(0), "a number >= 0 (0: no clipping)"),
    "beta1": (_number(0, 1, below_high=True), "a number in [0, 1)"),
    "beta2": (_number(0, 1, below_high=True), "a number in [0, 1)"),
    "lora_alpha": (_number(0, above_low=True), "a positive number"),
    "lora_dropout": (_number(0, 1, below_high=True), "a number in [0, 1)"),
    "amp": (lambda v: v in AMP_MODES, f"one of {AMP_MODES}"),
    "optimizer": (lambda v: v in OPTIMIZERS, f"one of {OPTIMIZERS}"),
    "lora_targets": (lambda v: isinstance(v, str) and v.strip(",") != "", 'comma-separated Meta names, or "all"'),
    **{key: (lambda v: isinstance(v, str), "a string (a SHA-256 in hex, or empty)")
       for key in ("data_sha256", "val_data_sha256")},
    "load_in_4bit": (lambda v: isinstance(v, bool), "True or False"),
    "train_embeddings": (lambda v: isinstance(v, bool), "True or False"),
    "train_norms": (lambda v: isinstance(v, bool), "True or False"),
    "compile": (lambda v: isinstance(v, bool), "True or False"),
    "kernels": (lambda v: isinstance(v, bool), "True or False"),
    "max_seq_len": (_integer(0), "an integer >= 0 (0: the model's own context)"),
    "rope_scaling": (lambda v: v is None or _valid_scaling(v), "None or a rope_scaling dict such as "
                     "{'rope_type': 'linear', 'factor': 4.0} (see minillama.rope)"),
    "quant_type": (lambda v: v in QUANT_TYPES, f"one of {QUANT_TYPES}"),
    "double_quant": (lambda v: isinstance(v, bool), "True or False"),
    "quant_blocksize": (lambda v: _integer(32)(v) and v <= 4096 and not v & (v - 1), "a power of two from 32 to 4096"),
    # settings of a run that `minillama train` turns into the fields above
    "epochs": (_number(0, above_low=True), "a positive number"),
    "max_len": (_integer(2), "an integer >= 2 (a row's inputs and targets)"),
    "val_fraction": (_number(0, 1, below_high=True), "a number in [0, 1)"),
}


def check_settings(values: dict, name=lambda key, value: f"TrainConfig.{key}={value!r}") -> None:
    """Refuse the first value in `values` that its rule in SETTINGS rejects, in one sentence: `name(key, value)`
    says how the user wrote it (a TrainConfig field by default, a command-line flag for the CLI)."""
    for key, value in values.items():
        ok, expected = SETTINGS[key]
        if not ok(value):
            raise ValueError(f"{name(key, value)} is invalid: expected {expected}.")


def check_4bit_needs_lora(load_in_4bit: bool, lora_r: int, flags: bool = False) -> None:
    """Refuse a 4-bit base without LoRA adapters: its weights are frozen, so full fine-tuning is impossible."""
    if load_in_4bit and not lora_r:
        what = ("--load-in-4bit needs --lora-r R" if flags else
                f"TrainConfig.load_in_4bit=True needs lora_r > 0 (it is {lora_r!r})")
        raise ValueError(f"{what}: a 4-bit base is frozen (QLoRA trains adapters on top of it), so full "
                         f"fine-tuning of a quantised model is refused.")


def _valid_scaling(v) -> bool:
    try:
        check_scaling(v)
    except ValueError:
        return False
    return True


def check_extras_need_lora(train_embeddings: bool, train_norms: bool, lora_r: int, flags: bool = False) -> None:
    """Refuse trainable embeddings / norms without LoRA: full fine-tuning trains them anyway."""
    if (train_embeddings or train_norms) and not lora_r:
        what = "--train-embeddings / --train-norms need --lora-r R" if flags else \
            f"TrainConfig.train_embeddings / train_norms need lora_r > 0 (it is {lora_r!r})"
        raise ValueError(f"{what}: they add the embeddings / norms to the LoRA adapters' trainable parameters, "
                         f"and full fine-tuning trains them already.")


def adamw_is_fused(device_type: str) -> bool:
    """Whether make_optimizer's AdamW runs torch's fused kernel on parameters of this device type ("cpu",
    "cuda"): it has no temporary besides the states, and keeps each tensor's `step` counter on the parameters'
    device (the memory model, measuring.memory, reads it here)."""
    return device_type in ("cpu", "cuda")



CPU_FP16_WARNING = ("fp16 autocast on the CPU runs, but most CPUs have no fp16 matrix units, so it is many times "
                    "slower than fp32: on the CPU use --amp bf16 (fast where `minillama doctor` says bf16 is "
                    "native) or --amp off; fp16 with a GradScaler is meant for CUDA GPUs.")


def resolve_amp(amp: str, device: torch.device, *, strict: bool = False) -> str:
    """The autocast mode to use on `device`: `amp`, or "off" (with a warning) where the device lacks it.

    strict=True refuses instead of falling back.
    """
    if amp not in AMP_MODES:
        raise ValueError(f"amp={amp!r} is invalid: expected one of {AMP_MODES}.")
    problem = None
    if amp == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        problem = f"bf16 autocast is not supported on {torch.cuda.get_device_name(device)} (it needs Ampere or newer)"
    elif amp == "fp16" and not torch.amp.is_autocast_available(device.type):
        problem = f"fp16 autocast is not available on device type {device.type!r}"
    if problem is None:
        if amp == "fp16" and device.type == "cpu":
            warnings.warn(CPU_FP16_WARNING, stacklevel=2)
        return amp
    if strict:
        raise ValueError(f"{problem}; choose --amp off or another mode.")
    warnings.warn(f"{problem}; training without autocast (amp=off) instead.", stacklevel=2)
    return "off"

