"""Data-parallel training on several GPUs (or CPU processes) with PyTorch's own engine, started by torchrun:

    torchrun --nproc_per_node 4 -m minillama train --model ... --lora-r 16            # DDP (LoRA/QLoRA)
    torchrun --nproc_per_node 4 -m minillama train --model ... --strategy fsdp        # FSDP2 (full fine-tuning)

Strategies:
  ddp   DistributedDataParallel: every rank holds the whole model (a frozen base is shared by nobody: each
        GPU has its own copy) and the gradients of the trainable parameters are all-reduced (averaged) after
        the backward. Right for LoRA/QLoRA, whose gradients are small.
  fsdp  FSDP2 (`torch.distributed.fsdp.fully_shard`, one unit per transformer block, then the root): each
        rank holds 1/N of the parameters, gradients and optimizer state, and gathers one block's weights
        at a time. Right for full fine-tuning, where 7B's AdamW state alone is about 54 GB.

The arithmetic that makes N ranks equal one process: --batch-size is per rank, so one micro-batch is
batch_size * world rows, drawn from the same deterministic stream as one process with that batch would draw
(rank r takes the r-th slice). Each rank's loss is divided by the target tokens of the WHOLE effective
batch (all-reduced), and multiplied by the world size, because DDP and FSDP average the ranks' gradients:
sum over ranks of (world * sum_r / n_total) / world = the single process's sum / n_total.
"""

from __future__ import annotations

import inspect
import math
import os
from contextlib import contextmanager
from datetime import timedelta
from typing import Optional

import torch
import torch.distributed as dist

STRATEGIES = ("auto", "single", "ddp", "fsdp")
TIMEOUT_S = int(os.environ.get("MINILLAMA_DIST_TIMEOUT_S", "300"))  # a collective waiting longer fails the job
# Saving a checkpoint gathers the whole state on rank 0 (FSDP) and writes it while the other ranks wait at a
# barrier: Llama-2-7B's full fine-tuning state is about 81 GB, far beyond TIMEOUT_S at disk speed. During a save
# the timeout is TIMEOUT_S plus the state's size at this many bytes per second (a slow network disk's speed).
CHECKPOINT_BYTES_PER_S = float(os.environ.get("MINILLAMA_CHECKPOINT_BYTES_PER_S", 50e6))


def launched() -> bool:
    """Started by torchrun (or any launcher setting the env:// variables) with more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def is_main() -> bool:
    """Rank 0 logs, shows progress and writes files; the others only compute."""
    return rank() == 0


def rank_device(device: str) -> str:
    """Under torchrun each process drives its own GPU: "cuda" becomes "cuda:LOCAL_RANK"."""
    if launched() and device == "cuda":
        return f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    return device


def init(device: torch.device) -> None:
    """Join the process group torchrun prepared (gloo on CPU, nccl on CUDA), once. A collective that waits
    more than TIMEOUT_S seconds (a dead rank) raises instead of hanging."""
    if dist.is_initialized() or not launched():
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend, timeout=timedelta(seconds=TIMEOUT_S))


def resolve_strategy(strategy: str, *, base_trains: bool, quantized: bool, amp: str) -> str:
    """The strategy to use: 'single' in one process; 'auto' picks ddp for adapters, fsdp for full
    fine-tuning. Refuses the combinations that cannot work, in one sentence."""
    if strategy not in STRATEGIES:
        raise ValueError(f"--strategy {strategy!r} is invalid: expected one of {STRATEGIES}.")
    if world_size() == 1:
        if strategy in ("ddp", "fsdp"):
            raise ValueError(f"--strategy {strategy} needs several processes: start the job with "
                             f"`torchrun --nproc_per_node N -m minillama train ...`.")
        return "single"
    if strategy == "single":
        raise ValueError(f"--strategy single runs in one process, but {world_size()} were started by torchrun.")
    if strategy == "auto":
        strategy = "fsdp" if base_trains else "ddp"
    if strategy == "fsdp" and quantized:
        raise ValueError("--strategy fsdp cannot shard a 4-bit base (packed uint8 weights with their own "
                         "constants): use --strategy ddp for QLoRA.")
    if strategy == "fsdp" and amp == "fp16":
        raise ValueError("--strategy fsdp with --amp fp16 is not supported (FSDP2 has no GradScaler here): "
                         "use --amp bf16.")
    return strategy


def wrap(model: torch.nn.Module, strategy: str, amp: str) -> torch.nn.Module:
    """The model as the strategy runs it (the same module object for fsdp: fully_shard works in place)."""
    if strategy == "single":
        return model
    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        device = next(model.parameters()).device
        # No buffer sync: DDP would otherwise send rank 0's buffers to every rank before each forward. The
        # model's buffers never change in training (a 4-bit base's packed weights and constants, loaded alike on
        # every rank): for a 4-bit Llama-2-7B that would be about 3.6 GB per step for nothing. Older torch names
        # the flag broadcast_buffers, newer forward_sync_buffers (and warns on the old name).
        name = "forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(DDP).parameters \
            else "broadcast_buffers"
        return DDP(model, device_ids=[device.index] if device.type == "cuda" else None, **{name: False})
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    root, blocks = MixedPrecisionPolicy(), MixedPrecisionPolicy()
    if amp == "bf16":
        root = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        # A block's unit must not cast its inputs: they are the residual stream h, already bf16 (the embedding's
        # output under the root's policy), and RoPE's cos and sin, which stay fp32: cast to bf16 they would keep
        # 8 bits of every angle's cos and sin, and torch.complex refuses bf16 (issue 28).
        blocks = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32,
                                      cast_forward_inputs=False)
    for block in model.layers:  # one unit per block: only one block's full weights exist at a time
        fully_shard(block, mp_policy=blocks)
    fully_shard(model, mp_policy=root)  # the rest: embeddings, final norm, output head
    return model


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The Transformer inside a DDP wrapper (FSDP2 modules are the Transformer itself)."""
    return model.module if hasattr(model, "module") and hasattr(model, "no_sync") else model


