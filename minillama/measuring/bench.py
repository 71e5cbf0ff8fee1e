"""`minillama bench`: a named grid of configurations, measured side by side in one process.

Each row is one configuration (a dict of grid dimensions: mode, batch, seq_len, and the techniques
later notebooks add). For each row a fresh model is built, one step is measured with
`minillama.measuring.measure.measure` (peak bytes by category, step time, FLOPs) and predicted with
`minillama.measuring.memory.estimate_memory`. The results are written as results.json, results.csv, table.md,
memory.png (stacked bars by category), runtime.png and flops.png.

Techniques register themselves as grid dimensions with `register_dimension`, so a grid can span
e.g. {full, LoRA} x {fp32, bf16} without a second copy of this code.
"""

from __future__ import annotations

import csv
import io
import itertools
import json
import os
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from ..config import dtype_name, parse_dtype
from ..files import atomic_write_bytes, atomic_write_text
from .measure import CATEGORIES, Measurement, measure
from .memory import estimate_memory

MiB = 1024**2


@dataclass
class Dimension:
    """A grid dimension: its values, and how a value changes the run (model, optimizer, estimator kwargs)."""
    name: str
    values: tuple
    apply: Optional[Callable[[Any, dict], None]] = None  # apply(value, ctx) may edit ctx["model"], ctx["estimate"]...


DIMENSIONS: dict[str, Dimension] = {}


def register_dimension(name: str, values, apply: Optional[Callable[[Any, dict], None]] = None) -> None:
    """Make `name` usable in grids (values: the default sweep). Later techniques call this."""
    DIMENSIONS[name] = Dimension(name, tuple(values), apply)


register_dimension("mode", ("train", "inference"))
register_dimension("batch", (1, 2, 4, 8))
register_dimension("seq_len", (64, 128, 256))


QUANT_SETTINGS = {"none": None, "nf4": ("nf4", False), "nf4+dq": ("nf4", True), "fp4": ("fp4", False)}


def _apply_quant(value, ctx):
    """quant=none|nf4|nf4+dq|fp4: the blocks' linears in 4 bits (minillama.quant.quantize_model, blocksize 64,
    applied before LoRA); the base is then frozen, so a 4-bit training row needs lora too."""
    if value not in QUANT_SETTINGS:
        raise ValueError(f"quant={value!r} is invalid: expected one of {tuple(QUANT_SETTINGS)}.")
    if QUANT_SETTINGS[value] is None:
        return
    from ..quant import quantize_model

    quant_type, double_quant = QUANT_SETTINGS[value]
    quantize_model(ctx["model"], quant_type=quant_type, double_quant=double_quant, blocksize=64)
    ctx["estimate"]["quant4"] = {"quant_type": quant_type, "double_quant": double_quant, "blocksize": 64}


def _apply_optimizer(name, ctx):
    """optimizer=adamw|adamw8bit|paged_adamw8bit|sgd (minillama.training.train.make_optimizer)."""
    ctx["optimizer"] = name
    ctx["estimate"]["optimizer"] = name


register_dimension("quant", tuple(QUANT_SETTINGS), _apply_quant)  # before lora: LoRA wraps the 4-bit base


def _apply_lora(r, ctx):
    """lora=0: full fine-tuning; lora=r: LoRA of rank r (alpha 2r) on wq and wv, everything else frozen."""
    if r:
        from ..lora import apply_lora

        apply_lora(ctx["model"], r=r, alpha=2 * r, targets=("wq", "wv"))
        ctx["estimate"]["lora"] = {"r": r, "targets": ("wq", "wv")}


register_dimension("lora", (0, 8), _apply_lora)


def _apply_amp(mode, ctx):
    """amp=off|fp16|bf16: the forward under autocast (fp16 with a GradScaler), fp32 master weights."""
    ctx["amp"] = mode
    if mode != "off":
        ctx["estimate"]["amp"] = mode


def _apply_accum(k, ctx):
    """accum=k: the config's batch (the effective batch) is split into k micro-batches of batch/k rows."""
    if ctx["config"]["batch"] % k:
        raise ValueError(f"accum={k} does not divide batch={ctx['config']['batch']} (the effective batch).")
    ctx["accum"] = k
    ctx["estimate"]["grad_accum"] = k


def _apply_checkpointing(every, ctx):
    """checkpointing=k: every k-th block recomputes its activations in the backward pass (0: off)."""
    ctx["model"].set_checkpointing(every)
    if every:
        if every != 1:
            raise ValueError("The memory estimate models checkpointing of every block only (checkpointing=1).")
        ctx["estimate"]["checkpointing"] = True


