"""`minillama eval ppl|passkey|phrases|kvcache`: long-context evaluation of one or several variants of a
checkpoint (minillama.evaluation), printed as a table, optionally saved as JSON, CSV and a figure."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from ..course.paths import corpora_dir, tiny_model_dir
from .common import aligned_table, check_positive, pick_device


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
    """The rows of one variant for `minillama eval WHAT` (see add_parser)."""
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


def run(args) -> int:
    import json

    from .. import load_tokenizer
    from ..evaluation.evaluate import check_fits
    from ..evaluation.longctx import load_variants

    device = pick_device(args.device)
    contexts, depths = _contexts(args.context), _depths(args.depths)
    check_positive(args, "scored_tokens", "max_docs", "trials", "batch", "max_seq_len")
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


def add_parser(sub) -> None:
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
    e.set_defaults(func=run)
