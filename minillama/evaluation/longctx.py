"""Long-context evaluation: the curves and grids that tell whether a model really uses a longer window.

- `ppl_by_context`: chunked perplexity (evaluate.perplexity) at several context lengths, the same tokens
  scored at each: the classic curve (falls with context if the model reads that far, explodes past a
  window it cannot handle).
- `passkey_grid`: passkey retrieval over context lengths x depths (evaluate.passkey_accuracy).
- `phrases_accuracy`: a secret phrase (two words) planted at the start, middle or end of a long filler
  prompt; the model is asked to repeat it. Accuracy per position ("lost in the middle" shows here).
- `kv_cache_profile`: bytes of the pre-allocated KV cache, measured and predicted by the memory model
  (measuring.memory.kv_cache_bytes), and decoding speed, against context length.
- Variants: `rope.scaling_from_spec` turns "base", "linear:4", "yarn:4", ... into a rope_scaling dict, and
  `check_scaling_agrees` refuses one that contradicts the checkpoint's own config.
"""

from __future__ import annotations

import random
import time
from pathlib import Path
from typing import Optional, Sequence

import torch

from ..generate import generate
from ..measuring.memory import MiB, kv_cache_bytes
from ..measuring.report import new_figure, save_figure, write_csv
from ..model import Transformer
from ..rope import scaling_from_spec, scaling_type
from ..training.run_state import ROPE_CONFIG
from .evaluate import check_fits, check_retrieval_fits, passkey_accuracy, perplexity
from .passkey import ANIMALS, COLOURS, PASSKEY_FILLER

POSITIONS = {"start": 0.0, "middle": 0.5, "end": 1.0}  # where the phrase sits, as a depth in the filler
PHRASE_INTRO = "There is a secret phrase hidden in this text. Find it and remember it."
PHRASE_LINE = "The secret phrase is {phrase}. Remember it. {phrase} is the secret phrase."
PHRASE_QUESTION = "What is the secret phrase? The secret phrase is"


# ---- perplexity and passkey over lengths ---------------------------------------------------------------
def ppl_by_context(model: Transformer, docs: Sequence[Sequence[int]], contexts: Sequence[int],
                   scored_tokens: int) -> dict[int, float]:
    """{context: perplexity} with evaluate.perplexity at each length, the same `scored_tokens` of every doc
    scored at each (so the numbers are comparable across lengths)."""
    return {int(c): perplexity(model, docs, int(c), scored_tokens=scored_tokens)["ppl"] for c in contexts}


def passkey_grid(model: Transformer, tokenizer, contexts: Sequence[int], depths: Sequence[float], trials: int,
                 seed: int) -> dict[int, dict[float, float]]:
    """{context: {depth: accuracy}}: evaluate.passkey_accuracy at each length with `trials` keys per depth."""
    if not isinstance(trials, int) or trials <= 0:
        raise ValueError(f"trials={trials!r} is invalid: expected a positive integer (keys per depth).")
    depths = [float(d) for d in depths]
    return {int(c): passkey_accuracy(model, tokenizer, int(c), trials * len(depths), seed, depths)["per_depth"]
            for c in contexts}


# ---- secret phrases --------------------------------------------------------------------------------------
def make_phrase(rng: random.Random) -> str:
    """A two-word phrase from the stories' vocabulary, e.g. "teal rabbit"."""
    return f"{rng.choice(COLOURS)} {rng.choice(ANIMALS)}"


def phrase_prompt(phrase: str, n_filler: int, position: str) -> str:
    """The passkey prompt's shape with a phrase: intro, filler with the phrase line at `position`
    (start: before all filler, middle, end: after all of it), then the question."""
    if position not in POSITIONS:
        raise ValueError(f"position {position!r} is unknown: expected one of {tuple(POSITIONS)}.")
    filler = [PASSKEY_FILLER[i % len(PASSKEY_FILLER)] for i in range(n_filler)]
    at = int(POSITIONS[position] * n_filler + 0.5)
    return " ".join([PHRASE_INTRO] + filler[:at] + [PHRASE_LINE.format(phrase=phrase)] + filler[at:]
                    + [PHRASE_QUESTION])