register_dimension("optimizer", ("adamw", "paged_adamw8bit"), _apply_optimizer)
register_dimension("amp", ("off", "fp16", "bf16"), _apply_amp)
register_dimension("accum", (1, 4), _apply_accum)
register_dimension("checkpointing", (0, 1), _apply_checkpointing)

# A grid: a base config and the dimensions to sweep (the product of their values).
GRIDS: dict[str, dict] = {
    "default": {"base": {"batch": 4, "seq_len": 256}, "sweep": {"mode": ("train", "inference")},
                "extra": [{"mode": "train", "batch": b, "seq_len": 256} for b in (1, 8)]
                + [{"mode": "train", "batch": 4, "seq_len": s} for s in (64, 128)]},
    "batch": {"base": {"mode": "train", "seq_len": 256}, "sweep": {"batch": (1, 2, 4, 8)}},
    "seq": {"base": {"mode": "train", "batch": 4}, "sweep": {"seq_len": (64, 128, 256)}},
    "mode": {"base": {"batch": 4, "seq_len": 256}, "sweep": {"mode": ("train", "inference")}},
    "lora": {"base": {"mode": "train", "batch": 4, "seq_len": 256}, "sweep": {"lora": (0, 8, 64)}},
    # The fine-tuning lab: {full, LoRA r=16 on wq, wv} x {fp32, fp16-AMP, bf16-AMP} x {accumulation off/on}
    # x {checkpointing off/on}, at one effective batch (accum=4 splits it into 4 micro-batches).
    "techniques": {"base": {"mode": "train", "batch": 8, "seq_len": 128},
                   "sweep": {"lora": (0, 16), "amp": ("off", "fp16", "bf16"), "accum": (1, 4),
                             "checkpointing": (0, 1)}},
    # QLoRA: LoRA r=16 (wq, wv) on a 4-bit base, {none, NF4, NF4 + double quantisation, FP4}, paged 8-bit AdamW;
    # plus plain LoRA with torch's AdamW, the usual baseline.
    "qlora": {"base": {"mode": "train", "batch": 8, "seq_len": 128, "lora": 16, "optimizer": "paged_adamw8bit"},
              "sweep": {"quant": tuple(QUANT_SETTINGS)},
              "extra": [{"mode": "train", "batch": 8, "seq_len": 128, "lora": 16, "optimizer": "adamw",
                         "quant": "none"}]},
}


def grid_configs(name: str) -> list[dict]:
    """The configurations of a named grid, in order."""
    if name not in GRIDS:
        raise ValueError(f"Unknown grid {name!r}: expected one of {sorted(GRIDS)}.")
    g = GRIDS[name]
    for dim in g["sweep"]:
        if dim not in DIMENSIONS:
            raise ValueError(f"Grid {name!r} sweeps {dim!r}, which no technique has registered.")
    keys = list(g["sweep"])
    configs = [{**g["base"], **dict(zip(keys, vals))} for vals in itertools.product(*g["sweep"].values())]
    for extra in g.get("extra", []):
        if extra not in configs:
            configs.append(dict(extra))
    return configs


def config_name(cfg: dict) -> str:
    """'mode=train batch=4 seq_len=256 ...': keys in the order their dimensions were registered."""
    keys = [k for k in DIMENSIONS if k in cfg] + [k for k in cfg if k not in DIMENSIONS]
    return " ".join(f"{k}={cfg[k]}" for k in keys)


