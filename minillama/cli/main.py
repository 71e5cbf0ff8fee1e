"""The `minillama` command line: `minillama doctor | generate | demo | eval | train | bench | ...`."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Optional

import torch

from ..course.paths import corpora_dir, tiny_model_dir
from .plan import add_plan_parser
from ..progress import progress_bar, set_progress


def _device(name: str) -> str:
    """--device: auto (CUDA when present, else the CPU), cpu, cuda, cuda:N or mps; refused if this machine lacks it."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        kind = torch.device(name).type
    except RuntimeError:
        kind = None
    available = {"cpu": lambda: True, "cuda": lambda: torch.cuda.is_available(),
                 "mps": lambda: torch.backends.mps.is_available()}
    if kind not in available:
        raise ValueError(f"--device {name!r} is not a device: expected auto, cpu, cuda, cuda:N or mps.")
    if not available[kind]():
        raise ValueError(f"--device {name!r} needs {kind.upper()}, which this machine lacks: use --device cpu or auto.")
    if kind == "cuda" and (torch.device(name).index or 0) >= torch.cuda.device_count():
        raise ValueError(f"--device {name!r}: this machine has {torch.cuda.device_count()} CUDA device(s), "
                         f"numbered from 0.")
    return name


def _check_positive(args, *keys: str) -> None:
    """Refuse a given flag that is not a positive integer (None means "not given": the default)."""
    for key in keys:
        value = getattr(args, key)
        if value is not None and value <= 0:
            raise ValueError(f"--{key.replace('_', '-')} {value} is invalid: expected a positive integer.")


def cmd_doctor(args) -> int:
    from .doctor import main

    return main()


def cmd_generate(args) -> int:
    from .. import generate, load_model, load_tokenizer
    from ..generate import check_sampling
    from ..tokenizer import TextStream

    device = _device(args.device)
    check_sampling(args.temperature, args.top_p, args.max_new_tokens)
    if args.system is not None and not args.chat:
        raise ValueError("--system is a chat's system message: give it with --chat.")
    try:
        args.prompt.encode("utf-8")
    except UnicodeEncodeError as e:  # sys.argv keeps undecodable bytes as surrogates
        raise ValueError(f"--prompt holds bytes that are not valid UTF-8 (character {e.start + 1}): pass the "
                         f"prompt as UTF-8 text.") from None
    model = load_model(args.model, device=device, dtype=args.dtype)
    if args.adapter:
        from ..lora import load_adapter

        load_adapter(model, args.adapter)
    tok = load_tokenizer(args.tokenizer or args.model, vocab_size=model.args.vocab_size)
    if args.chat:  # the model's own chat format; only the answer is printed
        dialog = [{"role": "system", "content": args.system}] if args.system is not None else []
        prompt = tok.encode_chat(dialog + [{"role": "user", "content": args.prompt}])
    else:
        prompt = tok.encode(args.prompt, bos=True)
        print(args.prompt, end="", flush=True)
    text = TextStream(tok, prompt)  # decodes the growing sequence: each token alone would lose its space
    generate(model, prompt, args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
             eos_id=tok.stop_ids, seed=args.seed,  # EOS; for Llama-3 also <|eot_id|>, the end of a chat turn
             stream=lambda row, token: print(text.add(token), end="", flush=True))
    print(text.flush())  # an unfinished character held back at the very end, then the newline
    return 0