def this_rank_rows(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank r's share of a micro-batch of batch_size * world rows: the r-th contiguous slice."""
    n = world_size()
    if n == 1:
        return x, y
    return x.chunk(n)[rank()], y.chunk(n)[rank()]


def all_reduce_sum(value: float, device: torch.device) -> float:
    """The sum of a number over every rank (the number itself in one process)."""
    if world_size() == 1:
        return value
    t = torch.tensor([float(value)], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return float(t.item())


# What a failed collective says (torch's DistError subclasses aside): gloo's and NCCL's own messages, a peer's
# closed connection, the timeout of init(). Anything else was raised by this rank's own computation.
_COLLECTIVE_MARKERS = ("gloo", "NCCL", "Connection closed", "Connection reset", "Broken pipe", "timed out",
                       "Timed out", "Timeout")


def step_failure(e: RuntimeError, step: int) -> RuntimeError:
    """The error to raise for a training step that failed with `e` under several ranks, naming the real cause:
    a collective that failed (another rank died or timed out), or this rank's own exception (a dtype mismatch, an
    out-of-memory, ...), whose first line is kept with its type; the other ranks then fail in a collective."""
    first = str(e).splitlines()[0] if str(e) else type(e).__name__
    if isinstance(e, dist.DistError) or any(m in str(e) for m in _COLLECTIVE_MARKERS):
        return RuntimeError(f"rank {rank()}: step {step} failed in a collective (did another rank die or time "
                            f"out?): {first}")
    return RuntimeError(f"rank {rank()}: step {step} failed on this rank ({type(e).__name__}: {first}); the "
                        f"other ranks stop with it.")


def checkpoint_timeout_s(state_bytes: int) -> int:
    """The collective timeout while a checkpoint of `state_bytes` is gathered and written: TIMEOUT_S, plus the
    time to move the state at CHECKPOINT_BYTES_PER_S (81 GB: 300 + 1620 s)."""
    return TIMEOUT_S + math.ceil(state_bytes / CHECKPOINT_BYTES_PER_S)


@contextmanager
def collective_timeout(seconds: int):
    """Every process group of this process (the default one and those FSDP's device mesh made) gets a collective
    timeout of `seconds` inside the block, and TIMEOUT_S again after it. torch has no public call for this:
    _set_pg_timeout is torch.distributed's own (private) function, used here and nowhere else."""
    if world_size() == 1:
        yield
        return
    c10d = dist.distributed_c10d
    groups = list(c10d._world.pg_map)
    for group in groups:
        c10d._set_pg_timeout(timedelta(seconds=seconds), group)
    try:
        yield
    finally:
        for group in groups:
            c10d._set_pg_timeout(timedelta(seconds=TIMEOUT_S), group)


def gather_objects(obj) -> list:
    """[rank 0's obj, rank 1's, ...] on every rank (a collective: every rank calls it); [obj] in one process."""
    if world_size() == 1:
        return [obj]
    out = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()


def full_state(model: torch.nn.Module, optimizer) -> tuple[dict, dict]:
    """(model state dict, optimizer state dict) as ONE process would have them, on the CPU, gathered from the
    FSDP shards on every rank (a collective: every rank calls it). The optimizer's state comes keyed by
    parameter index, like `optimizer.state_dict()`, so the checkpoint is the single-process one."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict)

    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    msd = get_model_state_dict(model, options=opts)
    osd = get_optimizer_state_dict(model, optimizer, options=opts)
    if not is_main():  # with cpu_offload the full state lands on rank 0 only
        return {}, {}
    ids, groups = {}, []
    for g in osd["param_groups"]:
        params = []
        for name in g["params"]:
            ids[name] = len(ids)
            params.append(ids[name])
        groups.append({**g, "params": params})
    return msd, {"state": {ids[n]: s for n, s in osd["state"].items()}, "param_groups": groups}


def load_optimizer_state(model: torch.nn.Module, optimizer, state: Optional[dict]) -> None:
    """Load a single-process optimizer state (keyed by parameter index) into the optimizer of a sharded model:
    index i is the i-th trainable parameter in the optimizer's groups, named as in the model. Only rank 0 has
    `state` (the others pass None and never read it: 7B's full AdamW state is 54 GB); it sends each tensor in
    turn and every rank keeps its own shard (broadcast_from_rank0)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    fqn = {}
    if is_main():
        names = {id(p): n for n, p in model.named_parameters()}
        order = [names[id(p)] for g in optimizer.param_groups for p in g["params"]]
        fqn = {"state": {order[i]: s for i, s in state["state"].items()},
               "param_groups": [{**g, "params": [order[i] for i in g["params"]]} for g in state["param_groups"]]}
    set_optimizer_state_dict(model, optimizer, fqn,
                             options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))


class GatheredOptimizer:
    """Stands in for the optimizer when writing a checkpoint from gathered state (FSDP): state_dict() only."""

    def __init__(self, state: dict):
        self._state = state

    def state_dict(self) -> dict:
        return self._state