def phrase_training_text(rng: random.Random, n_filler: int, position: str) -> str:
    """A complete phrase document for training (as corpora.passkey_training_text): prompt + " " + phrase + "."
    The shipped tiny model never saw one, so it cannot repeat word phrases until trained on some."""
    phrase = make_phrase(rng)
    return phrase_prompt(phrase, n_filler, position) + " " + phrase + "."


def phrase_filler(tokenizer, context: int, answer_tokens: int = 8) -> int:
    """The largest number of filler sentences whose phrase prompt (plus the answer) fits in `context`."""
    def fits(n: int) -> bool:
        return len(tokenizer.encode(phrase_prompt("teal rabbit", n, "middle"), bos=True)) + answer_tokens <= context

    if not fits(1):
        raise ValueError(f"context={context} is too short for even one filler sentence of a phrase prompt.")
    lo, hi = 1, 2  # double hi until it no longer fits, then bisect
    while fits(hi):
        lo, hi = hi, 2 * hi
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


@torch.no_grad()
def phrases_accuracy(model: Transformer, tokenizer, context: int, trials: int, seed: int,
                     positions: Sequence[str] = ("start", "middle", "end"), batch_size: int = 25) -> dict[str, float]:
    """{position: share of trials where greedy decoding repeats the phrase}, `trials` phrases per position,
    each planted in filler that fills `context` tokens. Deterministic from `seed`."""
    if not isinstance(trials, int) or trials <= 0:
        raise ValueError(f"trials={trials!r} is invalid: expected a positive integer (phrases per position).")
    check_retrieval_fits(model, context, trials, batch_size, "phrases")
    n_filler = phrase_filler(tokenizer, context)
    rng = random.Random(seed)
    items = [(pos, make_phrase(rng)) for pos in positions for _ in range(trials)]
    prompts = [tokenizer.encode(phrase_prompt(p, n_filler, pos), bos=True) for pos, p in items]
    hits = []
    for i in range(0, len(items), batch_size):
        outs = generate(model, prompts[i:i + batch_size], max_new_tokens=8)
        hits += [tokenizer.decode(o).strip().startswith(p) for (_, p), o in zip(items[i:i + batch_size], outs)]
    return {pos: sum(h for (q, _), h in zip(items, hits) if q == pos) / trials for pos in positions}


# ---- KV cache: memory and decoding speed -----------------------------------------------------------------
def _cache_bytes(model: Transformer) -> int:
    return sum(t.numel() * t.element_size() for layer in model.layers
               for t in (layer.attention.cache.k, layer.attention.cache.v))


@torch.inference_mode()
def kv_cache_profile(model: Transformer, contexts: Sequence[int], batch: int, decode_tokens: int = 16) -> list[dict]:
    """For each context: the pre-allocated KV cache of batch x context positions (Transformer.setup_cache),
    its bytes measured (the buffers' sizes; on CUDA also the allocator's growth) and predicted
    (measuring.memory.kv_cache_bytes), and the decoding speed: `decode_tokens` single-token steps timed
    after a prefill that leaves them just enough room at the end of the window (the first step untimed)."""
    device, dtype = next(model.parameters()).device, model.tok_embeddings.weight.dtype
    rows = []
    for c in contexts:
        c = int(c)
        if not 1 < decode_tokens < c <= model.args.max_seq_len:
            raise ValueError(f"context={c}, decode_tokens={decode_tokens} are invalid: expected 1 < decode_tokens < "
                             f"context <= max_seq_len="
                             f"{model.args.max_seq_len}.")
        check_fits(model, batch, c - decode_tokens, f"KV cache at context {c}", mode="inference", kv_cache=c)
        before = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
        model.setup_cache(batch, c)
        try:
            allocated = torch.cuda.memory_allocated(device) - before if device.type == "cuda" else None
            row = {"context": c, "batch": batch, "dtype": str(dtype).replace("torch.", ""),
                   "measured_bytes": _cache_bytes(model), "allocator_bytes": allocated,
                   "predicted_bytes": kv_cache_bytes(model.args, batch=batch, length=c, param_dtype=dtype)}
            row.update(_decode_speed(model, batch, c, decode_tokens, device))
        finally:
            model.clear_cache()
        rows.append(row)
    return rows