def run_config(make_model: Callable[[], torch.nn.Module], cfg: dict, *, preset: str, warmup: int = 1,
               repeats: int = 3, seed: int = 0) -> dict:
    """Build a fresh model, apply the config, measure one step and predict it. Returns a flat row."""
    from ..training.train import TrainConfig, make_optimizer, train_step

    model = make_model()
    args = model.args
    ctx = {"model": model, "estimate": {}, "config": cfg, "amp": "off", "accum": 1, "optimizer": "adamw"}
    for key in cfg:
        if key not in DIMENSIONS:
            raise ValueError(f"Config key {key!r} is not a registered grid dimension: {sorted(DIMENSIONS)}.")
    for key, dim in DIMENSIONS.items():  # in registration order: quant before lora, whatever the config's order
        if key in cfg and dim.apply is not None:
            dim.apply(cfg[key], ctx)
    model = ctx["model"]
    device = next(model.parameters()).device
    batch, seq_len, mode = cfg["batch"], cfg["seq_len"], cfg.get("mode", "train")
    if seq_len > args.max_seq_len:
        raise ValueError(f"seq_len={seq_len} is longer than the model's max_seq_len={args.max_seq_len}.")
    gen = torch.Generator().manual_seed(seed)
    x = torch.randint(0, args.vocab_size, (batch, seq_len + 1), generator=gen).to(device)
    inputs, targets = x[:, :-1], x[:, 1:]
    optimizer = None
    if mode == "train":
        model.train()
        # The trainer's own step (train.train_step): autocast, GradScaler, accumulation, clipping, AdamW.
        tcfg = TrainConfig(amp=ctx["amp"], grad_accum=ctx["accum"], optimizer=ctx["optimizer"])
        optimizer = make_optimizer(model, tcfg)
        scaler = torch.amp.GradScaler(device.type, enabled=ctx["amp"] == "fp16")
        micro = list(zip(inputs.chunk(ctx["accum"]), targets.chunk(ctx["accum"])))

        def step():
            return train_step(model, optimizer, scaler, micro, tcfg, ctx["amp"])

        if scaler.is_enabled():
            # fp16: the GradScaler starts at 2**16 and skips the first steps (their gradients overflow);
            # a skipped step never creates the optimizer state. Measure the steady state instead.
            for _ in range(30):
                if not step()["skipped"]:
                    break
    else:
        model.eval()

        @torch.no_grad()
        def step():
            model(inputs)
    dtype = next(model.parameters()).dtype
    meta = {"preset": preset, "mode": mode, "batch": batch, "seq_len": seq_len, **cfg}
    m: Measurement = measure(step, model=model, optimizer=optimizer, tokens_per_step=batch * seq_len,
                             name=config_name(cfg), warmup=warmup, repeats=repeats, meta=meta)
    est = estimate_memory(args, batch=batch // ctx["accum"], seq_len=seq_len, mode=mode, device=device.type,
                          param_dtype=dtype_name(dtype),
                          **ctx["estimate"])
    row = m.to_row()
    row["predicted_peak_memory_bytes"] = est.peak_bytes
    row["predicted_by_category"] = est.at_peak  # what the model says is live at the peak, like the measurement
    row["prediction_error"] = est.peak_bytes / m.peak_memory_bytes - 1
    return row


def run_grid(make_model: Callable[[], torch.nn.Module], grid: str, *, preset: str, out_dir=None,
             warmup: int = 1, repeats: int = 3, progress: bool = True) -> list[dict]:
    """Run every configuration of a grid in this process; a row that runs out of memory is recorded as such."""
    rows, configs = [], grid_configs(grid)
    if progress:
        print(f"grid {grid!r}: {len(configs)} rows, each printed as it is measured (MiB = 1024**2 bytes)", flush=True)
    for i, cfg in enumerate(configs, 1):
        try:
            row = run_config(make_model, cfg, preset=preset, warmup=warmup, repeats=repeats)
        except torch.OutOfMemoryError as e:
            row = {"name": config_name(cfg), **cfg, "error": f"out of memory: {str(e).splitlines()[0]}"}
        finally:
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        rows.append(row)
        if progress:
            print(f"row {i}/{len(configs)}: {row_line(row)}", flush=True)
    if out_dir is not None:
        write_results(rows, out_dir)
    return rows


def row_line(row: dict) -> str:
    """One measured row on one line, each value after its column's name (the table's columns, empty ones left out)."""
    cells = [(h, f(row)) for h, f in COLUMNS]
    return cells[0][1] + ": " + ", ".join(f"{h} {v}" for h, v in cells[1:] if v)


# ---- tables and plots --------------------------------------------------------------------------
def _mib(n) -> str:
    return "" if n is None else f"{n / MiB:.2f}"


COLUMNS = [  # (header, function of a row)
    ("configuration", lambda r: r["name"]),
    ("peak MiB", lambda r: _mib(r.get("peak_memory_bytes"))),
    ("predicted MiB", lambda r: _mib(r.get("predicted_peak_memory_bytes"))),
    ("error", lambda r: f"{100 * r['prediction_error']:+.1f}%" if "prediction_error" in r else ""),
    *[(f"{c} MiB", (lambda c: lambda r: _mib(r.get("memory_by_category", {}).get(c)))(c)) for c in CATEGORIES],
    ("step ms", lambda r: f"{1000 * r['step_time_s']:.1f}" if "step_time_s" in r else ""),
    ("tokens/s", lambda r: f"{r['tokens_per_s']:.0f}" if "tokens_per_s" in r else ""),
    ("GFLOP/step", lambda r: f"{r['flops_per_step'] / 1e9:.2f}" if "flops_per_step" in r else ""),
    ("MFU", lambda r: (f"{100 * r['mfu']:.1f}%" if r.get("mfu") is not None else "unknown") if "step_time_s" in r
     else r.get("error", "")),
]


