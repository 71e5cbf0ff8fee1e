"""The training loop, one for every lesson: pre-training the tiny model, SFT, LoRA, long context.

Each technique of the course is switched by TrainConfig and lives in one place here:

* LoRA (`lora_r` > 0): `minillama.lora.apply_lora` before the first step; only the adapters train and
  checkpoints hold the adapter, not the model.
* Mixed precision (`amp` = "fp16" | "bf16"): the forward runs under `torch.autocast`; fp16 adds a
  `torch.amp.GradScaler` (a step whose gradients overflow is skipped and logged). The weights, the
  gradients and the optimizer stay in the model's dtype (fp32 master weights unless the model itself is bf16).
* Gradient accumulation (`grad_accum` = k): k micro-batches per optimizer step. Every micro-batch's loss
  is its summed token losses divided by the target tokens of the *whole* effective batch, so the
  gradient equals one big batch's even when micro-batches hold different numbers of tokens.
* Gradient checkpointing (`checkpointing` = k): every k-th transformer block recomputes its
  activations in the backward pass (`Transformer.set_checkpointing`).
* Hand-written backward passes (`kernels`, on by default): `minillama.kernels.enable_kernels` runs RMSNorm,
  SwiGLU and the loss through backward passes that keep fewer tensors than autograd (equal values and
  gradients, less activation memory: the loss never keeps every position's logits). The model is plain
  again after train(); kernels=False trains the plain autograd model.
* torch.compile (`compile`): each transformer block's forward is compiled (`compile_blocks`): the same
  arithmetic, with the element-wise work around the matrix products (RMSNorm, RoPE, SwiGLU, residuals) fused
  into a few generated kernels. The first step pays the compilation; the blocks are plain again after train().
* Optimizers: AdamW (torch), 8-bit AdamW and paged 8-bit AdamW (bitsandbytes), plain SGD.
* Longer context (`rope_scaling`, `max_seq_len`): the model's RoPE scaling and position table are set
  before the first step (`extend_context`), and recorded with the run and the saved adapter. With LoRA,
  `train_embeddings` / `train_norms` train the embeddings and RMSNorm weights in full too (LongLoRA's
  finding: needed to adapt to much longer contexts), saved with the adapter as PEFT `modules_to_save`.
* QLoRA (`load_in_4bit` with `lora_r` > 0): the attention and feed-forward linears are quantised to 4 bits
  (`minillama.quant.quantize_model`: `quant_type`, `double_quant`, `quant_blocksize`) before the adapters go
  on; the 4-bit base is frozen, so a 4-bit run without LoRA is refused.

Around them: warmup + cosine schedule, gradient clipping (after unscaling), a JSONL log, tqdm, periodic
held-out evaluation, and atomic checkpoints holding everything a resumed run needs to continue exactly
(weights or adapter, optimizer, scaler, RNG states, step; the data order is a function of the step).
"""

from __future__ import annotations

import dataclasses
import errno
import importlib.util
import json
import math
import pickle
import os
import random
import re
import resource
import shutil
import tempfile
import time
import warnings
from contextlib import nullcontext, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..checkpoints import load_model, save_model
from ..checkpoints.weights import args_to_hf_config
from ..files import atomic_directory, atomic_write_text, open_nofollow, run_lock
from ..progress import progress_bar
from . import distributed
from .data import IGNORE_INDEX, as_dataset, batches
from ..kernels import disable_kernels, enable_kernels
from ..model import Transformer
from ..quant import QUANT_TYPES, quantize_model
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


def extend_context(model: Transformer, rope_scaling: Optional[dict], max_seq_len: int = 0) -> Transformer:
    """Give the model a RoPE scaling and a longer position table (a config change: RoPE angles are computed
    per forward pass). A scaling that contradicts the one already in the model's config is refused."""
    own = model.args.rope_scaling
    if rope_scaling is not None and own is not None and own != rope_scaling:
        raise ValueError(f"rope_scaling {rope_scaling} contradicts the model's own {own} (from its checkpoint's "
                         f"config): refused; train from the unscaled checkpoint, or keep its scaling.")
    changes = {}
    if rope_scaling is not None:
        changes["rope_scaling"] = rope_scaling
    if max_seq_len:
        changes["max_seq_len"] = max_seq_len
    if changes:
        model.args = model.args.replace(**changes)
    return model


EXTRA_TRAINABLE = {"train_embeddings": ("tok_embeddings.",), "train_norms": ("attention_norm.", "ffn_norm.", "norm.")}


