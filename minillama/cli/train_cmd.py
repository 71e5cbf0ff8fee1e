"""`minillama train`: fine-tune (full, LoRA, QLoRA) or pre-train from the command line: its flags, their checks
before anything is loaded, the data format, and the pre-flight memory check (measuring.plan) before the first
step; the loop itself is minillama/training/train.py."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Optional

import torch

from .common import pick_device


def _data_format(path: Path) -> str:
    """'alpaca' (instruction data) or 'text' (a JSONL of {"text"}), from the file's first row."""
    if not path.exists():
        raise FileNotFoundError(f"Data file {path} does not exist.")
    with open(path, encoding="utf-8", errors="replace") as f:  # a sniff: the reader names undecodable bytes
        head = f.read(4096).lstrip()
    if head.startswith("["):
        return "alpaca"
    first = head.split("\n", 1)[0]
    if '"instruction"' in first:
        return "alpaca"
    if '"text"' in first:
        return "text"
    raise ValueError(f"{path}: cannot tell its format from the first row: expected a JSON list or JSONL of "
                     f"Alpaca objects (instruction/input/output), or JSONL of {{\"text\": ...}}; pass --format.")


def _load_data(path, fmt: str, tok, max_len: int, on_long: str, seed: int):
    from ..training.data import PackedRows, load_sft, pack_documents, read_jsonl_texts

    path = Path(path)
    fmt = _data_format(path) if fmt == "auto" else fmt
    if fmt == "alpaca":
        data, stats = load_sft(path, tok, max_len, on_long, pad_id=tok.eos_id)
        return data, f"{len(data)} examples ({stats['truncated']} truncated, {stats['dropped']} dropped at max_len {max_len})"
    docs = [tok.encode(t, bos=True, eos=True) for t in read_jsonl_texts(path)]
    data = PackedRows(*pack_documents(docs, max_len - 1, seed=seed))
    return data, f"{len(data)} packed rows of {max_len - 1} tokens"


def _check_train_flags(args) -> None:
    """Refuse bad flags before anything is loaded or written, naming the flag."""
    from ..training.settings import SETTINGS, check_4bit_needs_lora, check_extras_need_lora, check_settings

    if (args.steps is None) == (args.epochs is None):
        raise ValueError("Give exactly one of --steps N or --epochs E.")
    flags = {key: getattr(args, key) for key in SETTINGS
             if key != "rope_scaling" and getattr(args, key, None) is not None}
    check_settings(flags, name=lambda key, value: f"--{key.replace('_', '-')} {value}")
    check_4bit_needs_lora(args.load_in_4bit, args.lora_r, flags=True)
    check_extras_need_lora(args.train_embeddings, args.train_norms, args.lora_r, flags=True)
    if args.max_seq_len is not None and args.max_seq_len <= 0:
        raise ValueError(f"--max-seq-len {args.max_seq_len} is invalid: expected a positive integer.")


def _context_flags(args, model) -> tuple:
    """(rope_scaling, max_seq_len) of --rope-scaling TYPE:FACTOR / none and --max-seq-len N; the original window
    is the checkpoint's max_seq_len. A scaling needs no --max-seq-len (default: factor x window); one that
    contradicts the checkpoint's own is refused."""
    from ..rope import scaling_from_spec

    if args.rope_scaling is None:
        return None, args.max_seq_len or 0
    window, own = model.args.max_seq_len, model.args.rope_scaling
    scaling = scaling_from_spec(args.rope_scaling, window)
    if own is not None and scaling != own:
        raise ValueError(f"--rope-scaling {args.rope_scaling} contradicts the checkpoint {args.model}, whose config "
                         f"already has rope_scaling {own}: refused (train from an unscaled checkpoint, or drop the flag).")
    if scaling is None and args.max_seq_len is None:
        raise ValueError("--rope-scaling none needs --max-seq-len N (the longer position table, with no interpolation).")
    if args.max_seq_len is not None and args.max_seq_len < window:
        raise ValueError(f"--max-seq-len {args.max_seq_len} is shorter than the checkpoint's own context ({window}): "
                         f"expected at least {window}.")
    return scaling, args.max_seq_len or int(scaling["factor"] * window)


