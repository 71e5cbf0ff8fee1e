"""The techniques a training run applies to the model from outside, before its first step: a longer context
(`extend_context`), 4-bit base weights, LoRA adapters (and trainable embeddings / norms), gradient
checkpointing, the hand-written backward passes (`minillama.kernels`) and torch.compile of each block
(`compile_blocks`). `prepare_model` applies those a TrainConfig asks for, in that order. The model itself
stays the plain formulas (model.py); each technique here wraps or configures it.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from typing import Optional

import torch

from ..kernels import disable_kernels, enable_kernels
from ..model import Transformer
from ..quant import quantize_model
from .settings import TrainConfig

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