def _unfreeze_extras(model: Transformer, cfg: "TrainConfig") -> None:
    """With LoRA, let the embeddings and/or the RMSNorm weights train as well."""
    prefixes = tuple(p for key, ps in EXTRA_TRAINABLE.items() if getattr(cfg, key) for p in ps)
    for name, p in model.named_parameters():
        if ".lora_" not in name and (name.startswith(prefixes) or any(f".{x}" in name for x in prefixes)):
            p.requires_grad_(True)


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup to cfg.lr, then cosine decay to cfg.lr * cfg.min_lr_ratio at cfg.steps."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def adamw_is_fused(device_type: str) -> bool:
    """Whether make_optimizer's AdamW runs torch's fused kernel on parameters of this device type ("cpu",
    "cuda"): it has no temporary besides the states, and keeps each tensor's `step` counter on the parameters'
    device (the memory model, measuring.memory, reads it here)."""
    return device_type in ("cpu", "cuda")


def make_optimizer(model: Transformer, cfg: TrainConfig) -> torch.optim.Optimizer:
    """cfg.optimizer over the trainable parameters, weight decay on matrices only (as nanoGPT/llama2.c)."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("The model has no trainable parameter.")
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [g for g in ({"params": decay, "weight_decay": cfg.weight_decay},
                          {"params": no_decay, "weight_decay": 0.0}) if g["params"]]
    if cfg.optimizer == "adamw":
        # The fused kernel updates each tensor in one pass: the default loop makes a dozen element-wise ops
        # (and temporaries) per parameter. 4x faster for the tiny model's 4M parameters on a CPU (about 4 ms against
        # 15-19; `python benchmarks/profile_step.py --full`), a few launches instead of hundreds on CUDA.
        fused = True if all(adamw_is_fused(p.device.type) for p in params) else None
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=fused)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr)
    try:
        import bitsandbytes as bnb
    except ImportError:
        raise ImportError(f"optimizer={cfg.optimizer!r} needs bitsandbytes, which is not installed: "
                          "pip install -e '.[quant]' (or choose adamw).") from None
    cls = bnb.optim.AdamW8bit if cfg.optimizer == "adamw8bit" else bnb.optim.PagedAdamW8bit
    return cls(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))


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


def is_quantized(model) -> bool:
    """Whether the model already holds 4-bit linears (layers with a dequantized_weight() method)."""
    return any(hasattr(m, "dequantized_weight") for m in model.modules())


def prepare_model(model: Transformer, cfg: TrainConfig) -> Transformer:
    """Apply the model-side techniques of cfg: 4-bit base weights (unless the model already has them), LoRA
    adapters, gradient checkpointing, then the hand-written backward passes and torch.compile."""
    extend_context(model, cfg.rope_scaling, cfg.max_seq_len)
    if cfg.load_in_4bit and not is_quantized(model):
        quantize_model(model, quant_type=cfg.quant_type, double_quant=cfg.double_quant,
                       blocksize=cfg.quant_blocksize)
    if cfg.lora_r:
        from ..lora import apply_lora

        targets = "all" if cfg.lora_targets == "all" else tuple(t for t in cfg.lora_targets.split(",") if t)
        apply_lora(model, r=cfg.lora_r, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout, targets=targets)
        _unfreeze_extras(model, cfg)
    model.set_checkpointing(cfg.checkpointing)
    (enable_kernels if cfg.kernels else disable_kernels)(model)  # after checkpointing: it reads it
    if cfg.compile:
        compile_blocks(model)
    return model


def compile_problem(device) -> Optional[str]:
    """Why torch.compile cannot generate kernels for `device` here (None: it can). Inductor writes C++ for
    the CPU, which needs a C++ compiler, and Triton for CUDA GPUs."""
    kind = torch.device(device).type
    if kind == "cpu" and not any(shutil.which(c) for c in (os.environ.get("CXX"), "g++", "clang++") if c):
        return "torch.compile needs a C++ compiler for the CPU (g++ or clang++, or $CXX), and none is on PATH"
    if kind == "cuda" and importlib.util.find_spec("triton") is None:
        return "torch.compile needs Triton for CUDA GPUs (pip install triton), and it is not installed"
    if kind not in ("cpu", "cuda"):
        return f"torch.compile is used here on cpu and cuda only, not on {kind}"
    return None


def compile_blocks(model: Transformer, enable: bool = True) -> Transformer:
    """torch.compile each transformer block's forward, in place (enable=False: back to the plain forward).

    Only the blocks: the same parameters, module names and state_dict (checkpoints and adapters are unchanged),
    and every block shares one compiled graph (they run the same code). Apply it after LoRA / 4-bit / set_
    checkpointing: a module replaced afterwards makes the block recompile. The loss and the optimizer stay eager.
    Compiling a block's forward sets an instance attribute `forward` that shadows the class's; deleting it
    restores the plain forward (used after training, so that generation does not recompile per position)."""
    if enable:
        problem = compile_problem(next(model.parameters()).device)
        if problem:
            raise RuntimeError(f"Cannot compile the model's blocks: {problem}; train without --compile.")
        torch.compiler.reset()  # all blocks of all models share one cache of graphs (at most 8): start it afresh
    for block in model.layers:
        if "forward" in vars(block):  # compiled before: start from the plain forward again
            del block.forward
        if enable:
            block.forward = torch.compile(block.forward)
    return model


def _autocast(device: torch.device, amp: str):
    """The context manager a forward pass runs in: nullcontext() for amp="off", otherwise torch.autocast on
    device.type with dtype float16 ("fp16") or bfloat16 ("bf16")."""
    if amp == "off":
        return nullcontext()
    # BEGIN SOLUTION a3
    return torch.autocast(device.type, dtype=torch.float16 if amp == "fp16" else torch.bfloat16)
    # END SOLUTION


def train_step(model, optimizer, scaler, micro_batches, cfg: TrainConfig, amp: str = "off") -> dict:
    """One optimizer step over the micro-batches [(inputs, targets), ...] (already on the device).

    Returns {"loss" (mean per target token over the whole effective batch), "tokens" (target tokens),
    "grad_norm" (before clipping; None without clipping), "skipped" (GradScaler found inf/NaN gradients)}.

    Token-normalised accumulation: each micro-batch's loss is model(x, y, reduction="sum") * world / n_target
    (n_target: the target tokens of ALL micro-batches on all ranks; world: the number of ranks, 1 in one
    process, because DDP averages the ranks' gradients), added to `total` as loss.detach() / world, computed under _autocast(device, amp) and backpropagated as
    scaler.scale(loss).backward(), so the summed gradient equals that of one big batch. Under DDP, wrap every
    micro-batch but the last in model.no_sync() when the model has it. Then: if cfg.grad_clip, unscale
    (scaler.unscale_), clip all the optimizer's parameters to norm cfg.grad_clip and keep the norm before
    clipping; scaler.step(optimizer); scaler.update(); "skipped" is True when the scale went down (an enabled
    scaler found inf/NaN); finally optimizer.zero_grad(set_to_none=True).
    """
    device = micro_batches[0][0].device
    # Target tokens of the whole effective batch: every micro-batch, on every rank (distributed.py)
    n_target = int(distributed.all_reduce_sum(sum(int((y != IGNORE_INDEX).sum()) for _, y in micro_batches), device))
    if n_target == 0:
        raise ValueError("This step's batch has no target token (every label is -100).")
    world = distributed.world_size()  # DDP/FSDP average the ranks' gradients: * world makes it a sum
    # BEGIN SOLUTION a3
    total = torch.zeros((), device=device)
    for j, (x, y) in enumerate(micro_batches):
        # Under DDP, gradients are all-reduced only on the last micro-batch of the step.
        last = j == len(micro_batches) - 1
        sync = nullcontext() if last or not hasattr(model, "no_sync") else model.no_sync()
        with sync:
            with _autocast(device, amp):
                loss = model(x, y, reduction="sum") * world / n_target  # token-normalised, effective batch
            scaler.scale(loss).backward()
        total += loss.detach() / world
    # END SOLUTION
    total = distributed.all_reduce_sum(total.item(), device)  # one host sync per step, not per micro-batch
    if not math.isfinite(total):
        raise FloatingPointError(f"the loss is {total}")
    # BEGIN SOLUTION a3
    grad_norm = None
    if cfg.grad_clip:
        scaler.unscale_(optimizer)  # clip the true gradients, not the scaled ones
        params = [p for g in optimizer.param_groups for p in g["params"]]
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip))
    scale = scaler.get_scale() if scaler.is_enabled() else None
    scaler.step(optimizer)  # skipped by the scaler when the gradients hold inf/NaN
    scaler.update()
    skipped = scale is not None and scaler.get_scale() < scale
    optimizer.zero_grad(set_to_none=True)
    # END SOLUTION
    return {"loss": total, "tokens": n_target, "grad_norm": grad_norm, "skipped": skipped}


@torch.no_grad()
def evaluate_loss(model: Transformer, inputs, targets=None, batch_size: int = 16, amp: str = "off",
                  progress: bool = False, desc: str = "evaluate") -> float:
    """Mean cross-entropy per target token over the rows of (inputs, targets) or of an SFTDataset."""
    data = as_dataset((inputs, targets) if targets is not None else inputs)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for i in progress_bar(range(0, len(data), batch_size), desc=desc, progress=progress, leave=False, unit="batch"):
        x, y = (t.to(device) for t in data.batch(list(range(i, min(i + batch_size, len(data))))))
        with _autocast(device, amp):
            total += float(model(x, y, reduction="sum"))
        count += int((y != IGNORE_INDEX).sum())
    model.train(was_training)
    return total / max(count, 1)


# ---- checkpoints ---------------------------------------------------------------------------------
def _trainable_adapters(model) -> list[str]:
    from ..lora import lora_layers

    names = set()
    for _, layer in lora_layers(model):
        for name, a in layer.lora_A.items():
            if a.weight.requires_grad:
                names.add(name)
    return sorted(names)


def _extras(model) -> list[str]:
    """Trainable parameters that are neither LoRA nor a linear layer's weight: embeddings and norms."""
    return [n for n, p in model.named_parameters()
            if p.requires_grad and ".lora_" not in n and (n.startswith("tok_embeddings.") or "norm." in n)]


def _base_trains(model) -> bool:
    """Whether the base linears themselves train (full fine-tuning): then a checkpoint holds the whole model."""
    extras = set(_extras(model))
    return any(p.requires_grad for n, p in model.named_parameters() if ".lora_" not in n and n not in extras)


ROPE_CONFIG = "rope_config.json"


def rope_config(model: Transformer) -> dict:
    """The base model's position settings an adapter was trained with: minillama's (load_model(...,
    rope_scaling=..., max_seq_len=...)) and the HF config keys that make transformers compute the same angles
    (set them on the base model's LlamaConfig before PeftModel.from_pretrained)."""
    hf = args_to_hf_config(model.args, torch.float32)
    keys = ("rope_theta", "rope_scaling", "max_position_embeddings")
    return {"minillama": {"rope_scaling": model.args.rope_scaling, "max_seq_len": model.args.max_seq_len},
            "hf_config": {k: hf[k] for k in keys}}


def save_run_adapter(model: Transformer, path, name: str = "default") -> Path:
    """Adapter `name` in PEFT's layout, with the trained embeddings / norms as modules_to_save and the
    position settings in rope_config.json."""
    from ..lora import save_adapter

    with warnings.catch_warnings():  # the HF export's notes on ntk / dynamic are in rope_config's docstring
        warnings.simplefilter("ignore")
        text = json.dumps(rope_config(model), indent=2) + "\n"
    return save_adapter(model, path, name, modules_to_save=_extras(model), extra_files={ROPE_CONFIG: text})


def _rng_state() -> dict:
    """This process's random states: torch's CPU generator, Python's, and that of the GPU it drives (each rank
    its own: under torchrun rank r draws dropout masks on cuda:r)."""
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()  # the current device (distributed.init sets it per rank)
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        if isinstance(state["cuda"], (list, tuple)):  # a checkpoint of an older minillama: every device's
            torch.cuda.set_rng_state_all(state["cuda"])
        else:
            torch.cuda.set_rng_state(state["cuda"])


def _own_rng_state(state: dict) -> dict:
    """The random states this rank saved ("rng_ranks", one per rank), when the run has as many ranks as the one
    that saved it; otherwise (another number of ranks, an older checkpoint) rank 0's ("rng")."""
    ranks = state.get("rng_ranks") or []
    return ranks[distributed.rank()] if len(ranks) == distributed.world_size() else state["rng"]


TRAIN_STATE = "train_state.pt"
# what an OSError's errno means for a checkpoint being written
_WHY = {errno.ENOSPC: "the disk is full", errno.EROFS: "the file system is read-only",
        errno.EACCES: "permission denied", errno.EDQUOT: "the disk quota is exceeded"}


def _train_state(optimizer, scaler, step: int, cfg: TrainConfig, rng_ranks: Optional[list] = None) -> dict:
    """Everything a resumed run needs besides the weights, as plain tensors, numbers, strings, lists,
    tuples and dicts: what torch.load(weights_only=True) reads back without unpickling any code.
    rng_ranks: every rank's _rng_state(), gathered (default: this process's only)."""
    rng_ranks = rng_ranks or [_rng_state()]
    return {"step": step, "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
            "rng": rng_ranks[0], "rng_ranks": rng_ranks, "config": dataclasses.asdict(cfg),
            "world_size": distributed.world_size()}


def _checkpoint_parts(model, optimizer, scaler, step: int, cfg: TrainConfig, tokenizer, rng_ranks=None) -> list:
    """[(name, write(dest))] of a checkpoint's entries, written in this order."""
    def write_state(dest):
        with open(dest, "wb") as f:  # a file object: a failing write raises OSError with its errno
            torch.save(_train_state(optimizer, scaler, step, cfg, rng_ranks), f)

    if _base_trains(model):
        parts = [("model", lambda dest: save_model(model, dest, tokenizer=tokenizer))]
    else:
        names = _trainable_adapters(model)
        parts = [("adapter" if len(names) == 1 else f"adapter-{n}", lambda dest, n=n: save_run_adapter(model, dest, n))
                 for n in names]
        trained = {n: p.detach().contiguous() for n, p in model.named_parameters() if p.requires_grad}
        parts.append(("trainable.safetensors", lambda dest: save_file(trained, str(dest))))
    return parts + [(TRAIN_STATE, write_state)]


def _write_error_errno(e: Exception) -> Optional[int]:
    """The errno of a failed write: OSError's own, or the "(os error N)" inside safetensors' message."""
    if isinstance(e, OSError):
        return e.errno
    m = re.search(r"\(os error (\d+)\)", str(e))
    return int(m.group(1)) if m else None


def write_checkpoint(path, model: Transformer, optimizer, scaler, step: int, cfg: TrainConfig,
                     tokenizer=None, rng_ranks: Optional[list] = None) -> None:
    """path/ with train_state.pt and either model/ (full fine-tuning) or adapter[-NAME]/ (LoRA, PEFT's
    layout) plus trainable.safetensors (the trained tensors, for an exact resume).

    Written to a temporary directory renamed into place: a process killed at any moment, or a full or
    read-only disk, leaves the previous checkpoint as it was (and an OSError names the file that failed).
    """
    path = Path(path)
    current = None
    try:
        with atomic_directory(path) as tmp:
            for current, write in _checkpoint_parts(model, optimizer, scaler, step, cfg, tokenizer, rng_ranks):
                write(tmp / current)
            current = None
    except (OSError, SafetensorError) as e:
        code = _write_error_errno(e)
        why = _WHY.get(code, str(e).splitlines()[0] if str(e) else type(e).__name__)
        where = f" while writing {current}" if current else ""
        raise OSError(code, f"Cannot write the checkpoint {path} at step {step}: {why}{where}; the previous "
                            f"checkpoint (if any) is untouched.") from e


def _find_checkpoint(out_dir: Path) -> Optional[Path]:
    """out_dir/checkpoint, or the previous one set aside by a save that was killed between its two renames."""
    ckpt = out_dir / "checkpoint"
    if (ckpt / TRAIN_STATE).exists():
        return ckpt
    old = sorted((p for p in out_dir.glob(".checkpoint.old-*") if not p.is_symlink()), key=lambda p: p.stat().st_mtime)
    return old[-1] if old and (old[-1] / TRAIN_STATE).exists() else None


def _read_train_state(ckpt: Path, without_optimizer: bool = False) -> dict:
    """train_state.pt, read with torch.load(weights_only=True): a file that needs code to unpickle is refused.
    without_optimizer=True: the optimizer's state is left on disk (mapped, never read) and comes back as None."""
    f = ckpt / TRAIN_STATE
    try:
        state = torch.load(f, map_location="cpu", weights_only=True, mmap=without_optimizer)
    except pickle.UnpicklingError as e:
        raise ValueError(f"{f} is refused: it needs code to unpickle ({str(e).splitlines()[0][:200]}), and "
                         f"minillama only reads plain tensors and numbers (torch.load(weights_only=True)).") from None
    except (RuntimeError, EOFError, OSError) as e:  # a broken zip archive comes as any of them
        if isinstance(e, (FileNotFoundError, PermissionError)):
            raise
        raise ValueError(f"{f} is not a readable training state ({str(e).splitlines()[0][:200]}); is it "
                         f"truncated or corrupt?") from None
    keys = ("step", "optimizer", "scaler", "rng", "config")
    if not isinstance(state, dict) or any(k not in state for k in keys) or not isinstance(state["step"], int):
        raise ValueError(f"{f} is not a minillama training state: expected a dict with the keys {keys}.")
    if without_optimizer:
        state["optimizer"] = None
    return state


# a hint after "differs from the checkpoint's" for the fields that name no flag
_RESUME_HINTS = {"data_sha256": " (the training data's content changed)",
                 "val_data_sha256": " (the held-out data's content changed)"}


def _read_trainable(ckpt: Path, device) -> dict:
    f = ckpt / "trainable.safetensors"
    try:
        return load_file(str(f), device=str(device))
    except SafetensorError as e:
        raise ValueError(f"{f} is not a readable safetensors file ({e}); is it truncated or corrupt?") from None


def _restore_weights(ckpt: Path, model, cfg: TrainConfig, strategy: str = "single") -> dict:
    """Check the settings against the checkpoint's, load its weights into the (unwrapped) model; returns the
    training state for _restore_optimizer. --batch-size is per rank: what must match is the micro-batch over
    all ranks (batch_size * world size), so 2 ranks x 4 rows resume as 1 process x 8 rows. Under FSDP only rank 0
    reads the optimizer's state (distributed.load_optimizer_state sends each rank its shard)."""
    state = _read_train_state(ckpt, without_optimizer=strategy == "fsdp" and not distributed.is_main())
    saved = state["config"]
    world = distributed.world_size()
    rows = saved.get("batch_size", 0) * state.get("world_size", 1)
    if rows != cfg.batch_size * world:
        raise ValueError(f"Cannot resume from {ckpt}: its micro-batch was {rows} rows over all ranks, this run's "
                         f"is {cfg.batch_size} x {world} ranks = {cfg.batch_size * world} (set --batch-size "
                         f"{rows // world if rows % world == 0 else rows} or start a new --out).")
    for f in dataclasses.fields(TrainConfig):
        if f.name in ("batch_size", "compile", "kernels"):  # they change how, not what, the steps compute
            continue
        if f.name in saved and saved[f.name] != getattr(cfg, f.name):
            raise ValueError(f"Cannot resume from {ckpt}: {f.name}={getattr(cfg, f.name)!r} differs from the "
                             f"checkpoint's {saved[f.name]!r}{_RESUME_HINTS.get(f.name, '')} (resume with the "
                             f"same settings, or start a new --out).")
    device = next(model.parameters()).device
    if (ckpt / "model").exists():
        model.load_state_dict(load_model(ckpt / "model", device=device).state_dict())
    else:
        tensors = _read_trainable(ckpt, device)
        params = dict(model.named_parameters())
        missing = [n for n, p in params.items() if p.requires_grad and n not in tensors]
        if missing or set(tensors) - set(params):
            raise ValueError(f"Cannot resume from {ckpt}: its trained tensors do not match the model's "
                             f"(first mismatch: {(missing or sorted(set(tensors) - set(params)))[0]!r}).")
        with torch.no_grad():
            for n, t in tensors.items():
                params[n].copy_(t)
    return state


def _restore_optimizer(state: dict, model, optimizer, scaler, strategy: str) -> int:
    """The optimizer, GradScaler and RNG of a checkpoint; returns its step."""
    if strategy == "fsdp":
        distributed.load_optimizer_state(model, optimizer, state["optimizer"])
    else:
        optimizer.load_state_dict(state["optimizer"])
    scaler.load_state_dict(state["scaler"])
    _set_rng_state(_own_rng_state(state))
    return state["step"]


def check_writable(out_dir: Path) -> None:
    """Fail before any compute if out_dir cannot be created or written: write a few KiB to a probe with an
    unpredictable name (a full disk still lets an empty file be created), then remove it."""
    probe = None
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(dir=out_dir, prefix=".write-test-")
        os.close(fd)
        probe = Path(name)
        probe.write_bytes(b"\0" * 4096)
    except OSError as e:
        raise OSError(e.errno, f"Cannot write to the output directory {out_dir}: {e.strerror}.") from e
    finally:
        if probe is not None:
            with suppress(OSError):
                probe.unlink(missing_ok=True)


def _start_log(log_path: Path, resume: bool, start: int) -> list[dict]:
    """Prepare log.jsonl and return the records kept: none for a new run; for a resumed run those up to the
    checkpoint's step (later ones will be run again). A symlinked log.jsonl is refused, never written through."""
    if not resume:
        if log_path.exists() or log_path.is_symlink():
            log_path.unlink()  # a link is removed itself, not followed
        return []
    if not (log_path.exists() or log_path.is_symlink()):
        return []
    with open_nofollow(log_path) as f:
        lines = f.read().splitlines()
    records = []
    for i, line in enumerate(lines):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if i == len(lines) - 1:  # the unfinished last line of a killed run
                break
            raise ValueError(f"{log_path} line {i + 1} is not valid JSON: expected one record per line.") from None
    kept = [r for r in records if r["step"] <= start]
    atomic_write_text(log_path, "".join(json.dumps(r) + "\n" for r in kept))
    return kept


def reset_peak_memory(device: torch.device) -> None:
    """Start a step's peak: CUDA's max_memory_allocated, or (Linux) the process's peak resident set, VmHWM,
    which writing 5 to /proc/self/clear_refs resets. Elsewhere the CPU figure stays the process maximum."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def memory_mib(device: torch.device) -> float:
    """The peak since reset_peak_memory, MiB: CUDA allocated, or the peak resident set (VmHWM) on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024  # KiB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # the process's peak (Linux: KiB)


# ---- the loop ------------------------------------------------------------------------------------
def train(model: Transformer, train_data, val_data: dict, cfg: TrainConfig, out_dir, *, tokenizer=None,
          resume: bool = False, progress: bool = True, strict_amp: bool = False, strategy: str = "auto",
          stop_at: Optional[int] = None) -> list[dict]:
    """Train `model` in place; returns the log records of the steps run now.

    train_data: packed rows (inputs, targets) or an SFTDataset; val_data: {name: the same kinds}.
    Writes out_dir/log.jsonl (per optimizer step: step, loss, lr, tokens (positions processed so far,
    padding included), target_tokens (positions with a label so far), tokens_per_s and
    target_tokens_per_s (the same two counts per second of this step), grad_norm, skipped, mem_mib (this
    step's peak: CUDA allocated, or the process's resident set on CPU), and every eval_every steps the held-out loss
    per target token: val_loss for the set named "val", val_loss_<name> for another) and
    out_dir/checkpoint/ every save_every steps and at the end. resume=True continues from out_dir/checkpoint: same batches, same schedule,
    same RNG, so the log continues as the uninterrupted run's would (on CPU, exactly).
    Under torchrun (several processes) `strategy` picks DDP or FSDP (training/distributed.py); rank 0 alone
    holds the run folder's lock and writes the log and the checkpoints. stop_at=k stops after step k with a
    checkpoint (a job's time limit); --resume continues as if it had not stopped.
    """
    kw = dict(tokenizer=tokenizer, resume=resume, strict_amp=strict_amp, strategy=strategy, stop_at=stop_at)
    out_dir = Path(out_dir)
    problem = compile_problem(next(model.parameters()).device) if cfg.compile else None
    if problem:
        raise RuntimeError(f"TrainConfig.compile: {problem}; train with compile=False (without --compile).")
    try:
        if not distributed.is_main():
            return _train_locked(model, train_data, val_data, cfg, out_dir, progress=False, **kw)
        check_writable(out_dir)
        with run_lock(out_dir):  # one writer per run folder
            return _train_locked(model, train_data, val_data, cfg, out_dir, progress=progress, **kw)
    finally:
        if cfg.compile:  # the plain blocks again: generation afterwards would recompile at every position
            compile_blocks(model, enable=False)
        disable_kernels(model)  # the plain model again (kernels change only what a backward pass keeps)


def _setup(model: Transformer, cfg: TrainConfig, out_dir: Path, *, resume: bool, strict_amp: bool, strategy: str):
    """(runner, optimizer, scaler, amp, strategy, start step): the model prepared, restored and wrapped."""
    device = next(model.parameters()).device
    amp = resolve_amp(cfg.amp, device, strict=strict_amp)
    torch.manual_seed(cfg.seed)  # LoRA's A and dropout draw from it; a resumed run restores it
    prepare_model(model, cfg)
    fp16 = [n for n, p in model.named_parameters() if p.requires_grad and p.dtype == torch.float16]
    if fp16:
        raise ValueError(f"Trainable parameter {fp16[0]} is fp16: pure fp16 training is not supported (the "
                         f"GradScaler needs fp32 gradients); load the model in fp32 (with --amp fp16) or bf16.")
    strategy = distributed.resolve_strategy(strategy, base_trains=_base_trains(model), quantized=is_quantized(model),
                                            amp=amp)
    if cfg.compile and strategy == "fsdp":
        raise ValueError("TrainConfig.compile with FSDP is not supported here (FSDP wraps the blocks that "
                         "compile_blocks compiles); use DDP, or train without --compile.")
    state = None
    if resume:
        ckpt = _find_checkpoint(out_dir)
        if ckpt is None:
            raise FileNotFoundError(f"Cannot resume: {out_dir / 'checkpoint' / 'train_state.pt'} does not exist.")
        state = _restore_weights(ckpt, model, cfg, strategy)  # before wrapping: FSDP shards what is loaded here
    runner = distributed.wrap(model, strategy, amp)
    optimizer = make_optimizer(runner, cfg)
    scaler = torch.amp.GradScaler(device.type, enabled=amp == "fp16")
    start = _restore_optimizer(state, runner, optimizer, scaler, strategy) if state else 0
    return runner, optimizer, scaler, amp, strategy, start


def _state_bytes(model, optimizer) -> int:
    """Bytes of the model's parameters and the optimizer's state tensors (full sizes: a sharded tensor counts
    whole), what a checkpoint gathers and writes."""
    tensors = list(model.parameters()) + [t for s in optimizer.state.values() for t in s.values()
                                          if isinstance(t, torch.Tensor)]
    return sum(t.numel() * t.element_size() for t in tensors)


def _save(out_dir: Path, runner, optimizer, scaler, step: int, cfg: TrainConfig, tokenizer, strategy: str) -> None:
    """The checkpoint, as one process would write it, under a collective timeout that grows with its size
    (distributed.checkpoint_timeout_s). FSDP: every rank joins the gather, rank 0 writes."""
    with distributed.collective_timeout(distributed.checkpoint_timeout_s(_state_bytes(runner, optimizer))):
        _save_checkpoint(out_dir, runner, optimizer, scaler, step, cfg, tokenizer, strategy)


def _save_checkpoint(out_dir: Path, runner, optimizer, scaler, step: int, cfg: TrainConfig, tokenizer,
                     strategy: str) -> None:
    model = distributed.unwrap(runner)
    rng_ranks = distributed.gather_objects(_rng_state())  # every rank's own random states, on rank 0
    if strategy == "fsdp":
        msd, osd = distributed.full_state(runner, optimizer)
        if distributed.is_main():
            with torch.device("meta"):
                plain = Transformer(model.args)
            plain.load_state_dict(msd, assign=True)
            write_checkpoint(out_dir / "checkpoint", plain, distributed.GatheredOptimizer(osd), scaler, step, cfg,
                             tokenizer, rng_ranks)
    elif distributed.is_main():
        write_checkpoint(out_dir / "checkpoint", model, optimizer, scaler, step, cfg, tokenizer, rng_ranks)
    distributed.barrier()  # nobody runs ahead of a checkpoint being written


def _train_locked(model: Transformer, train_data, val_data: dict, cfg: TrainConfig, out_dir: Path, *,
                  tokenizer, resume: bool, progress: bool, strict_amp: bool, strategy: str,
                  stop_at: Optional[int]) -> list[dict]:
    device = next(model.parameters()).device
    runner, optimizer, scaler, amp, strategy, start = _setup(model, cfg, out_dir, resume=resume,
                                                             strict_amp=strict_amp, strategy=strategy)
    main = distributed.is_main()
    log_path = out_dir / "log.jsonl"
    kept = _start_log(log_path, resume, start) if main else []
    train_data = as_dataset(train_data)
    val_data = {k: as_dataset(v) for k, v in val_data.items()}
    val_data = {k: v.subset(list(range(min(cfg.eval_rows, len(v))))) for k, v in val_data.items()}
    records: list[dict] = []
    # micro-batch m of optimizer step s is batch number s * grad_accum + m of one deterministic stream of
    # batch_size * world rows; each rank takes its slice
    data = batches(train_data, batch_size=cfg.batch_size * distributed.world_size(), seed=cfg.seed,
                   start_step=start * cfg.grad_accum)
    runner.train()
    end = cfg.steps if stop_at is None else max(start, min(stop_at, cfg.steps))
    bar = progress_bar(range(start, end), initial=start, total=cfg.steps, progress=progress, desc="train",
                       unit="step")
    tokens_seen, targets_seen = (kept[-1].get(k, 0) for k in ("tokens", "target_tokens")) if kept else (0, 0)
    for step in bar:
        reset_peak_memory(device)  # mem_mib is this step's peak
        t0 = time.perf_counter()
        lr = lr_at(step, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        micro = [tuple(t.to(device) for t in distributed.this_rank_rows(*next(data))) for _ in range(cfg.grad_accum)]
        try:
            out = train_step(runner, optimizer, scaler, micro, cfg, amp)
        except FloatingPointError as e:
            raise FloatingPointError(f"Stopped at step {step + 1}: {e}. Nothing was saved for this step; the last "
                                     f"checkpoint (if any) is intact. Lower the learning rate, or try --amp bf16 "
                                     f"instead of fp16.") from None
        except RuntimeError as e:  # this rank's own error, or a collective that failed (another rank died)
            if distributed.world_size() == 1:
                raise
            raise distributed.step_failure(e, step + 1) from e
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        dt = time.perf_counter() - t0
        # positions processed on every rank, padding included
        processed = int(distributed.all_reduce_sum(sum(x.numel() for x, _ in micro), device))
        tokens_seen += processed
        targets_seen += out["tokens"]
        rec = {"step": step + 1, "loss": round(out["loss"], 6), "lr": lr, "tokens": tokens_seen,
               "target_tokens": targets_seen, "tokens_per_s": round(processed / dt, 1),
               "target_tokens_per_s": round(out["tokens"] / dt, 1), "grad_norm": _finite_or_none(out["grad_norm"]),
               "skipped": out["skipped"], "mem_mib": round(memory_mib(device), 1)}
        if scaler.is_enabled():
            rec["scale"] = scaler.get_scale()
        if (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps:
            for name, vd in val_data.items():  # every rank evaluates (FSDP needs all of them in the forward)
                rec[val_key(name)] = round(evaluate_loss(runner, vd, batch_size=cfg.batch_size, amp=amp,
                                                         progress=progress, desc=f"evaluate {name}"), 6)
            runner.train()
        records.append(rec)
        if main:
            with open_nofollow(log_path, "a") as f:
                f.write(json.dumps(rec) + "\n")
        bar.set_postfix_str(progress_text(rec), refresh=False)
        if (step + 1) % cfg.save_every == 0 or step + 1 in (cfg.steps, stop_at):
            _save(out_dir, runner, optimizer, scaler, step + 1, cfg, tokenizer, strategy)
    return records


def val_key(name: str) -> str:
    """The log field of the held-out loss on evaluation set `name`: val_loss for "val", else val_loss_<name>."""
    return "val_loss" if name == "val" else f"val_loss_{name}"


def progress_text(rec: dict) -> str:
    """The progress bar's summary of one log record, every number with its unit: processed tokens per second
    (padding included) and, in brackets, those of them with a label (the loss's own tokens)."""
    text = (f"loss {rec['loss']:.3f} | {rec['tokens_per_s']:,.0f} tok/s ({rec['target_tokens_per_s']:,.0f} "
            f"target) | peak {rec['mem_mib']:,.0f} MiB")
    return text + "".join(f" | {k} {v:.3f}" for k, v in rec.items() if k.startswith("val_loss"))


def _finite_or_none(x: Optional[float]) -> Optional[float]:
    """A log value: rounded, or None (JSON null) when absent or inf/NaN (a step the GradScaler skipped)."""
    return round(x, 6) if x is not None and math.isfinite(x) else None


def skipped_steps(records: list[dict]) -> int:
    """How many optimizer steps the GradScaler skipped (inf/NaN gradients)."""
    return sum(bool(r.get("skipped")) for r in records)
