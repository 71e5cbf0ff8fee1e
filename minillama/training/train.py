"""The training loop, one for every lesson: pre-training the tiny model, SFT, LoRA, long context.

Each technique of the course is switched by TrainConfig (settings.py); those that change the model are applied
before the first step by techniques.prepare_model, the others run in the loop below:

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

The settings and their checks are in settings.py, the techniques applied to the model before the first step in
techniques.py, the run's checkpoint and exact resume in run_state.py; this file is the loop (`train`, one
function read top to bottom), one optimizer step (`train_step`) and the held-out loss (`evaluate_loss`).
"""

from __future__ import annotations

import json
import math
import resource
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Optional

import torch

from ..files import open_nofollow, run_lock
from ..kernels import disable_kernels
from ..model import Transformer
from ..progress import progress_bar
from . import distributed
from .settings import TrainConfig, adamw_is_fused, resolve_amp
from .data import IGNORE_INDEX, as_dataset, batches
from .run_state import (base_trains, check_writable, find_checkpoint, restore_optimizer, restore_weights,
                        save_checkpoint, start_log)
from .techniques import compile_blocks, compile_problem, is_quantized, prepare_model


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup to cfg.lr, then cosine decay to cfg.lr * cfg.min_lr_ratio at cfg.steps."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


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
# out_dir/log.jsonl holds one record per optimizer step: step, loss, lr, tokens (positions processed so far,
# padding included), target_tokens (positions with a label so far), tokens_per_s and target_tokens_per_s (the
# same two counts per second of this step), grad_norm, skipped, mem_mib (this step's peak: CUDA allocated, or the
# process's resident set on CPU), scale (with fp16's GradScaler), and every eval_every steps the held-out loss per
# target token: val_loss for the set named "val", val_loss_<name> for another (val_key).
def train(model: Transformer, train_data, val_data: dict, cfg: TrainConfig, out_dir, *, tokenizer=None,
          resume: bool = False, progress: bool = True, strict_amp: bool = False, strategy: str = "auto",
          stop_at: Optional[int] = None) -> list[dict]:
    """Train `model` in place; returns the log records of the steps run now.

    train_data: packed rows (inputs, targets) or an SFTDataset; val_data: {name: the same kinds}. Writes
    out_dir/log.jsonl (the fields above) and out_dir/checkpoint/ every save_every steps and at the end.
    resume=True continues from out_dir/checkpoint: same batches, same schedule, same RNG, so the log continues as
    the uninterrupted run's would (on CPU, exactly). Under torchrun (several processes) `strategy` picks DDP or
    FSDP (distributed.py); rank 0 alone holds the run folder's lock and writes the log and the checkpoints.
    stop_at=k stops after step k with a checkpoint (a job's time limit); resume continues as if it had not stopped.
    """
    out_dir = Path(out_dir)
    device = next(model.parameters()).device
    main = distributed.is_main()  # rank 0 (or the only process) writes the log and the checkpoints
    progress = progress and main
    problem = compile_problem(device) if cfg.compile else None
    if problem:
        raise RuntimeError(f"TrainConfig.compile: {problem}; train with compile=False (without --compile).")
    if main:
        check_writable(out_dir)  # fail before any compute
    try:
        with run_lock(out_dir) if main else nullcontext():  # one writer per run folder
            # ---- the model: its techniques, restored from the checkpoint, wrapped for several ranks
            amp = resolve_amp(cfg.amp, device, strict=strict_amp)
            torch.manual_seed(cfg.seed)  # LoRA's A and dropout draw from it; a resumed run restores it
            prepare_model(model, cfg)
            fp16 = [n for n, p in model.named_parameters() if p.requires_grad and p.dtype == torch.float16]
            if fp16:
                raise ValueError(f"Trainable parameter {fp16[0]} is fp16: pure fp16 training is not supported (the "
                                 f"GradScaler needs fp32 gradients); load the model in fp32 (with --amp fp16) or "
                                 f"bf16.")
            strategy = distributed.resolve_strategy(strategy, base_trains=base_trains(model),
                                                    quantized=is_quantized(model), amp=amp)
            if cfg.compile and strategy == "fsdp":
                raise ValueError("TrainConfig.compile with FSDP is not supported here (FSDP wraps the blocks that "
                                 "compile_blocks compiles); use DDP, or train without --compile.")
            # the checkpoint's weights before wrapping: FSDP shards what is loaded here
            state = restore_weights(find_checkpoint(out_dir), model, cfg, strategy) if resume else None
            runner = distributed.wrap(model, strategy, amp)
            optimizer = make_optimizer(runner, cfg)
            scaler = torch.amp.GradScaler(device.type, enabled=amp == "fp16")
            start = restore_optimizer(state, runner, optimizer, scaler, strategy) if state else 0

            # ---- the data and the log
            log_path = out_dir / "log.jsonl"
            kept = start_log(log_path, resume, start) if main else []
            train_data = as_dataset(train_data)
            val_data = {k: as_dataset(v) for k, v in val_data.items()}
            val_data = {k: v.subset(list(range(min(cfg.eval_rows, len(v))))) for k, v in val_data.items()}
            # micro-batch m of optimizer step s is batch number s * grad_accum + m of one deterministic stream of
            # batch_size * world rows; each rank takes its slice
            data = batches(train_data, batch_size=cfg.batch_size * distributed.world_size(), seed=cfg.seed,
                           start_step=start * cfg.grad_accum)
            records: list[dict] = []
            tokens_seen, targets_seen = (kept[-1].get(k, 0) for k in ("tokens", "target_tokens")) if kept else (0, 0)

            # ---- the steps
            runner.train()
            end = cfg.steps if stop_at is None else max(start, min(stop_at, cfg.steps))
            bar = progress_bar(range(start, end), initial=start, total=cfg.steps, progress=progress, desc="train",
                               unit="step")
            for step in bar:
                reset_peak_memory(device)  # mem_mib is this step's peak
                t0 = time.perf_counter()
                lr = lr_at(step, cfg)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                micro = [tuple(t.to(device) for t in distributed.this_rank_rows(*next(data)))
                         for _ in range(cfg.grad_accum)]
                try:
                    out = train_step(runner, optimizer, scaler, micro, cfg, amp)
                except FloatingPointError as e:
                    raise FloatingPointError(f"Stopped at step {step + 1}: {e}. Nothing was saved for this step; "
                                             f"the last checkpoint (if any) is intact. Lower the learning rate, or "
                                             f"try --amp bf16 instead of fp16.") from None
                except RuntimeError as e:  # this rank's own error, or a collective that failed (another rank died)
                    if distributed.world_size() == 1:
                        raise
                    raise distributed.step_failure(e, step + 1) from e
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                dt = time.perf_counter() - t0

                # the log record: positions processed on every rank (padding included), and those with a label
                processed = int(distributed.all_reduce_sum(sum(x.numel() for x, _ in micro), device))
                tokens_seen += processed
                targets_seen += out["tokens"]
                rec = {"step": step + 1, "loss": round(out["loss"], 6), "lr": lr, "tokens": tokens_seen,
                       "target_tokens": targets_seen, "tokens_per_s": round(processed / dt, 1),
                       "target_tokens_per_s": round(out["tokens"] / dt, 1),
                       "grad_norm": _finite_or_none(out["grad_norm"]), "skipped": out["skipped"],
                       "mem_mib": round(memory_mib(device), 1)}
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
                    save_checkpoint(out_dir, runner, optimizer, scaler, step + 1, cfg, tokenizer, strategy)
            return records
    finally:
        if cfg.compile:  # the plain blocks again: generation afterwards would recompile at every position
            compile_blocks(model, enable=False)
        disable_kernels(model)  # the plain model again (kernels change only what a backward pass keeps)


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