def describe(rows: list[dict]) -> str:
    """Where the table was measured: device, dtype, torch, preset (from the first measured row)."""
    r = next((r for r in rows if "device_name" in r), rows[0] if rows else {})
    return (f"device: {r.get('device_name', '?')} | dtype: {r.get('dtype', '?')} | torch {r.get('torch', '?')} | "
            f"preset: {r.get('preset', '?')} | MiB = 1024**2 bytes")


def format_table(rows: list[dict], fmt: str = "md", header: bool = True) -> str:
    """The rows as a markdown, plain-text or HTML table (with the measurement context above it)."""
    heads = [h for h, _ in COLUMNS]
    cells = [[f(r) for _, f in COLUMNS] for r in rows]
    if fmt == "html":
        th = "".join(f"<th>{h}</th>" for h in heads)
        trs = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in cells)
        return f"<p>{describe(rows)}</p><table><tr>{th}</tr>{trs}</table>"
    if fmt == "md":
        lines = ["| " + " | ".join(heads) + " |", "|" + "---|" * len(heads)]
        lines += ["| " + " | ".join(row) + " |" for row in cells]
        return (describe(rows) + "\n\n" if header else "") + "\n".join(lines)
    if fmt == "text":
        widths = [max(len(h), *(len(row[i]) for row in cells)) for i, h in enumerate(heads)]
        line = lambda vals: "  ".join(v.rjust(w) if i else v.ljust(w) for i, (v, w) in enumerate(zip(vals, widths)))  # noqa: E731
        body = [line(row) for row in cells]
        return "\n".join(([describe(rows), line(heads)] if header else []) + body)
    raise ValueError(f"Table format {fmt!r} is unknown: expected 'md', 'text' or 'html'.")


def _save_figure(fig, path) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, dpi=120, format=Path(path).suffix.lstrip(".") or "png")
    atomic_write_bytes(path, buf.getvalue())


def plot_memory(rows: list[dict], path) -> None:
    """Stacked bars of peak memory by category per configuration, with the prediction as a marker."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in rows if "memory_by_category" in r]
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(rows)), 4.5))
    bottom = [0.0] * len(rows)
    for cat in CATEGORIES:
        vals = [r["memory_by_category"][cat] / MiB for r in rows]
        ax.bar(range(len(rows)), vals, bottom=bottom, label=cat)
        bottom = [b + v for b, v in zip(bottom, vals)]
    ax.scatter(range(len(rows)), [r["predicted_peak_memory_bytes"] / MiB for r in rows], color="black",
               marker="_", s=400, label="predicted peak", zorder=3)
    ax.set_xticks(range(len(rows)), [r["name"].replace(" ", "\n") for r in rows], fontsize=7)
    ax.set_ylabel("peak memory (MiB = 1024**2 bytes)")
    ax.set_title(describe(rows), fontsize=7)
    ax.legend(fontsize=7)
    fig.tight_layout()
    _save_figure(fig, path)
    plt.close(fig)


def plot_bars(rows: list[dict], key: str, scale: float, ylabel: str, path) -> None:
    """One bar per configuration of rows[i][key] * scale (runtime, FLOPs)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in rows if key in r]
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(rows)), 4))
    ax.bar(range(len(rows)), [scale * r[key] for r in rows])
    ax.set_xticks(range(len(rows)), [r["name"].replace(" ", "\n") for r in rows], fontsize=7)
    ax.set_ylabel(ylabel)
    ax.set_title(describe(rows), fontsize=7)
    fig.tight_layout()
    _save_figure(fig, path)
    plt.close(fig)


# ---- what each technique does, derived from the measured rows -----------------------------------------
# technique: (grid dimension, value when off, value when on)
TECHNIQUES = {"LoRA": ("lora", 0, None), "4-bit base": ("quant", "none", None), "fp16 AMP": ("amp", "off", "fp16"), "bf16 AMP": ("amp", "off", "bf16"),
              "gradient accumulation": ("accum", 1, None), "gradient checkpointing": ("checkpointing", 0, None)}
EFFECT_KEYS = [("parameters", lambda r: r["memory_by_category"]["parameters"]),
               ("gradients", lambda r: r["memory_by_category"]["gradients"]),
               ("optimizer state", lambda r: r["memory_by_category"]["optimizer_state"]),
               ("activations", lambda r: r["memory_by_category"]["activations"]),
               ("peak memory", lambda r: r["peak_memory_bytes"]),
               ("FLOPs per step", lambda r: r["flops_per_step"]),
               ("step time", lambda r: r["step_time_s"])]


