"""The training loop: AdamW, warmup + cosine schedule, gradient clipping, periodic validation,
a JSONL log and atomic checkpoints. Pre-training the tiny model uses it as is; the fine-tuning
techniques of the course (LoRA, AMP, accumulation, checkpointing) plug into this one loop.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from tqdm.auto import tqdm

from .checkpoint import atomic_directory, load_model, save_model
from .data import batches
from .model import Transformer


@dataclass
class TrainConfig:
    steps: int = 1000
    batch_size: int = 16
    lr: float = 2e-3
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 100
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    eval_every: int = 250
    eval_rows: int = 64  # validation rows per corpus
    save_every: int = 500
    seed: int = 0

    def __post_init__(self):
        for key in ("steps", "batch_size", "eval_every", "save_every"):
            if getattr(self, key) <= 0:
                raise ValueError(f"TrainConfig.{key}={getattr(self, key)} is invalid: expected a positive integer.")
        if not self.lr > 0:
            raise ValueError(f"TrainConfig.lr={self.lr} is invalid: expected a positive number.")


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup to cfg.lr, then cosine decay to cfg.lr * cfg.min_lr_ratio at cfg.steps."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def make_optimizer(model: Transformer, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (not on norms), as in nanoGPT/llama2.c."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))


@torch.no_grad()
def evaluate_loss(model: Transformer, inputs: torch.Tensor, targets: torch.Tensor, batch_size: int) -> float:
    """Mean cross-entropy per target token over the given rows."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for i in range(0, inputs.shape[0], batch_size):
        x, y = inputs[i:i + batch_size].to(device), targets[i:i + batch_size].to(device)
        n = int((y != -100).sum())
        total += float(model(x, y)) * n
        count += n
    model.train(was_training)
    return total / max(count, 1)


def _write_checkpoint(path: Path, model: Transformer, optimizer, step: int, cfg: TrainConfig, tokenizer=None) -> None:
    """model/ + train_state.pt, written to a temporary directory that is renamed into place, so a
    process killed at any moment leaves either the previous checkpoint or the new one."""
    with atomic_directory(path) as tmp:
        save_model(model, tmp / "model", tokenizer=tokenizer)
        torch.save({"step": step, "optimizer": optimizer.state_dict(), "config": dataclasses.asdict(cfg)},
                   tmp / "train_state.pt")


def train(model: Transformer, train_data: tuple[torch.Tensor, torch.Tensor],
          val_data: dict[str, tuple[torch.Tensor, torch.Tensor]], cfg: TrainConfig, out_dir,
          *, tokenizer=None, resume: bool = False, progress: bool = True) -> list[dict]:
    """Train `model` in place on packed rows (inputs, targets); returns the log records.

    Writes out_dir/log.jsonl (one record per step: step, loss, lr, tokens, tokens_per_s, and
    val_<corpus> every eval_every steps) and out_dir/checkpoint/ every save_every steps and at the end.
    resume=True continues from out_dir/checkpoint (same batches, same schedule).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    device = next(model.parameters()).device
    optimizer = make_optimizer(model, cfg)
    start = 0
    ckpt = out_dir / "checkpoint"
    if resume:
        if not (ckpt / "train_state.pt").exists():
            raise FileNotFoundError(f"Cannot resume: {ckpt / 'train_state.pt'} does not exist.")
        state = torch.load(ckpt / "train_state.pt", weights_only=True)
        saved = TrainConfig(**state["config"])
        for f in dataclasses.fields(TrainConfig):
            if getattr(saved, f.name) != getattr(cfg, f.name):
                raise ValueError(f"Cannot resume: {f.name}={getattr(cfg, f.name)!r} differs from the checkpoint's "
                                 f"{getattr(saved, f.name)!r}.")
        model.load_state_dict(load_model(ckpt / "model", device=device).state_dict())
        optimizer.load_state_dict(state["optimizer"])
        start = state["step"]
    log_path = out_dir / "log.jsonl"
    if not resume and log_path.exists():
        log_path.unlink()
    records: list[dict] = []
    data = batches(*train_data, batch_size=cfg.batch_size, seed=cfg.seed, start_step=start)
    model.train()
    bar = tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, disable=not progress, desc="train")
    tokens_seen = start * cfg.batch_size * train_data[0].shape[1]
    for step in bar:
        t0 = time.perf_counter()
        x, y = next(data)
        x, y = x.to(device), y.to(device)
        lr = lr_at(step, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        loss = model(x, y)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"Loss became {loss.item()} at step {step}; stopping without saving.")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        n_tok = int((y != -100).sum())
        tokens_seen += x.numel()
        dt = time.perf_counter() - t0
        rec = {"step": step + 1, "loss": round(loss.item(), 5), "lr": lr, "tokens": tokens_seen,
               "tokens_per_s": round(n_tok / dt, 1)}
        if (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps:
            for name, (vx, vy) in val_data.items():
                rec[f"val_{name}"] = round(evaluate_loss(model, vx[:cfg.eval_rows], vy[:cfg.eval_rows],
                                                         cfg.batch_size), 5)
            model.train()
        records.append(rec)
        with open(log_path, "a") as f:
            f.write(json.dumps(rec) + "\n")
        bar.set_postfix(loss=f"{rec['loss']:.3f}", tok_s=f"{rec['tokens_per_s']:.0f}",
                        **{k: f"{v:.3f}" for k, v in rec.items() if k.startswith("val_")})
        if (step + 1) % cfg.save_every == 0 or step + 1 == cfg.steps:
            _write_checkpoint(ckpt, model, optimizer, step + 1, cfg, tokenizer)
    return records