def train_memory_problem(args, model_args, param_dtype, max_len: int, *, device_type: str, free_bytes: int,
                         loaded_bytes: int, world_size: int = 1) -> Optional[str]:
    """None when one training step of `minillama train`'s flags fits on one rank, else why not (one sentence).

    The memory model's peak per rank (measuring.plan.train_step_need: the micro-batch, LoRA, the 4-bit base,
    AMP, the optimizer, checkpointing, accumulation, FSDP's sharding over `world_size` ranks), weights
    included, against the free memory measured after loading plus what the model already holds
    (measuring.plan.preflight_message)."""
    from ..measuring.plan import preflight_message, train_step_need
    from ..training.distributed import resolve_strategy

    lora = {"r": args.lora_r, "dropout": args.lora_dropout, "targets": "all" if args.lora_targets == "all" else
            tuple(t for t in args.lora_targets.split(",") if t)} if args.lora_r else None
    quant4 = {"quant_type": args.quant_type, "double_quant": args.double_quant,
              "blocksize": args.quant_blocksize} if args.load_in_4bit else None
    strategy = resolve_strategy(args.strategy, base_trains=not args.lora_r, quantized=args.load_in_4bit,
                                amp=args.amp) if world_size > 1 else "single"
    need = train_step_need(model_args, batch=args.batch_size, seq_len=max_len - 1, param_dtype=param_dtype,
                           amp=args.amp, lora=lora, quant4=quant4, optimizer=args.optimizer,
                           checkpointing=bool(args.checkpointing), grad_accum=args.grad_accum, device=device_type,
                           strategy=strategy, gpus=world_size, kernels=getattr(args, "kernels", True)).peak_bytes
    where = f"{device_type}" + (f" (one of {world_size} ranks, {strategy})" if world_size > 1 else "")
    return preflight_message(need, free_bytes=free_bytes, loaded_bytes=loaded_bytes, where=where)


def _check_train_memory(args, model, max_len: int) -> None:
    """Refuse, before any activation is allocated, a training step that the memory model says cannot fit on
    the device (train_memory_problem, with the free memory measured now, after the weights were loaded)."""
    from ..evaluation.evaluate import available_memory_bytes
    from ..measuring.measure import model_bytes
    from ..training import distributed

    device = next(model.parameters()).device
    dtype = model.tok_embeddings.weight.dtype  # never quantised: the dtype the weights were loaded in
    problem = train_memory_problem(args, model.args, dtype, max_len, device_type=device.type,
                                   free_bytes=available_memory_bytes(device), loaded_bytes=model_bytes(model),
                                   world_size=distributed.world_size())
    if problem:
        raise ValueError(f"--max-seq-len {model.args.max_seq_len} with --batch-size {args.batch_size}: {problem}; "
                         f"use a smaller batch (--grad-accum), --checkpointing, LoRA or 4 bits, or a shorter context.")


