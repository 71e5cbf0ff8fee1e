"""A training run's saved state, and resuming it exactly.

A run folder holds `log.jsonl` (`start_log` keeps the records up to a resumed step) and `checkpoint/`: the
weights (`model/` for full fine-tuning; `adapter[-NAME]/` in PEFT's layout plus `trainable.safetensors` with
LoRA), and `train_state.pt` with the optimizer, the GradScaler, every rank's random states, the step and the
config. `save_checkpoint` writes it atomically (under torchrun: gathered, written by rank 0);
`find_checkpoint`, `restore_weights` and `restore_optimizer` read it back so that a resumed run continues as
the uninterrupted one would. A LoRA adapter is saved with the position settings it was trained with
(`rope_config.json`, `ROPE_CONFIG`; read back by evaluation.longctx).
"""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import pickle
import random
import re
import tempfile
import warnings
from contextlib import suppress
from pathlib import Path
from typing import Optional

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..checkpoints import load_model, save_model
from ..checkpoints.weights import args_to_hf_config
from ..files import atomic_directory, atomic_write_text, open_nofollow
from ..model import Transformer
from . import distributed
from .settings import TrainConfig

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


def base_trains(model) -> bool:
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

    if base_trains(model):
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


def find_checkpoint(out_dir: Path) -> Path:
    """out_dir/checkpoint, or the previous one set aside by a save that was killed between its two renames;
    FileNotFoundError when there is neither."""
    ckpt = out_dir / "checkpoint"
    if (ckpt / TRAIN_STATE).exists():
        return ckpt
    old = sorted((p for p in out_dir.glob(".checkpoint.old-*") if not p.is_symlink()), key=lambda p: p.stat().st_mtime)
    if old and (old[-1] / TRAIN_STATE).exists():
        return old[-1]
    raise FileNotFoundError(f"Cannot resume: {ckpt / TRAIN_STATE} does not exist.")


def read_train_state(ckpt: Path, without_optimizer: bool = False) -> dict:
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


def restore_weights(ckpt: Path, model, cfg: TrainConfig, strategy: str = "single") -> dict:
    """Check the settings against the checkpoint's, load its weights into the (unwrapped) model; returns the
    training state for restore_optimizer. --batch-size is per rank: what must match is the micro-batch over
    all ranks (batch_size * world size), so 2 ranks x 4 rows resume as 1 process x 8 rows. Under FSDP only rank 0
    reads the optimizer's state (distributed.load_optimizer_state sends each rank its shard)."""
    state = read_train_state(ckpt, without_optimizer=strategy == "fsdp" and not distributed.is_main())
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


def restore_optimizer(state: dict, model, optimizer, scaler, strategy: str) -> int:
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


def start_log(log_path: Path, resume: bool, start: int) -> list[dict]:
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


def _state_bytes(model, optimizer) -> int:
    """Bytes of the model's parameters and the optimizer's state tensors (full sizes: a sharded tensor counts
    whole), what a checkpoint gathers and writes."""
    tensors = list(model.parameters()) + [t for s in optimizer.state.values() for t in s.values()
                                          if isinstance(t, torch.Tensor)]
    return sum(t.numel() * t.element_size() for t in tensors)


def save_checkpoint(out_dir: Path, runner, optimizer, scaler, step: int, cfg: TrainConfig, tokenizer,
                    strategy: str) -> None:
    """out_dir/checkpoint at `step`, as one process would write it, under a collective timeout that grows with
    its size (distributed.checkpoint_timeout_s). FSDP: every rank joins the gather, rank 0 writes."""
    model = distributed.unwrap(runner)
    with distributed.collective_timeout(distributed.checkpoint_timeout_s(_state_bytes(runner, optimizer))):
        rng_ranks = distributed.gather_objects(_rng_state())  # every rank's own random states, on rank 0
        if strategy == "fsdp":
            msd, osd = distributed.full_state(runner, optimizer)
            if distributed.is_main():
                with torch.device("meta"):
                    plain = Transformer(model.args)
                plain.load_state_dict(msd, assign=True)
                write_checkpoint(out_dir / "checkpoint", plain, distributed.GatheredOptimizer(osd), scaler, step,
                                 cfg, tokenizer, rng_ranks)
        elif distributed.is_main():
            write_checkpoint(out_dir / "checkpoint", model, optimizer, scaler, step, cfg, tokenizer, rng_ranks)
        distributed.barrier()  # nobody runs ahead of a checkpoint being written