def technique_effects(rows: list[dict], tolerance: float = 0.03) -> list[dict]:
    """For each technique, the median ratio on/off of every quantity over all pairs of measured rows that
    differ in that technique only, and a word for it ("reduces" / "raises" / "same", within tolerance).

    Returns [{"technique", "pairs", "<quantity>": {"ratio", "effect"}}] for the techniques the rows vary.
    """
    rows = [r for r in rows if "memory_by_category" in r]
    out = []
    for tech, (dim, off, on) in TECHNIQUES.items():
        pairs = []
        for r in rows:
            if dim not in r or r[dim] == off or (on is not None and r[dim] != on):
                continue
            rest = {k: v for k, v in r.items() if k in DIMENSIONS and k != dim}
            for b in rows:
                if b.get(dim) == off and all(b.get(k) == v for k, v in rest.items()):
                    pairs.append((b, r))
        if not pairs:
            continue
        entry = {"technique": tech, "pairs": len(pairs)}
        for key, get in EFFECT_KEYS:
            ratio = statistics.median(get(a) / get(b) if get(b) else (1.0 if get(a) == 0 else float("inf"))
                                      for b, a in pairs)
            effect = "same" if abs(ratio - 1) <= tolerance else ("reduces" if ratio < 1 else "raises")
            entry[key] = {"ratio": ratio, "effect": effect}
        out.append(entry)
    return out


def format_effects(effects: list[dict]) -> str:
    """The qualitative table (markdown): each cell the effect and the median measured ratio on/off."""
    heads = ["technique", "pairs"] + [k for k, _ in EFFECT_KEYS]
    lines = ["| " + " | ".join(heads) + " |", "|" + "---|" * len(heads)]
    for e in effects:
        cells = [e["technique"], str(e["pairs"])] + [
            f"{e[k]['effect']} (from 0)" if e[k]["ratio"] == float("inf") else f"{e[k]['effect']} (x{e[k]['ratio']:.2f})"
            for k, _ in EFFECT_KEYS]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_results(rows: list[dict], out_dir) -> dict[str, Path]:
    """results.json, results.csv, table.md, memory.png, runtime.png, flops.png in out_dir."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {k: out / v for k, v in (("json", "results.json"), ("csv", "results.csv"), ("md", "table.md"),
                                       ("memory", "memory.png"), ("runtime", "runtime.png"),
                                       ("flops", "flops.png"))}
    atomic_write_text(paths["json"], json.dumps(rows, indent=2, default=str))
    flat = []
    for r in rows:  # CSV: one column per category
        r = dict(r)
        for key in ("memory_by_category", "predicted_by_category"):
            for cat, v in (r.pop(key, None) or {}).items():
                r[f"{key.split('_')[0]}_{cat}_bytes"] = v
        flat.append(r)
    fields = list(dict.fromkeys(k for r in flat for k in r))
    buf = io.StringIO(newline="")
    w = csv.DictWriter(buf, fieldnames=fields)
    w.writeheader()
    w.writerows(flat)
    atomic_write_text(paths["csv"], buf.getvalue())
    effects = technique_effects(rows)
    text = format_table(rows, "md") + "\n"
    if effects:
        text += ("\nWhat each technique does (median ratio technique-on / technique-off over the pairs of rows "
                 "that differ only in it; 'same' within 3%):\n\n" + format_effects(effects) + "\n")
    atomic_write_text(paths["md"], text)
    if any("memory_by_category" in r for r in rows):
        plot_memory(rows, paths["memory"])
        plot_bars(rows, "step_time_s", 1000, "step time (ms)", paths["runtime"])
        plot_bars(rows, "flops_per_step", 1e-9, "GFLOP per step", paths["flops"])
    return paths


def model_factory(preset: str, *, model_path=None, random_weights: bool = False, device="cpu", dtype=None):
    """A function that builds a fresh model per row: the shipped/loaded weights, or random ones."""
    from .. import create_model, get_preset, load_model

    dtype = parse_dtype(dtype)
    if random_weights or model_path is None:
        return lambda: create_model(get_preset(preset), device=device, dtype=dtype, seed=0)
    if not os.path.exists(model_path):
        raise FileNotFoundError(f"Model path {model_path} does not exist (use --random-weights for a random {preset}).")
    return lambda: load_model(model_path, device=device, dtype=dtype)