def run(args) -> int:
    import math

    from .. import load_model, load_tokenizer
    from ..files import file_sha256
    from ..training.data import split_held_out
    from ..lora import trainable_parameters
    from ..training import distributed
    from ..training import TrainConfig, extend_context, train
    from ..training.run_state import check_writable
    from ..training.train import skipped_steps

    device = distributed.rank_device(pick_device(args.device))  # under torchrun: cuda:LOCAL_RANK
    _check_train_flags(args)
    if args.compile:
        from ..training.techniques import compile_problem

        if problem := compile_problem(device):
            raise ValueError(f"--compile: {problem}; run without --compile.")
    distributed.init(torch.device(device))  # joins torchrun's process group; nothing in one process
    if distributed.is_main():
        check_writable(Path(args.out))  # a full disk or a read-only --out is refused before the model loads
    # QLoRA: the blocks' linears are quantised while the checkpoint is read (streamed: the 16-bit model is
    # never whole in memory); they are frozen from now on
    quant = dict(load_in_4bit=True, quant_type=args.quant_type, double_quant=args.double_quant,
                 blocksize=args.quant_blocksize) if args.load_in_4bit else {}
    model = load_model(args.model, device=device, dtype=args.dtype, **quant)
    tok = load_tokenizer(args.tokenizer or args.model, vocab_size=model.args.vocab_size)
    scaling, max_seq_len = _context_flags(args, model)
    extend_context(model, scaling, max_seq_len)  # recorded in TrainConfig below, and in the saved adapter
    longer = args.rope_scaling is not None or args.max_seq_len is not None
    max_len = args.max_len or (model.args.max_seq_len + 1 if longer else min(512, model.args.max_seq_len + 1))
    if max_len - 1 > model.args.max_seq_len:
        raise ValueError(f"--max-len {max_len} is longer than the model's context: at most "
                         f"max_seq_len + 1 = {model.args.max_seq_len + 1} tokens per example.")
    _check_train_memory(args, model, max_len)
    data, what = _load_data(args.data, args.format, tok, max_len, args.on_long, args.seed)
    val = {}
    if args.val_data:
        val["val"], vwhat = _load_data(args.val_data, args.format, tok, max_len, "truncate", args.seed)
    elif args.val_fraction:
        data, val["val"] = split_held_out(data, args.val_fraction, seed=args.seed)
        vwhat = f"{len(val['val'])} held out from the training data"
    per_step = args.batch_size * args.grad_accum * distributed.world_size()  # rows per optimizer step
    steps = args.steps if args.steps is not None else max(1, math.ceil(args.epochs * len(data) / per_step))
    warmup = args.warmup_steps if args.warmup_steps is not None else max(1, round(0.03 * steps))
    cfg = TrainConfig(steps=steps, batch_size=args.batch_size, grad_accum=args.grad_accum, lr=args.lr,
                      warmup_steps=warmup, min_lr_ratio=args.min_lr_ratio, weight_decay=args.weight_decay,
                      grad_clip=args.grad_clip, optimizer=args.optimizer, amp=args.amp,
                      checkpointing=args.checkpointing, lora_r=args.lora_r, lora_alpha=args.lora_alpha,
                      lora_dropout=args.lora_dropout, lora_targets=args.lora_targets,
                      rope_scaling=scaling, max_seq_len=max_seq_len, train_embeddings=args.train_embeddings,
                      train_norms=args.train_norms, load_in_4bit=args.load_in_4bit, quant_type=args.quant_type,
                      double_quant=args.double_quant, quant_blocksize=args.quant_blocksize, compile=args.compile,
                      kernels=args.kernels, eval_every=args.eval_every or steps, save_every=args.save_every,
                      seed=args.seed,
                      data_sha256=file_sha256(args.data),  # a --resume on other data is refused, naming it
                      val_data_sha256=file_sha256(args.val_data) if args.val_data else "")
    say = print if distributed.is_main() else (lambda *a, **k: None)  # rank 0 speaks for the job
    say(f"data: {what}; validation: {vwhat if val else 'none'}")
    say(f"{steps} optimizer steps of {per_step} examples/rows ({args.batch_size} x {args.grad_accum} accumulated"
        f"{f' x {distributed.world_size()} ranks' if distributed.world_size() > 1 else ''}), "
          f"amp={cfg.amp}, dtype={next(model.parameters()).dtype}, checkpointing={cfg.checkpointing}, "
          f"{'compiled blocks, ' if cfg.compile else ''}{'' if cfg.kernels else 'plain autograd (no kernels), '}"
          f"optimizer={cfg.optimizer}, lora_r={cfg.lora_r}, device={device}, context {model.args.max_seq_len}"
          f" (rope_scaling {model.args.rope_scaling})"
          + (f", 4-bit base {cfg.quant_type}{'+dq' if cfg.double_quant else ''} (blocksize {cfg.quant_blocksize})"
             if cfg.load_in_4bit else ""))
    log = train(model, data, val, cfg, args.out, tokenizer=tok, resume=args.resume, progress=not args.quiet,
                strict_amp=args.strict_amp, strategy=args.strategy, stop_at=args.stop_at)
    if not distributed.is_main():
        return 0  # rank 0 reports
    t = trainable_parameters(model)
    last = log[-1] if log else {}
    print(f"trainable parameters: {t['trainable']:,} of {t['total']:,} ({t['percent']:.2f}%)")
    print(f"final loss {last.get('loss', float('nan')):.4f}"
          + "".join(f", {k} {v:.4f}" for k, v in last.items() if k.startswith("val_"))
          + (f"; {skipped_steps(log)} steps skipped by the GradScaler" if cfg.amp == "fp16" else ""))
    print(f"wrote {Path(args.out) / 'log.jsonl'} and {Path(args.out) / 'checkpoint'}")
    return 0


def _add_train_data(t) -> None:
    t.add_argument("--model", required=True, help="checkpoint directory (native, HF or Meta)")
    t.add_argument("--tokenizer", help="default: the model directory")
    t.add_argument("--data", required=True, help="Alpaca JSON/JSONL (instruction, input, output) or JSONL of {text}")
    t.add_argument("--format", default="auto", choices=["auto", "alpaca", "text"])
    t.add_argument("--val-data", help="held-out data in the same format (evaluated every --eval-every steps)")
    t.add_argument("--val-fraction", type=float, default=0.0, help="hold out this fraction of --data instead")
    t.add_argument("--max-len", type=int, default=None, help="tokens per example/row (default min(512, context + 1))")
    t.add_argument("--on-long", default="truncate", choices=["truncate", "error"],
                   help="examples longer than --max-len: cut them (counted) or refuse")