def _decode_speed(model: Transformer, batch: int, context: int, steps: int, device) -> dict:
    """Prefill context - steps tokens, then time `steps` single-token forwards (greedy, from the cache)."""
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, model.args.vocab_size, (batch, context - steps), generator=g).to(device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    t0 = time.perf_counter()
    nxt = model(prompt, start_pos=0, last_only=True)[:, -1].argmax(-1, keepdim=True)
    nxt = model(nxt, start_pos=context - steps)[:, -1].argmax(-1, keepdim=True)  # one untimed warm-up step
    sync()
    t1 = time.perf_counter()
    for pos in range(context - steps + 1, context):
        nxt = model(nxt, start_pos=pos)[:, -1].argmax(-1, keepdim=True)
    sync()
    t2 = time.perf_counter()
    return {"prefill_s": t1 - t0, "decode_tokens_per_s": batch * (steps - 1) / (t2 - t1)}


# ---- variants: a scaling checked against the checkpoint -----------------------------------------------------
def _same_scaling(a: Optional[dict], b: Optional[dict]) -> bool:
    if not a or not b:
        return not a and not b
    keys = (set(a) | set(b)) - {"type", "rope_type", "original_max_position_embeddings"}
    return scaling_type(a) == scaling_type(b) and all(a.get(k) == b.get(k) for k in keys)


def check_scaling_agrees(checkpoint: str, own: Optional[dict], requested: Optional[dict]) -> None:
    """Refuse a requested rope_scaling that contradicts the one in the checkpoint's own config: stacking two
    scalings is not what either means, and silently replacing the trained one would evaluate another model.
    (No request, or the same scaling, is fine: the checkpoint's own scaling is used.)"""
    if requested is not None and own and not _same_scaling(own, requested):
        raise ValueError(f"{checkpoint}: its config already has rope_scaling {own}, which contradicts the requested "
                         f"{requested}; the checkpoint's own scaling wins only when nothing else is asked: "
                         f"evaluate it as 'base', or load a checkpoint without rope_scaling.")


# ---- loading the variants -------------------------------------------------------------------------------
def adapter_rope_config(adapter_dir) -> dict:
    """{"rope_scaling": dict | None, "max_seq_len": int | None} an adapter was trained with, from its
    rope_config.json (the "minillama" part); both None when the file is absent (plain LoRA adapter)."""
    from ..files import read_json

    path = Path(adapter_dir) / ROPE_CONFIG
    if not Path(adapter_dir).is_dir():
        raise FileNotFoundError(f"--adapter {adapter_dir}: the directory does not exist.")
    own = read_json(path).get("minillama", {}) if path.exists() else {}
    return {"rope_scaling": own.get("rope_scaling"), "max_seq_len": own.get("max_seq_len")}


def load_variants(model_path, specs: Sequence[str], adapters: Sequence[str], max_seq_len: int, device="cpu"):
    """Yield (name, model, trained window) for each variant spec ("base", "linear:4", ...), then each adapter directory, all
    with a position table of at least `max_seq_len`. Every spec is checked (rope.scaling_from_spec, and against
    the checkpoint's own config: check_scaling_agrees) before anything is evaluated. The spec variants share one
    loaded model: RoPE angles are computed from model.args at every forward, so a variant is only a config
    change. Each adapter gets a fresh copy of the base (an adapter may replace embeddings / norms)."""
    from ..checkpoints import load_model
    from ..lora import load_adapter

    model = load_model(model_path, device=device)
    trained = model.args
    plans = [(spec.strip().lower(), scaling_from_spec(spec, trained.max_seq_len, flag="variant")) for spec in specs]
    configs = [(Path(a).name, adapter_rope_config(a), a) for a in adapters]
    for _, scaling in plans:
        check_scaling_agrees(str(model_path), trained.rope_scaling, scaling)
    for _, cfg, _ in configs:
        check_scaling_agrees(str(model_path), trained.rope_scaling, cfg["rope_scaling"])
    for name, scaling in plans:
        model.args = trained.replace(rope_scaling=scaling or trained.rope_scaling,
                                     max_seq_len=max(trained.max_seq_len, max_seq_len))
        yield name, model, trained.max_seq_len
    for name, cfg, adapter in configs:
        length = max(trained.max_seq_len, max_seq_len, cfg["max_seq_len"] or 0)
        model = load_model(model_path, device=device, rope_scaling=cfg["rope_scaling"], max_seq_len=length)
        load_adapter(model, adapter)
        model.eval()
        yield name, model, trained.max_seq_len


# ---- figures and files (in measuring.report's one style) -------------------------------------------------
def plot_ppl(ppl: dict[str, dict[int, float]], path, trained: Optional[int] = None, title: str = "") -> Path:
    """Perplexity against context length, one line per variant ({variant: {context: ppl}}), log scales."""
    from matplotlib.ticker import FormatStrFormatter

    fig = new_figure(9, 5)
    ax = fig.add_subplot()
    every = sorted({int(c) for curve in ppl.values() for c in curve})
    for name, curve in ppl.items():
        xs = sorted(int(c) for c in curve)
        ax.plot(xs, [curve[c] if c in curve else curve[str(c)] for c in xs], marker="o", label=name)
    if trained:
        ax.axvline(trained, color="grey", linestyle="--", linewidth=1, label=f"trained window ({trained})")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks(every, [str(c) for c in every])
    ax.yaxis.set_major_formatter(FormatStrFormatter("%g"))
    ax.yaxis.set_minor_formatter(FormatStrFormatter("%g"))
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("perplexity (log scale)")
    ax.set_title(title or "perplexity against context length")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    return save_figure(fig, path)


def plot_passkey(grids: dict[str, dict[int, dict[float, float]]], path, title: str = "") -> Path:
    """One heat map per variant ({variant: {context: {depth: accuracy}}}): context x depth -> accuracy."""
    n = len(grids)
    cols = min(n, 4)
    rows = -(-n // cols)
    fig = new_figure(3.0 * cols + 0.8, 2.6 * rows + 0.4)
    axes = fig.subplots(rows, cols, squeeze=False)
    for ax, (name, grid) in zip(axes.flat, grids.items()):
        contexts = sorted(grid, key=int)
        depths = sorted(grid[contexts[0]], key=float)
        acc = [[float(grid[c][d]) for d in depths] for c in contexts]
        im = ax.imshow(acc, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto", origin="lower")
        for i, row in enumerate(acc):
            for j, a in enumerate(row):
                ax.text(j, i, f"{a:.2f}", ha="center", va="center", fontsize=8)
        ax.set_xticks(range(len(depths)), [f"{float(d):g}" for d in depths])
        ax.set_yticks(range(len(contexts)), [str(c) for c in contexts])
        ax.set_xlabel("depth of the key")
        ax.set_ylabel("context")
        ax.set_title(name, fontsize=10)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    fig.colorbar(im, ax=axes, shrink=0.8, label="accuracy")
    if title:
        fig.suptitle(title)
    return save_figure(fig, path)


def plot_kv_cache(rows: list[dict], path, title: str = "") -> Path:
    """KV-cache MiB (measured and predicted) and decoding tokens/s against context length."""
    fig = new_figure(11, 4)
    mem, speed = fig.subplots(1, 2)
    xs = [r["context"] for r in rows]
    mem.plot(xs, [r["measured_bytes"] / MiB for r in rows], marker="o", label="measured (cache buffers)")
    mem.plot(xs, [r["predicted_bytes"] / MiB for r in rows], linestyle="--", marker="x",
             label="predicted (kv_cache_bytes)")
    mem.set_xlabel("context length (tokens)")
    mem.set_ylabel("KV cache (MiB = 1024**2 bytes)")
    mem.legend(fontsize=8)
    speed.plot(xs, [r["decode_tokens_per_s"] for r in rows], marker="o")
    speed.set_xlabel("context length (tokens)")
    speed.set_ylabel("decoding tokens/s")
    for ax in (mem, speed):
        ax.grid(True, alpha=0.3)
    fig.suptitle(title or "KV cache against context length")
    return save_figure(fig, path)


def write_rows(rows: list[dict], out_dir, meta: dict) -> dict[str, Path]:
    """results.json ({"meta", "rows"}) and results.csv (one line per row, nested dicts flattened) in out_dir."""
    import json

    from ..files import atomic_write_text

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "results.json", "csv": out / "results.csv"}
    atomic_write_text(paths["json"], json.dumps({"meta": meta, "rows": rows}, indent=2, default=str) + "\n")
    write_csv(rows, paths["csv"])
    return paths