def cmd_demo(args) -> int:
    """The main job of the README: load the shipped tiny model, check it, generate, and evaluate."""
    from .. import create_model, generate, get_preset, load_model, load_tokenizer
    from ..training.data import read_jsonl_texts
    from ..evaluation.evaluate import passkey_accuracy, perplexity

    from .. import __version__

    device = _device(args.device)
    print(f"minillama {__version__} | torch {torch.__version__} | device {device} (`minillama doctor` for more)")
    tiny = tiny_model_dir()
    shipped = (tiny / "config.json").exists()
    if shipped:
        model = load_model(tiny, device=device)
        tok = load_tokenizer(tiny, vocab_size=model.args.vocab_size)
        source = f"shipped tiny model ({tiny}, see MODEL_CARD.md)"
    else:
        model, tok = create_model(get_preset("tiny"), device=device, seed=0), None
        source = "randomly initialised 'tiny' preset (data/tiny is missing: run `minillama build-tiny`)"
    a = model.args
    n = sum(p.numel() for p in model.parameters())
    print(f"model: {source}")
    print(f"  dim={a.dim} n_layers={a.n_layers} n_heads={a.n_heads} n_kv_heads={a.n_kv_heads} "
          f"ffn={a.ffn_hidden_dim} vocab={a.vocab_size} max_seq_len={a.max_seq_len}")
    print(f"  parameters: {n:,} ({n * 4 / 1024**2:.1f} MiB in fp32)")

    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, a.vocab_size, (2, min(64, a.max_seq_len)), generator=g).to(device)
    with torch.no_grad():
        sdpa = model(tokens)
        model.set_attn_impl("math")
        math_ = model(tokens)
        model.set_attn_impl(a.attn_impl)
    print(f"  SDPA vs explicit-softmax attention: max |diff| of logits = {(sdpa - math_).abs().max().item():.2e}")

    prompt = "Once upon a time, there was a girl called Lily."
    ids = tok.encode(prompt) if tok else [1, 5, 9, 13]
    print(f"\ngreedy generation, {args.max_new_tokens} new tokens:")
    if tok:
        print(prompt, end="", flush=True)
    t0 = time.perf_counter()
    out = generate(model, ids, args.max_new_tokens, eos_id=tok.eos_id if tok else None)[0]
    dt = time.perf_counter() - t0
    print(tok.decode(ids[1:] + out)[len(prompt):] if tok else out)
    print(f"  ({len(out)} tokens in {dt:.2f} s, {len(out) / dt:.0f} tokens/s, pre-allocated KV cache)")

    if shipped:
        texts = read_jsonl_texts(corpora_dir() / "stories_val.jsonl")
        docs = [d for d in (tok.encode(t) for t in texts) if len(d) > 512][:24]
        model.set_max_seq_len(512)
        rows = [perplexity(model, docs, c, scored_tokens=512) for c in (64, 128, 256, 512)]
        model.set_max_seq_len(a.max_seq_len)
        print(f"\nperplexity of held-out stories by context length (the same first 512 tokens of "
              f"{rows[0]['docs']} long stories):")
        print("\n".join(ppl_table(rows, a.max_seq_len)))
        pk = passkey_accuracy(model, tok, context=a.max_seq_len, trials=20)
        print(f"passkey retrieval at {a.max_seq_len} tokens: {pk['accuracy']:.2f} over {pk['trials']} trials")
    print("\ndemo: OK")
    return 0