def _add_train_techniques(t) -> None:
    from ..quant import QUANT_TYPES
    from ..training.settings import AMP_MODES, OPTIMIZERS

    t.add_argument("--optimizer", default="adamw", choices=list(OPTIMIZERS))
    t.add_argument("--amp", default="off", choices=list(AMP_MODES), help="autocast (fp16 with a GradScaler)")
    t.add_argument("--strict-amp", action="store_true", help="refuse --amp the device lacks (default: warn, run fp32)")
    t.add_argument("--dtype", default=None, help="fp32 (default: as stored), bf16 or fp16: the weights themselves")
    t.add_argument("--checkpointing", type=int, nargs="?", const=1, default=0, metavar="K",
                   help="gradient checkpointing of every K-th block (K=1 if given alone)")
    t.add_argument("--lora-r", type=int, default=0, help="LoRA rank (0: full fine-tuning)")
    t.add_argument("--lora-alpha", type=float, default=16.0)
    t.add_argument("--lora-dropout", type=float, default=0.0)
    t.add_argument("--lora-targets", default="wq,wv", help='comma-separated Meta names, or "all"')
    t.add_argument("--rope-scaling", default=None, metavar="TYPE:FACTOR",
                   help="longer context: linear:4, ntk:4, dynamic:4, yarn:4, llama3:4, or none (with --max-seq-len: "
                        "the position table extended, no interpolation); the window is the checkpoint's")
    t.add_argument("--max-seq-len", type=int, default=None,
                   help="context to train at (default with --rope-scaling: factor x the checkpoint's)")
    t.add_argument("--train-embeddings", action="store_true", help="with LoRA: the embeddings train too (LongLoRA)")
    t.add_argument("--train-norms", action="store_true", help="with LoRA: the RMSNorm weights train too (LongLoRA)")
    t.add_argument("--load-in-4bit", action="store_true",
                   help="QLoRA: the blocks' linears in 4 bits, frozen (needs --lora-r)")
    t.add_argument("--quant-type", default="nf4", choices=list(QUANT_TYPES), help="4-bit code book")
    t.add_argument("--double-quant", action="store_true", help="the 4-bit constants in 8 bits too")
    t.add_argument("--quant-blocksize", type=int, default=64, help="values per 4-bit block (power of two, 32-4096)")
    t.add_argument("--compile", action="store_true",
                   help="torch.compile each transformer block (fused element-wise work; the first step compiles)")
    t.add_argument("--kernels", action=argparse.BooleanOptionalAction, default=True,
                   help="hand-written backward passes that keep fewer tensors (minillama.kernels; equal values and "
                        "gradients, less memory); --no-kernels: the plain autograd model")


def add_parser(sub) -> None:
    t = sub.add_parser("train", help="fine-tune (full or LoRA) or pre-train, with AMP, accumulation, checkpointing")
    _add_train_data(t)
    t.add_argument("--steps", type=int, default=None, help="optimizer steps (or --epochs)")
    t.add_argument("--epochs", type=float, default=None)
    t.add_argument("--batch-size", type=int, default=1, help="micro-batch size")
    t.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    t.add_argument("--lr", type=float, default=1e-5)
    t.add_argument("--warmup-steps", type=int, default=None, help="default: 3%% of the steps")
    t.add_argument("--min-lr-ratio", type=float, default=0.0, help="cosine decays to lr * this")
    t.add_argument("--weight-decay", type=float, default=0.0)
    t.add_argument("--grad-clip", type=float, default=1.0, help="0: no clipping")
    _add_train_techniques(t)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--out", required=True, help="directory for log.jsonl and checkpoint/")
    t.add_argument("--save-every", type=int, default=100)
    t.add_argument("--eval-every", type=int, default=None, help="default: at the end only")
    t.add_argument("--resume", action="store_true", help="continue from --out/checkpoint")
    t.add_argument("--device", default="auto")
    t.add_argument("--quiet", action="store_true", help="no progress bar")
    t.add_argument("--strategy", default="auto", help="under torchrun: ddp (LoRA/QLoRA), fsdp (full fine-tuning) or "
                   "auto (ddp for adapters, fsdp for full fine-tuning); single in one process")
    t.add_argument("--stop-at", type=int, default=None, metavar="STEP",
                   help="stop after this step with a checkpoint (a job's time limit); continue with --resume")
    t.set_defaults(func=run)
