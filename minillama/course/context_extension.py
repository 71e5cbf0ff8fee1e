"""The course's context-extension experiment: long-context LoRA, the tiny model from 256 tokens to 1,024 (x4).

Every fine-tuned variant gets the same budget (steps x batch of 1,024-token rows, learning rate, rank), on
the same long documents made from the repo's own corpora (`long_training_docs`):

* "extend+lora": the position table extended to 1,024 with no interpolation (positions 256..1023 are new
  to the model), LoRA on q/v: the first attempt of the story ("SuperHOT" before interpolation);
* "linear+lora": Position Interpolation, every position divided by 4, LoRA on q/v;
* "yarn+lora": YaRN (NTK-by-parts with its attention temperature), LoRA on q/v;
* "linear+lora-all": linear interpolation, LoRA on all seven linears;
* "yarn+qlora": YaRN with QLoRA, the base's block linears in NF4 with double quantisation, LoRA q/v;
* optionally "linear+lora+emb-norms": LongLoRA's trainable embeddings and norms on top of q/v.

Beside them, the rows without fine-tuning: "base" (the table extended, no scaling), "linear-x4",
"ntk-x4", "yarn-x4". Each row is measured by perplexity of held-out stories at 128/256/512/1,024 tokens
(the same tokens at every length), passkey retrieval at 1,024 at five depths, and secret phrases at the
start, middle and end of a long prompt (all three measured by minillama.evaluation.longctx).

Output: DIR/results.json, DIR/results.csv and DIR/adapters/NAME/ (PEFT's layout plus rope_config.json,
the position settings that make transformers + PEFT compute the same logits). Fixed seeds and a fixed
number of threads: the adapters and results.csv come out byte for byte the same on the same machine
and torch; results.json differs only in its meta (date, wall time).

    python -m minillama.course.context_extension --out data/longctx      (or: minillama longctx --out data/longctx)

The defaults are the shipped sweep's settings (300 steps, 4 rows of 1,024 tokens, 2 jobs of 1 thread).
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import io
import json
import platform
import random
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timezone
from multiprocessing import get_context
from pathlib import Path
from typing import NamedTuple, Optional, Sequence

import torch

from ..checkpoints import load_model
from ..evaluation.evaluate import passkey_prompt_filler
from ..evaluation.longctx import passkey_grid, phrases_accuracy, ppl_by_context
from ..evaluation.passkey import passkey_training_text
from ..files import atomic_directory
from ..rope import scaling_from_spec
from ..tokenizer import load_tokenizer
from ..training import TrainConfig, save_run_adapter, train
from ..training.data import pack_documents, read_jsonl_texts
from .corpora import make_story
from .paths import corpora_dir, tiny_model_dir


class Variant(NamedTuple):
    rope: Optional[str] = None      # rope scaling type (factor: SweepConfig.factor), None: the trained angles
    targets: Optional[str] = None   # LoRA targets; None: no fine-tuning
    extras: bool = False            # embeddings and norms train too (LongLoRA)
    four_bit: bool = False          # QLoRA: the base's block linears in 4 bits (QLORA below)


QLORA = {"quant_type": "nf4", "double_quant": True}  # TrainConfig settings of the 4-bit variants
VARIANTS = {
    "base": Variant(),
    "linear-x4": Variant("linear"),
    "ntk-x4": Variant("ntk"),
    "yarn-x4": Variant("yarn"),
    "extend+lora": Variant(None, "wq,wv"),
    "linear+lora": Variant("linear", "wq,wv"),
    "yarn+lora": Variant("yarn", "wq,wv"),
    "linear+lora-all": Variant("linear", "all"),
    "yarn+qlora": Variant("yarn", "wq,wv", four_bit=True),
    "linear+lora+emb-norms": Variant("linear", "wq,wv", extras=True),
}
DEFAULT_VARIANTS = tuple(v for v in VARIANTS if v != "linear+lora+emb-norms")


@dataclass
class SweepConfig:
    factor: int = 4                 # 256 -> 1,024
    steps: int = 300                # optimizer steps per fine-tuned variant (150 left depth 0 at 0.1-0.5)
    batch_size: int = 4             # rows of `context` tokens per step
    lr: float = 3e-3
    rank: int = 8
    alpha: float = 16.0
    warmup_steps: int = 4
    passkey_share: float = 0.5      # share of the training rows that are passkey documents
    contexts: tuple = (128, 256, 512, 1024)
    ppl_docs: int = 4               # held-out stories, the first `context` tokens of each scored
    passkey_trials: int = 10        # per depth, at the longest context
    depths: tuple = (0.0, 0.25, 0.5, 0.75, 1.0)
    phrases_trials: int = 10
    seed: int = 0
    threads: int = 1                # torch threads per job: fixed, so the numbers come out the same every time


def long_training_docs(tok, n: int, context: int, seed: int, passkey_share: float = 0.5) -> list[list[int]]:
    """n token lists of at most context + 1 tokens ([BOS] text, cut), each filling (most of) a row:
    stories whose facts come back all along (cut to the row), and passkey documents exactly as long as the
    evaluation's prompts at `context`, with the key at a uniform random depth.

    Why passkeys as long as the test's: the key's distance to the question is then uniform over the whole
    window. With documents of half to all of the window (this sweep's first version) keys ~1,000 tokens
    away were rare, and every variant failed at depth 0 (the key right after the introduction): YaRN + LoRA
    q/v scored 0.1 there after 150 steps, 1.0 with these documents and 300 steps (data/longctx/README.md)."""
    rng = random.Random(seed)
    most = passkey_prompt_filler(tok, context, answer_tokens=12)
    docs = []
    for _ in range(n):
        if rng.random() < passkey_share:
            text = passkey_training_text(rng, most, round(rng.random(), 4))
        else:
            text = make_story(rng, target_words=context)  # about 1.2 tokens a word: longer than the row
        docs.append(tok.encode(text, bos=True, eos=True)[: context + 1])
    return docs


def eval_docs(tok, corpora, context: int, n: int) -> list[list[int]]:
    """The first n held-out stories longer than `context` tokens."""
    texts = read_jsonl_texts(Path(corpora) / "stories_val.jsonl")
    docs = [d for d in (tok.encode(t) for t in texts) if len(d) > context][:n]
    if len(docs) < n:
        raise ValueError(f"{corpora}/stories_val.jsonl has only {len(docs)} stories longer than {context} tokens; "
                         f"expected {n}.")
    return docs


def _scaling(kind: Optional[str], cfg: SweepConfig, window: int) -> Optional[dict]:
    return scaling_from_spec(f"{kind}:{cfg.factor}", window) if kind else None


def finetune(model, rows, cfg: SweepConfig, targets: str, extras: bool, work: Path, progress: bool,
             four_bit: bool = False) -> dict:
    """LoRA (QLoRA with four_bit) on `rows` with the sweep's budget; returns the first and last losses and the
    trainable count."""
    tc = TrainConfig(steps=cfg.steps, batch_size=cfg.batch_size, lr=cfg.lr, warmup_steps=cfg.warmup_steps,
                     min_lr_ratio=0.1, weight_decay=0.0, lora_r=cfg.rank, lora_alpha=cfg.alpha,
                     lora_targets=targets, train_embeddings=extras, train_norms=extras, eval_every=cfg.steps,
                     save_every=cfg.steps, seed=cfg.seed, load_in_4bit=four_bit, **(QLORA if four_bit else {}))
    log = train(model, rows, {}, tc, work, progress=progress)
    model.eval()
    return {"steps": cfg.steps, "first_loss": round(log[0]["loss"], 4), "final_loss": round(log[-1]["loss"], 4),
            "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad)}


def evaluate_variant(model, tok, docs, cfg: SweepConfig) -> dict:
    """ppl by context, passkey by depth and secret phrases at the longest context, rounded."""
    longest = max(cfg.contexts)
    ppl = ppl_by_context(model, docs, list(cfg.contexts), longest)
    grid = passkey_grid(model, tok, [longest], list(cfg.depths), cfg.passkey_trials, 1234 + cfg.seed)
    out = {"ppl": {str(c): round(float(ppl[c]), 4) for c in cfg.contexts},
           "passkey": {str(c): {str(float(d)): round(float(a), 4) for d, a in by_depth.items()}
                       for c, by_depth in grid.items()}}
    acc = phrases_accuracy(model, tok, longest, cfg.phrases_trials, 1234 + cfg.seed)
    out["phrases"] = {str(k): round(float(v), 4) for k, v in acc.items()}
    return out


def run_variant(name: str, model_path, tok, rows, docs, cfg: SweepConfig, out: Path, work: Path,
                progress: bool) -> dict:
    """Load the base with the variant's scaling and a 1,024 position table, fine-tune it if the variant says
    so (its adapter to out/adapters/NAME), and evaluate it."""
    kind, targets, extras, four_bit = VARIANTS[name]
    window = load_model(model_path).args.max_seq_len
    scaling = _scaling(kind, cfg, window)
    model = load_model(model_path, rope_scaling=scaling, max_seq_len=window * cfg.factor)
    row = {"rope_scaling": scaling, "targets": targets, "finetuned": targets is not None,
           "trains_embeddings_norms": extras,
           "base_4bit": f"{QLORA['quant_type']}, double quantisation" if four_bit else None}
    if targets is not None:
        row["train"] = finetune(model, rows, cfg, targets, extras, work / name, progress, four_bit)
        save_run_adapter(model, out / "adapters" / name)
    row.update(evaluate_variant(model, tok, docs, cfg))
    return row


CSV_HEAD = ("variant", "rope_scaling", "targets", "finetuned", "base_4bit")


def results_csv(results: dict) -> str:
    """One line per variant: its settings, ppl per context, passkey per depth at the longest context."""
    variants = results["variants"]
    first = next(iter(variants.values()))
    ppl_keys = list(first["ppl"])
    pk_keys = [(c, d) for c, by in first["passkey"].items() for d in by]
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(list(CSV_HEAD) + [f"ppl_{c}" for c in ppl_keys] + [f"passkey_{c}_depth_{d}" for c, d in pk_keys])
    for name, v in variants.items():
        rope = f"{v['rope_scaling']['rope_type']}:{v['rope_scaling']['factor']:g}" if v["rope_scaling"] else "none"
        w.writerow([name, rope, v["targets"] or "", v["finetuned"], v.get("base_4bit") or ""]
                   + [v["ppl"][c] for c in ppl_keys] + [v["passkey"][c][d] for c, d in pk_keys])
    return buf.getvalue()


def sweep_inputs(model_path: Path, corpora, cfg: SweepConfig):
    """(tokenizer, long context, packed training rows, held-out stories): the same for every variant."""
    tok = load_tokenizer(model_path)
    context = load_model(model_path).args.max_seq_len * cfg.factor
    rows = pack_documents(long_training_docs(tok, cfg.steps * cfg.batch_size, context, cfg.seed, cfg.passkey_share),
                          context, seed=cfg.seed)
    return tok, context, rows, eval_docs(tok, corpora, context, cfg.ppl_docs)


def _variant_job(name: str, model_path: Path, corpora, cfg: SweepConfig, out: Path, work: Path) -> dict:
    """One variant in a worker process (--jobs): its own inputs, cfg.threads torch threads."""
    torch.set_num_threads(cfg.threads)
    tok, _, rows, docs = sweep_inputs(model_path, corpora, cfg)
    return run_variant(name, model_path, tok, rows, docs, cfg, out, work, progress=False)


def tables(results: dict) -> str:
    """The curve table (ppl by context per variant) and the passkey matrix at the longest context, markdown."""
    variants = results["variants"]
    first = next(iter(variants.values()))
    ctx, longest = list(first["ppl"]), list(first["passkey"])[-1]
    depths = list(first["passkey"][longest])
    lines = ["| variant | rope scaling | LoRA targets | " + " | ".join(f"ppl @ {c}" for c in ctx) + " |",
             "| --- | --- | --- | " + " | ".join("---" for _ in ctx) + " |"]
    for name, v in variants.items():
        rope = f"{v['rope_scaling']['rope_type']} x{v['rope_scaling']['factor']:g}" if v["rope_scaling"] else "none"
        targets = v["targets"] or "(no fine-tuning)"
        if v.get("base_4bit"):
            targets += " (NF4 base)"
        lines.append(f"| {name} | {rope} | {targets} | "
                     + " | ".join(f"{v['ppl'][c]:.3f}" for c in ctx) + " |")
    lines += ["", f"Passkey accuracy at {longest} tokens, by depth of the key:", "",
              "| variant | " + " | ".join(f"depth {d}" for d in depths) + " |",
              "| --- | " + " | ".join("---" for _ in depths) + " |"]
    lines += [f"| {name} | " + " | ".join(f"{v['passkey'][longest][d]:.2f}" for d in depths) + " |"
              for name, v in variants.items()]
    return "\n".join(lines) + "\n"


def readme(results: dict) -> str:
    """data/longctx/README.md: the command, where and when it ran, the tables."""
    m = results["meta"]
    return (f"# Long-context sweep: the tiny model from {m['context'] // m['sweep']['factor']} to {m['context']} tokens\n\n"
            f"Made by `{m['command']}` (see `minillama/course/context_extension.py`) on {m['device']}, torch {m['torch']}, "
            f"{m['date']}: {m['wall_s']:.0f} s wall, {m['cpu_s']:.0f} CPU seconds. Every fine-tuned variant: "
            f"{m['steps']} steps of {m['sweep']['batch_size']} rows of {m['context']} tokens ({m['train_rows']} packed "
            f"rows of long stories and passkey documents), LoRA rank {m['sweep']['rank']}, lr {m['sweep']['lr']:g}. "
            f"Perplexity: {m['sweep']['ppl_docs']} held-out stories, their first {m['context']} tokens scored at every "
            f"context; passkey: {m['sweep']['passkey_trials']} trials per depth.\n\n"
            "Files: `results.json` (everything, with this meta), `results.csv`, `adapters/NAME/` (PEFT's layout; "
            "`rope_config.json` holds the position settings: `minillama` for `load_model(..., **settings)`, `hf_config` "
            "for the base model's config.json before `PeftModel.from_pretrained`). The same command on the same "
            "machine and torch writes the adapters and results.csv byte for byte (fixed seeds, fixed threads); "
            "results.json differs in its meta (date, times).\n\n" + tables(results))


def run_sweep(out, cfg: SweepConfig = SweepConfig(), variants: Sequence[str] = DEFAULT_VARIANTS, *,
              model_path=None, corpora=None, command: str = "", progress: bool = False, jobs: int = 1) -> dict:
    """The whole sweep into `out` (replaced in one rename when everything is done); returns results.json.

    jobs > 1 runs that many variants at once, in worker processes of cfg.threads threads each: the same
    numbers as jobs=1 (every variant is seeded on its own), sooner where there are cores to spare."""
    bad = [v for v in variants if v not in VARIANTS]
    if bad or not variants:
        raise ValueError(f"Variant {bad[0] if bad else None!r} is unknown: expected some of {list(VARIANTS)}.")
    t0, cpu0 = time.perf_counter(), _cpu_s()
    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    model_path, corpora = Path(model_path or tiny_model_dir()), Path(corpora or corpora_dir())
    tok, context, rows, docs = sweep_inputs(model_path, corpora, cfg)
    results = {"meta": {}, "variants": {}}
    try:
        with tempfile.TemporaryDirectory() as work, atomic_directory(out) as tmp:
            if jobs > 1:
                with ProcessPoolExecutor(jobs, mp_context=get_context("spawn")) as pool:
                    futures = {n: pool.submit(_variant_job, n, model_path, corpora, cfg, tmp, Path(work))
                               for n in variants}
                    results["variants"] = {n: f.result() for n, f in futures.items()}
            for name in variants if jobs <= 1 else ():
                results["variants"][name] = run_variant(name, model_path, tok, rows, docs, cfg, tmp, Path(work),
                                                        progress)
                if progress:
                    print(f"{name}: {json.dumps(results['variants'][name])}", flush=True)
            results["meta"] = _meta(cfg, model_path, context, rows, command, t0, cpu0, jobs)
            (tmp / "results.json").write_text(json.dumps(results, indent=2) + "\n")
            (tmp / "results.csv").write_text(results_csv(results))
            (tmp / "README.md").write_text(readme(results))
    finally:
        torch.set_num_threads(threads)
    return results


def _cpu_s() -> float:
    """CPU seconds of this process and its finished workers (what a machine shared with others still measures)."""
    import resource

    return sum(resource.getrusage(who).ru_utime + resource.getrusage(who).ru_stime
               for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))


def _meta(cfg: SweepConfig, model_path: Path, context: int, rows, command: str, t0: float, cpu0: float,
          jobs: int) -> dict:
    return {"device": f"{platform.machine()} CPU, {cfg.threads} torch threads x {jobs} job(s)", "torch": torch.__version__,
            "python": platform.python_version(), "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "wall_s": round(time.perf_counter() - t0, 1), "cpu_s": round(_cpu_s() - cpu0, 1), "jobs": jobs,
            "command": command,
            "model": "data/tiny (shipped)" if model_path.resolve() == tiny_model_dir().resolve() else str(model_path), "context": context, "steps": cfg.steps,
            "train_rows": int(rows[0].shape[0]), "sweep": dataclasses.asdict(cfg),
            "phrases": "evaluated"}


def add_arguments(p: argparse.ArgumentParser) -> None:
    d = SweepConfig()
    p.add_argument("--out", required=True, help="output directory (results.json, results.csv, adapters/)")
    p.add_argument("--model", default=None, help="the base (default: the shipped tiny model)")
    p.add_argument("--corpora", default=None, help="where stories_val.jsonl is (default: the shipped corpora)")
    p.add_argument("--variants", default=",".join(DEFAULT_VARIANTS), help=f"comma-separated, from {list(VARIANTS)}")
    for key in ("steps", "batch_size", "rank", "ppl_docs", "passkey_trials", "threads", "seed"):
        p.add_argument(f"--{key.replace('_', '-')}", type=int, default=getattr(d, key))
    p.add_argument("--jobs", type=int, default=2, help="variants at once, each in a process of --threads threads "
                   "(default 2: the shipped sweep, about 24 minutes on 2 cores)")
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--quiet", action="store_true")


def sweep_from_args(args) -> dict:
    """The sweep of parsed arguments (shared by `minillama longctx` and `python -m minillama.course.context_extension`)."""
    for key in ("steps", "batch_size", "rank", "ppl_docs", "passkey_trials", "threads", "jobs"):
        if getattr(args, key) <= 0:
            raise ValueError(f"--{key.replace('_', '-')} {getattr(args, key)} is invalid: expected a positive integer.")
    cfg = SweepConfig(steps=args.steps, batch_size=args.batch_size, rank=args.rank, lr=args.lr,
                      ppl_docs=args.ppl_docs, passkey_trials=args.passkey_trials, threads=args.threads, seed=args.seed)
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    command = getattr(args, "sweep_command", None) or "minillama " + " ".join(sys.argv[1:])
    res = run_sweep(args.out, cfg, variants, model_path=args.model, corpora=args.corpora, command=command,
                    progress=not args.quiet, jobs=args.jobs)
    print(results_csv(res), end="")
    print(f"wrote {args.out}/results.json, results.csv, adapters/ in {res['meta']['wall_s']} s")
    return res


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m minillama.course.context_extension", description=__doc__.split("\n")[0])
    add_arguments(p)
    args = p.parse_args(argv)
    args.sweep_command = "python -m minillama.course.context_extension " + " ".join(sys.argv[1:] if argv is None else argv)
    try:
        sweep_from_args(args)
    except (ValueError, FileNotFoundError, OSError) as e:
        print(f"longctx: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