def aligned_table(header: list[str], rows: list[list[str]], notes: Optional[list[str]] = None) -> list[str]:
    """Lines of a plain-text table: cells right-aligned under their header, columns joined by " | ";
    notes[i] (if any) is appended to row i."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    lines = [" | ".join(h.rjust(w) for h, w in zip(header, widths))]
    for i, r in enumerate(rows):
        lines.append(" | ".join(c.rjust(w) for c, w in zip(r, widths)) + (notes[i] if notes else ""))
    return lines


def ppl_table(rows: list[dict], trained: int, nll: bool = False) -> list[str]:
    """The perplexity rows of `eval ppl` and `demo` (one per context), contexts beyond `trained` marked."""
    header = ["context", "perplexity"] + (["nll/token"] if nll else [])
    cells = [[str(r["context"]), f"{r['ppl']:.3f}"] + ([f"{r['nll']:.4f}"] if nll else []) for r in rows]
    notes = [f"  (beyond the trained {trained}: no RoPE scaling)" if r["context"] > trained else "" for r in rows]
    return aligned_table(header, cells, notes)


def _contexts(text: str) -> list[int]:
    try:
        values = [int(c) for c in text.split(",") if c.strip()]
    except ValueError:
        raise ValueError(f"--context {text!r} is invalid: expected comma-separated integers, e.g. 64,128,256.") from None
    if not values or min(values) <= 0:
        raise ValueError(f"--context {text!r} is invalid: expected positive integers.")
    return values


EVAL_CORPORA = {"stories": "stories_val.jsonl"}


def _eval_rows(args, name: str, model, tok, contexts: list[int], depths: list[float], docs) -> list[dict]:
    """The rows of one variant for `minillama eval WHAT` (see _add_eval)."""
    from ..evaluation.evaluate import passkey_accuracy, perplexity
    from ..evaluation.longctx import kv_cache_profile, phrases_accuracy

    if args.what == "ppl":
        scored = args.scored_tokens or max(contexts)
        rows = [perplexity(model, docs, c, scored_tokens=scored) for c in contexts]
    elif args.what == "passkey":
        rows = [passkey_accuracy(model, tok, c, args.trials * len(depths), args.seed, depths) for c in contexts]
    elif args.what == "phrases":
        rows = [{"context": c, "trials": args.trials, "per_position": phrases_accuracy(model, tok, c, args.trials,
                                                                                        args.seed)} for c in contexts]
    else:
        rows = kv_cache_profile(model, contexts, args.batch)
    return [{"variant": name, **r, "beyond_trained_context": r["context"] > args.trained} for r in rows]


def _eval_table(what: str, rows: list[dict], trained: int) -> list[str]:
    """The printed table of `minillama eval WHAT`: one line per variant (ppl) or per variant and context,
    every column right-aligned under its header (aligned_table)."""
    if what == "ppl":
        contexts = list(dict.fromkeys(r["context"] for r in rows))
        by = {}
        for r in rows:
            by.setdefault(r["variant"], {})[r["context"]] = r["ppl"]
        head = f"perplexity ({rows[0]['docs']} docs, {rows[0]['tokens']} scored tokens), trained context {trained}"
        return [head] + aligned_table(["variant", *map(str, contexts)],
                                      [[v, *(f"{p.get(c, float('nan')):.3f}" for c in contexts)] for v, p in by.items()])
    if what == "passkey":
        head = f"passkey retrieval, {rows[0]['trials']} keys per context, trained context {trained}"
        return [head] + aligned_table(
            ["variant", "context", "prompt tokens", *(f"depth {d}" for d in rows[0]["per_depth"]), "overall"],
            [[r["variant"], str(r["context"]), str(r["prompt_tokens"]), *(f"{a:.2f}" for a in r["per_depth"].values()),
              f"{r['accuracy']:.2f}"] for r in rows])
    if what == "phrases":
        pos = list(rows[0]["per_position"])
        return [f"secret phrases repeated, {rows[0]['trials']} per position, trained context {trained}"] + aligned_table(
            ["variant", "context", *pos],
            [[r["variant"], str(r["context"]), *(f"{a:.2f}" for a in r["per_position"].values())] for r in rows])
    return [f"KV cache (pre-allocated) and decoding speed, batch {rows[0]['batch']}, {rows[0]['dtype']}"] + aligned_table(
        ["variant", "context", "measured MiB", "predicted MiB", "decode tokens/s"],
        [[r["variant"], str(r["context"]), f"{r['measured_bytes'] / 2**20:.2f}", f"{r['predicted_bytes'] / 2**20:.2f}",
          f"{r['decode_tokens_per_s']:.1f}"] for r in rows])


def _eval_outputs(args, rows: list[dict], device: str) -> None:
    """--out DIR: results.json / results.csv and the figure of WHAT (ppl.png, passkey.png, kvcache.png)."""
    from datetime import datetime, timezone

    from ..evaluation import longctx as lc
    from ..measuring.measure import device_name

    meta = {"command": "minillama " + " ".join(sys.argv[1:]), "what": args.what, "model": args.model,
            "trained_context": args.trained, "device": device_name(torch.device(device)), "torch": torch.__version__,
            "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}
    paths = lc.write_rows(rows, args.out, meta)
    out, where = Path(args.out), f"{meta['device']}, torch {meta['torch']}"
    if args.what == "ppl":
        curves = {}
        for r in rows:
            curves.setdefault(r["variant"], {})[r["context"]] = r["ppl"]
        paths["png"] = lc.plot_ppl(curves, out / "ppl.png", args.trained, f"perplexity against context ({where})")
    elif args.what == "passkey":
        grids = {}
        for r in rows:
            grids.setdefault(r["variant"], {})[r["context"]] = r["per_depth"]
        paths["png"] = lc.plot_passkey(grids, out / "passkey.png", f"passkey accuracy ({where})")
    elif args.what == "kvcache":
        paths["png"] = lc.plot_kv_cache(rows, out / "kvcache.png", f"KV cache against context ({where})")
    print("wrote " + ", ".join(str(p) for p in paths.values()))


def _eval_docs(args, tok) -> list:
    from ..training.data import read_jsonl_texts

    data = Path(args.data)
    if not data.suffix:
        if args.data not in EVAL_CORPORA:
            raise ValueError(f"Unknown corpus {args.data!r}: expected one of {sorted(EVAL_CORPORA)} "
                             f"or a path to a JSONL file with a 'text' field.")
        data = Path(args.corpora or corpora_dir()) / EVAL_CORPORA[args.data]
    return [tok.encode(t) for t in read_jsonl_texts(data)][: args.max_docs]


def _depths(text: str) -> list[float]:
    try:
        values = [float(d) for d in text.split(",") if d.strip()]
    except ValueError:
        values = []
    if not values or any(not 0.0 <= d <= 1.0 for d in values):
        raise ValueError(f"--depths {text!r} is invalid: expected comma-separated numbers in [0, 1], e.g. 0,0.5,1.")
    return values


def cmd_eval(args) -> int:
    import json

    from .. import load_tokenizer
    from ..evaluation.evaluate import check_fits
    from ..evaluation.longctx import load_variants

    device = _device(args.device)
    contexts, depths = _contexts(args.context), _depths(args.depths)
    _check_positive(args, "scored_tokens", "max_docs", "trials", "batch", "max_seq_len")
    args.model = args.model or str(tiny_model_dir())
    longest = max(contexts)
    if args.max_seq_len is not None and args.max_seq_len < longest:
        raise ValueError(f"--max-seq-len {args.max_seq_len} is shorter than the longest --context {longest}.")
    length = args.max_seq_len or longest
    specs = [s for s in args.variants.split(",") if s.strip()]
    tok, docs, rows = None, None, []
    for name, model, args.trained in load_variants(args.model, specs, args.adapter or [], length, device):
        # refused before any activation or cache is allocated, with the memory model's prediction
        generating = args.what != "ppl"
        what = f"--max-seq-len {length}" if args.max_seq_len else f"{args.what} at context {length}"
        check_fits(model, args.batch if args.what == "kvcache" else 1, length, what,
                   mode="inference" if generating else "eval", kv_cache=length if generating else 0)
        if tok is None:
            tok = load_tokenizer(args.tokenizer or args.model, vocab_size=model.args.vocab_size)
            docs = _eval_docs(args, tok) if args.what == "ppl" else None
        rows += _eval_rows(args, name, model, tok, contexts, depths, docs)
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        print("\n".join(_eval_table(args.what, rows, args.trained)))
    if args.out:
        _eval_outputs(args, rows, device)
    return 0


def cmd_corpora(args) -> int:
    from ..course.corpora import main

    return main(["--out", args.out or str(corpora_dir()), "--seed", str(args.seed)]) or 0


def cmd_build_tiny(args) -> int:
    from ..course.recipe import build_tiny

    args.out = args.out or str(tiny_model_dir())
    args.corpora = args.corpora or str(corpora_dir())
    info = build_tiny(args.out, args.corpora, steps=args.steps, seed=args.seed, batch_size=args.batch_size,
                      lr=args.lr, work_dir=args.work_dir, command="minillama " + " ".join(sys.argv[1:]))
    print(f"wrote {args.out} ({info['total_bytes'] / 1024**2:.2f} MiB); passkey accuracy "
          f"{info['passkey']['accuracy']:.2f}; see {Path(args.out) / 'MODEL_CARD.md'}")
    return 0


def cmd_longctx(args) -> int:
    from ..course.context_extension import sweep_from_args

    sweep_from_args(args)
    return 0


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
    from ..training.train import SETTINGS, check_4bit_needs_lora, check_extras_need_lora, check_settings

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


def cmd_train(args) -> int:
    import math

    from .. import load_model, load_tokenizer
    from ..files import file_sha256
    from ..training.data import split_held_out
    from ..lora import trainable_parameters
    from ..training import distributed
    from ..training.train import TrainConfig, check_writable, extend_context, skipped_steps, train

    device = distributed.rank_device(_device(args.device))  # under torchrun: cuda:LOCAL_RANK
    _check_train_flags(args)
    if args.compile:
        from ..training.train import compile_problem

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
                      train_norms=args.train_norms, load_in_4bit=args.load_in_4bit, quant_type=args.quant_type, double_quant=args.double_quant,
                      quant_blocksize=args.quant_blocksize, compile=args.compile, kernels=args.kernels, eval_every=args.eval_every or steps, save_every=args.save_every, seed=args.seed,
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


def cmd_bench_compare(args) -> int:
    """bench --compare hf: every row through minillama and through transformers + PEFT, side by side."""
    from ..config import get_preset
    from ..measuring.compare import Settings, format_compare, run_compare

    if args.model is not None:
        raise ValueError("--compare hf builds both models with the same random weights; drop --model PATH.")
    get_preset(args.preset)  # an unknown preset fails here, with the list of known ones
    keys = ("batch", "seq_len", "long_seq_len", "new_tokens", "repeats")
    _check_positive(args, *keys)
    sizes = {k: getattr(args, k) for k in keys if getattr(args, k) is not None}
    s = Settings.defaults(args.preset, _device(args.device), dtype=args.dtype, compile_hf=args.compile_hf, **sizes)
    rows = run_compare(s, args.rows, out_dir=args.out)
    print()
    print(format_compare(rows, "md", settings=s))
    print(f"\nwrote {args.out}/results.json, results.csv, table.md, speed.png, memory.png")
    return 0


def cmd_bench(args) -> int:
    from ..measuring.bench import format_effects, format_table, model_factory, run_grid, technique_effects

    if args.compare:
        return cmd_bench_compare(args)
    if args.compile_hf:
        raise ValueError("--compile-hf is for --compare hf (its *-compiled rows); the grid runs minillama eager.")
    device = _device(args.device)
    path = args.model
    if path is None and args.preset == "tiny" and not args.random_weights:
        path = str(tiny_model_dir())
    if path is None and not args.random_weights:
        raise ValueError(f"--preset {args.preset} needs --model PATH (its weights) or --random-weights.")
    make = model_factory(args.preset, model_path=path, random_weights=args.random_weights, device=device,
                         dtype=args.dtype)
    repeats = 3 if args.repeats is None else args.repeats
    rows = run_grid(make, args.grid, preset=args.preset, out_dir=args.out, repeats=repeats)
    print()
    print(format_table(rows, "md"))
    effects = technique_effects(rows)
    if effects:
        print("\nWhat each technique does (median ratio on/off over pairs of rows that differ only in it):\n")
        print(format_effects(effects))
    print(f"\nwrote {args.out}/results.json, results.csv, table.md, memory.png, runtime.png, flops.png")
    return 0


def _add_generate(sub) -> None:
    g = sub.add_parser("generate", help="continue a prompt with a checkpoint (native, HF or Meta)")
    g.add_argument("--model", required=True, help="checkpoint directory")
    g.add_argument("--tokenizer", help="tokenizer.model or its directory (default: the model directory)")
    g.add_argument("--prompt", required=True)
    g.add_argument("--chat", action="store_true",
                   help="the prompt is a user's message in the model's chat format (Llama-2's [INST], Llama-3's "
                        "headers); prints the answer, which ends at the end of the turn")
    g.add_argument("--system", default=None, help="with --chat: a system message before the prompt")
    g.add_argument("--adapter", metavar="DIR", help="a LoRA adapter (PEFT format, e.g. RUN/checkpoint/adapter)")
    g.add_argument("--max-new-tokens", type=int, default=64)
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    g.add_argument("--dtype", default=None, help="fp32, fp16 or bf16 (default: as stored)")
    g.set_defaults(func=cmd_generate)


def _add_eval(sub) -> None:
    e = sub.add_parser("eval", help="long context: perplexity against length, passkey, phrases, KV cache",
                       description="Evaluate one or several variants of a checkpoint (RoPE scalings, adapters) "
                                   "at several context lengths; --out DIR saves JSON, CSV and a figure.")
    e.add_argument("what", choices=["ppl", "passkey", "phrases", "kvcache"])
    e.add_argument("--model", default=None, help="checkpoint directory (default: the shipped tiny model)")
    e.add_argument("--tokenizer", help="default: the model directory")
    e.add_argument("--variants", default="base",
                   help="comma-separated: base (the checkpoint as trained) and TYPE:FACTOR with TYPE linear, ntk, "
                        "dynamic, yarn or llama3, e.g. base,linear:4,ntk:4,yarn:4")
    e.add_argument("--adapter", action="append", metavar="DIR",
                   help="a fine-tuned LoRA adapter (PEFT format; its rope_config.json gives its scaling); repeatable")
    e.add_argument("--data", default="stories", help="ppl: a corpus name (stories) or a JSONL file")
    e.add_argument("--corpora", default=None, help="where corpus names are looked up (default: the shipped corpora)")
    e.add_argument("--context", "--contexts", dest="context", default="64,128,256",
                   help="comma-separated context lengths")
    e.add_argument("--depths", default="0,0.25,0.5,0.75,1", help="passkey: where the key sits (0: start, 1: end)")
    e.add_argument("--max-seq-len", type=int, default=None,
                   help="position table of the model (default: the longest --context); refused if it cannot fit")
    e.add_argument("--scored-tokens", type=int, default=None, help="ppl: tokens scored per doc (default: max context)")
    e.add_argument("--max-docs", type=int, default=None)
    e.add_argument("--trials", type=int, default=20, help="passkey: keys per depth; phrases: phrases per position")
    e.add_argument("--batch", type=int, default=1, help="kvcache: sequences decoded together")
    e.add_argument("--seed", type=int, default=1234)
    e.add_argument("--device", default="auto")
    e.add_argument("--out", default=None, help="directory for results.json, results.csv and the figure")
    e.add_argument("--json", action="store_true", help="print the rows as JSON")
    e.set_defaults(func=cmd_eval)


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
    from ..training.train import AMP_MODES, OPTIMIZERS

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


def _add_train(sub) -> None:
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
    t.set_defaults(func=cmd_train)


def _add_bench(sub) -> None:
    m = sub.add_parser("bench", help="measure a grid of configurations (memory by category, time, FLOPs)")
    m.add_argument("--preset", default="tiny", help="tiny, llama2-7b, llama2-13b, llama3-8b")
    m.add_argument("--grid", default="default", help="default, batch, seq, mode, lora, techniques, qlora, qlora-amp, kernels")
    m.add_argument("--out", required=True, help="output directory")
    m.add_argument("--model", default=None, help="weights to load (default for tiny: the shipped tiny model)")
    m.add_argument("--random-weights", action="store_true", help="build the preset with random weights")
    m.add_argument("--device", default="auto")
    m.add_argument("--dtype", default=None, help="fp32, bf16, fp16 (default: as loaded / fp32)")
    m.add_argument("--repeats", type=int, default=None,
                   help="timed repeats per row (median; default 3, with --compare 9 on CPU and 4 on CUDA)")
    m.add_argument("--compare", choices=("hf",), default=None,
                   help="hf: each row through minillama and through transformers + PEFT side by side "
                        "(same random weights, data and settings); --grid is then not used")
    m.add_argument("--rows", default=None, help="with --compare: comma-separated rows (default: all), of "
                   "lora-qv, lora-all, full, inference, qlora-qv, lora-qv-long, lora-qv-ckpt, lora-all-ckpt, "
                   "lora-qv-compiled, lora-all-compiled, full-compiled")
    m.add_argument("--batch", type=int, default=None, help="with --compare (default: 4 on CPU, 2 on CUDA)")
    m.add_argument("--seq-len", type=int, default=None, help="with --compare (default: 128 on CPU, 512 on CUDA)")
    m.add_argument("--long-seq-len", type=int, default=None, help="with --compare: the long-context row")
    m.add_argument("--new-tokens", type=int, default=None, help="with --compare: tokens generated (inference)")
    m.add_argument("--compile-hf", action="store_true",
                   help="with --compare: in the *-compiled rows (minillama's blocks torch.compiled), compile HF's "
                        "decoder layers too (default: HF eager, as it runs by default)")
    m.set_defaults(func=cmd_bench)


def _add_course(sub) -> None:
    c = sub.add_parser("corpora", help="write the synthetic corpora (deterministic from --seed)")
    c.add_argument("--out", default=None, help="default: the shipped corpora folder")
    c.add_argument("--seed", type=int, default=0)
    c.set_defaults(func=cmd_corpora)

    b = sub.add_parser("build-tiny", help="the whole recipe of the shipped tiny model (pre-trains from scratch)")
    b.add_argument("--out", default=None, help="default: the shipped tiny model folder")
    b.add_argument("--corpora", default=None, help="default: the shipped corpora folder")
    b.add_argument("--work-dir", default="runs/tiny-pretrain", help="log.jsonl and training checkpoints")
    b.add_argument("--steps", type=int, default=3000)
    b.add_argument("--batch-size", type=int, default=16)
    b.add_argument("--lr", type=float, default=2e-3)
    b.add_argument("--seed", type=int, default=0)
    b.set_defaults(func=cmd_build_tiny)

    from ..course.context_extension import add_arguments

    lc = sub.add_parser("longctx", help="the long-context sweep: tiny from 256 to 1,024 tokens (scalings x LoRA)")
    add_arguments(lc)
    lc.set_defaults(func=cmd_longctx)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="minillama", description="minillama: LLaMA-2 from scratch, fine-tuned on one GPU.")
    p.add_argument("--no-progress", action="store_true",
                   help="no progress bars (they go to stderr, and only when it is a terminal)")
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("doctor", help="print the environment (paste it into bug reports)").set_defaults(func=cmd_doctor)
    _add_generate(sub)
    d = sub.add_parser("demo", help="the quick-start job: load the tiny model, check it, generate")
    d.add_argument("--device", default="auto")
    d.add_argument("--max-new-tokens", type=int, default=60)
    d.set_defaults(func=cmd_demo)
    _add_eval(sub)
    _add_train(sub)
    _add_bench(sub)
    _add_course(sub)
    add_plan_parser(sub)
    return p


def _missing_folders(path: Optional[str]) -> list[Path]:
    """`path` and those of its parents that do not exist yet, deepest first."""
    missing = []
    p = Path(path).absolute() if path else None
    while p is not None and not p.exists() and p != p.parent:
        missing.append(p)
        p = p.parent
    return missing


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    set_progress(not args.no_progress)
    new_folders = _missing_folders(getattr(args, "out", None))
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, FloatingPointError, ImportError, OSError) as e:
        print(f"minillama {args.command}: error: {e}", file=sys.stderr)
        for folder in new_folders:  # leave no empty --out behind (rmdir removes empty folders only)
            try:
                folder.rmdir()
            except OSError:
                break
        return 2


if __name__ == "__main__":
    sys.exit(main())
