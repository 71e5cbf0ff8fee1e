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
from ..kernels import enable_kernels
from .measure import CATEGORIES, Measurement, measure, model_flops_per_token
from .memory import effective_amp, estimate_memory

MiB = 1024**2


@dataclass
class Dimension:
    """A grid dimension: its values, and how a value changes the run (model, optimizer, estimator kwargs)."""
    name: str
    values: tuple
    apply: Optional[Callable[[Any, dict], None]] = None  # apply(value, ctx) may edit ctx["model"], ctx["estimate"]...


DIMENSIONS: dict[str, Dimension] = {}


def register_dimension(name: str, values, apply: Optional[Callable[[Any, dict], None]] = None) -> None:
    """Make `name` usable in grids (values: the default sweep). Later techniques call this. apply(value, ctx)
    edits ctx["model"] and sets the estimate's arguments in ctx["estimate"]; to be usable by predict_config (the
    notebooks' choice of the rows that fit a card) it leaves the model alone when ctx["model"] is None."""
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
    if ctx["model"] is not None:  # None: predict_config, the estimate only
        quantize_model(ctx["model"], quant_type=quant_type, double_quant=double_quant, blocksize=64)
    ctx["estimate"]["quant4"] = {"quant_type": quant_type, "double_quant": double_quant, "blocksize": 64}


def _apply_optimizer(name, ctx):
    """optimizer=adamw|adamw8bit|paged_adamw8bit|sgd (minillama.training.make_optimizer)."""
    ctx["optimizer"] = name
    ctx["estimate"]["optimizer"] = name


register_dimension("quant", tuple(QUANT_SETTINGS), _apply_quant)  # before lora: LoRA wraps the 4-bit base


def _apply_lora_targets(targets, ctx):
    """lora_targets="wq,wv" (default) or "all" (the seven linears of every block): where lora=r puts adapters."""
    from ..lora import normalise_targets

    if isinstance(targets, str) and targets != "all":
        targets = targets.split(",")
    ctx["lora_targets"] = normalise_targets(targets)


def _apply_lora(r, ctx):
    """lora=0: full fine-tuning; lora=r: LoRA of rank r (alpha 2r) on wq and wv (or lora_targets), everything
    else frozen."""
    if r:
        from ..lora import apply_lora

        targets = ctx.get("lora_targets", ("wq", "wv"))
        if ctx["model"] is not None:
            apply_lora(ctx["model"], r=r, alpha=2 * r, targets=targets)
        ctx["estimate"]["lora"] = {"r": r, "targets": targets}


register_dimension("lora_targets", ("wq,wv", "all"), _apply_lora_targets)  # before lora, which reads it
register_dimension("lora", (0, 8), _apply_lora)


def _apply_amp(mode, ctx):
    """amp=off|fp16|bf16: the forward under autocast (fp16 with a GradScaler) over the model's weights: fp32 master
    weights, or 16-bit ones (`--dtype bf16`), which autocast leaves as they are (memory.effective_amp)."""
    ctx["amp"] = mode
    amp = effective_amp(mode, ctx["param_dtype"])
    if amp:
        ctx["estimate"]["amp"] = amp


def _apply_accum(k, ctx):
    """accum=k: the config's batch (the effective batch) is split into k micro-batches of batch/k rows."""
    if ctx["config"]["batch"] % k:
        raise ValueError(f"accum={k} does not divide batch={ctx['config']['batch']} (the effective batch).")
    ctx["accum"] = k
    ctx["estimate"]["grad_accum"] = k


def _apply_checkpointing(every, ctx):
    """checkpointing=k: every k-th block recomputes its activations in the backward pass (0: off)."""
    if ctx["model"] is not None:
        ctx["model"].set_checkpointing(every)
    if every:
        if every != 1:
            raise ValueError("The memory estimate models checkpointing of every block only (checkpointing=1).")
        ctx["estimate"]["checkpointing"] = True


register_dimension("optimizer", ("adamw", "paged_adamw8bit"), _apply_optimizer)
register_dimension("amp", ("off", "fp16", "bf16"), _apply_amp)
register_dimension("accum", (1, 4), _apply_accum)
register_dimension("checkpointing", (0, 1), _apply_checkpointing)


def _apply_kernels(on, ctx):
    """kernels=True (the default, as in training) | False: the hand-written backward passes of minillama.kernels,
    or the plain autograd model. Applied in build_step after every other dimension (it reads the checkpointing)."""
    if not isinstance(on, bool):
        raise ValueError(f"kernels={on!r}: expected True or False.")
    ctx["kernels"] = on
    ctx["estimate"]["kernels"] = on


register_dimension("kernels", (True, False), _apply_kernels)

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
    # Precision is the outer loop, fp16 last: on a CPU its autocast is the slowest by far, and a long run
    # stopped early (results.json is written after every row) then has every other row.
    "techniques": {"base": {"mode": "train", "batch": 8, "seq_len": 128},
                   "sweep": {"amp": ("off", "bf16", "fp16"), "lora": (0, 16), "accum": (1, 4),
                             "checkpointing": (0, 1)}},
    # QLoRA: LoRA r=16 (wq, wv) on a 4-bit base, {none, NF4, NF4 + double quantisation, FP4}, paged 8-bit AdamW;
    # plus plain LoRA with torch's AdamW, the usual baseline.
    "qlora": {"base": {"mode": "train", "batch": 8, "seq_len": 128, "lora": 16, "optimizer": "paged_adamw8bit"},
              "sweep": {"quant": tuple(QUANT_SETTINGS)},
              "extra": [{"mode": "train", "batch": 8, "seq_len": 128, "lora": 16, "optimizer": "adamw",
                         "quant": "none"}]},
    # The hand-written backward passes (minillama.kernels) against the plain autograd model, full and LoRA.
    "kernels": {"base": {"mode": "train", "batch": 8, "seq_len": 128}, "sweep": {"lora": (0, 16), "kernels": (False, True)}},
    # QLoRA as it is run on a GPU: the 4-bit base under bf16 / fp16 autocast (the matmuls in the autocast dtype).
    "qlora-amp": {"base": {"mode": "train", "batch": 8, "seq_len": 128, "lora": 16, "optimizer": "paged_adamw8bit"},
                  "sweep": {"quant": ("nf4", "nf4+dq"), "amp": ("bf16", "fp16")}},
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


def _apply_dimensions(cfg: dict, model: Optional[torch.nn.Module], param_dtype) -> dict:
    """Apply every dimension of `cfg` to `model` (None: only to the estimate's arguments, ctx["estimate"]).
    Returns the context: model, estimate, amp, accum, optimizer, kernels."""
    ctx = {"model": model, "param_dtype": param_dtype, "estimate": {}, "config": cfg, "amp": "off", "accum": 1,
           "optimizer": "adamw", "kernels": True}
    for key in cfg:
        if key not in DIMENSIONS:
            raise ValueError(f"Config key {key!r} is not a registered grid dimension: {sorted(DIMENSIONS)}.")
    for key, dim in DIMENSIONS.items():  # in registration order: quant before lora, whatever the config's order
        if key in cfg and dim.apply is not None:
            dim.apply(cfg[key], ctx)
    return ctx


def _estimate(args, cfg: dict, ctx: dict, param_dtype, device: str):
    """estimate_memory with the arguments the config's dimensions set in ctx["estimate"] (micro-batch = batch/accum)."""
    return estimate_memory(args, batch=cfg["batch"] // ctx["accum"], seq_len=cfg["seq_len"],
                           mode=cfg.get("mode", "train"), device=device, param_dtype=param_dtype, **ctx["estimate"])


def predict_config(args, cfg: dict, *, param_dtype, device: str = "cpu"):
    """The memory model's estimate of one step of a config, without building its model: the course's dimensions
    set the estimate's arguments with ctx["model"] None, as they do for a measured row (run_config)."""
    return _estimate(args, cfg, _apply_dimensions(cfg, None, parse_dtype(param_dtype)), param_dtype, device)


def configs_that_fit(configs: list[dict], args, *, gpu_mem: int, param_dtype, device: str = "cuda"
                     ) -> tuple[list[dict], list[tuple[dict, str]]]:
    """(the configs whose predicted peak fits a card of gpu_mem bytes, [(config, why not)] for the others), by
    predict_config and the planner's rule (plan.usable_bytes: 1 GiB for the CUDA context, 10% headroom)."""
    from .plan import usable_bytes

    usable = usable_bytes(gpu_mem, device)
    fit, skipped = [], []
    for cfg in configs:
        peak = predict_config(args, cfg, param_dtype=param_dtype, device=device).peak_bytes
        if peak <= usable:
            fit.append(cfg)
        else:
            skipped.append((cfg, f"predicted peak {peak / 1024**3:.2f} GiB > {usable / 1024**3:.2f} GiB usable of "
                                 f"{gpu_mem / 1024**3:.2f} GiB"))
    return fit, skipped


def build_step(make_model: Callable[[], torch.nn.Module], cfg: dict, *, seed: int = 0) -> dict:
    """A fresh model with the config applied, and `step`: a function running one whole step of it (the
    trainer's own train_step in train mode, a no-grad forward in inference mode), ready to be measured or
    timed. Returns {"model", "optimizer", "step", "ctx"}."""
    from ..training import TrainConfig, make_optimizer, train_step

    model = make_model()
    args = model.args
    ctx = _apply_dimensions(cfg, model, model.tok_embeddings.weight.dtype)  # never quantised: the weights' dtype
    model = ctx["model"]
    if ctx["kernels"]:
        enable_kernels(model)
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
    return {"model": model, "optimizer": optimizer, "step": step, "ctx": ctx}


def run_config(make_model: Callable[[], torch.nn.Module], cfg: dict, *, preset: str, warmup: int = 1,
               repeats: int = 3, seed: int = 0) -> dict:
    """Build a fresh model, apply the config, measure one step and predict it. Returns a flat row."""
    built = build_step(make_model, cfg, seed=seed)
    model, ctx = built["model"], built["ctx"]
    device = next(model.parameters()).device
    batch, seq_len, mode = cfg["batch"], cfg["seq_len"], cfg.get("mode", "train")
    dtype = next(model.parameters()).dtype
    meta = {"preset": preset, "mode": mode, "batch": batch, "seq_len": seq_len, **cfg}
    kind = "inference" if mode != "train" else ("lora" if ctx["estimate"].get("lora") else "full")
    amp = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(ctx["amp"])
    m: Measurement = measure(built["step"], model=model, optimizer=built["optimizer"],
                             tokens_per_step=batch * seq_len, name=config_name(cfg), warmup=warmup,
                             repeats=repeats, meta=meta, model_flops_per_token=model_flops_per_token(
                                 model.args, seq_len, kind), compute_dtype=amp or model.tok_embeddings.weight.dtype)
    est = _estimate(model.args, cfg, ctx, dtype_name(dtype), device.type)
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
        if out_dir is not None:  # the rows so far survive an interrupted run
            Path(out_dir).mkdir(parents=True, exist_ok=True)
            atomic_write_text(Path(out_dir) / "results.json", json.dumps(rows, indent=2, default=str))
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


def format_table(rows: list[dict], fmt: str = "md", header: bool = True, name_width: int = 0) -> str:
    """The rows as a markdown, plain-text or HTML table (with the measurement context above it).
    name_width: the least width of the text table's first column (rows printed one at a time then line up)."""
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
        widths = [max(len(h), *(len(row[i]) for row in cells), name_width if i == 0 else 0)
                  for i, h in enumerate(heads)]
        line = lambda vals: "  ".join(v.rjust(w) if i else v.ljust(w) for i, (v, w) in enumerate(zip(vals, widths)))  # noqa: E731
        body = [line(row) for row in cells]
        return "\n".join(([describe(rows), line(heads)] if header else []) + body)
    raise ValueError(f"Table format {fmt!r} is unknown: expected 'md', 'text' or 'html'.")


def _save_figure(fig, path) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, dpi=FIG_DPI, format=Path(path).suffix.lstrip(".") or "png")
    atomic_write_bytes(path, buf.getvalue())


FIG_DPI = 120
MAX_FIG_WIDTH_IN = 11.5  # 1,380 px at FIG_DPI: readable on a laptop screen and in a notebook
SHORT = {"mode": str, "lora": lambda v: f"LoRA r{v}" if v else "full", "amp": lambda v: "fp32" if v == "off" else f"{v} AMP",
         "accum": lambda v: f"accum {v}", "checkpointing": lambda v: ("ckpt" if v == 1 else f"ckpt every {v}") if v else "no ckpt",
         "batch": lambda v: f"batch {v}", "seq_len": lambda v: f"seq {v}", "quant": lambda v: f"quant {v}"}


def short_labels(rows: list[dict]) -> tuple[str, list[str]]:
    """(the settings every row shares, one short label per row naming only what differs between rows)."""
    keys = [k for k in DIMENSIONS if any(k in r for r in rows)]
    word = lambda k, v: SHORT[k](v) if k in SHORT else f"{k}={v}"  # noqa: E731
    varying = [k for k in keys if len({str(r.get(k)) for r in rows}) > 1]
    shared = ", ".join(word(k, rows[0][k]) for k in keys if k not in varying and k in rows[0])
    labels = [", ".join(word(k, r[k]) for k in varying if k in r) or r.get("name", "") for r in rows]
    return shared, labels


def _title(rows: list[dict]) -> str:
    """Two lines: the shared settings, then where it was measured."""
    shared, _ = short_labels(rows)
    r = next((r for r in rows if "device_name" in r), rows[0] if rows else {})
    return (f"{r.get('preset', '?')} model, {shared}\n"
            f"{r.get('device_name', '?')}, torch {r.get('torch', '?')}, {r.get('dtype', '?')} master weights")


def needs_log_scale(values) -> bool:
    """A log axis when the positive values span a factor of 10 or more (a linear one would squash the rest)."""
    v = [x for x in values if x > 0]
    return bool(v) and max(v) >= 10 * min(v)


def _figure(n_rows: int, n_panels: int = 1):
    """A matplotlib Figure without pyplot: no backend is switched, so a notebook's own plots keep working."""
    from matplotlib.figure import Figure

    height = min(12.0, max(3.0, 0.3 * n_rows + 1.6))  # one bar per row, horizontal: labels stay on one line
    fig = Figure(figsize=(MAX_FIG_WIDTH_IN if n_panels > 1 else 8.5, height))
    axes = fig.subplots(1, n_panels, sharey=True, squeeze=False)
    return fig, list(axes[0])


def _memory_panel(ax, rows, labels) -> None:
    y = range(len(rows))
    left = [0.0] * len(rows)
    for cat in CATEGORIES:
        vals = [r["memory_by_category"][cat] / MiB for r in rows]
        ax.barh(y, vals, left=left, label=cat, color=f"C{CATEGORIES.index(cat)}")
        left = [a + v for a, v in zip(left, vals)]
    ax.scatter([r["predicted_peak_memory_bytes"] / MiB for r in rows], y, color="black", marker="|", s=150,
               label="predicted peak", zorder=3)
    ax.set_yticks(list(y), labels, fontsize=8)
    ax.invert_yaxis()  # first row on top, as in the table
    ax.set_xlabel("peak memory (MiB = 1024**2 bytes)")
    ax.legend(fontsize=7, loc="lower right")


def _bar_panel(ax, rows, labels, key: str, scale: float, xlabel: str) -> None:
    vals = [scale * r[key] for r in rows]
    ax.barh(range(len(rows)), vals, color="tab:gray")
    if "step_times_s" in rows[0] and key == "step_time_s":  # the spread of the timed repeats
        lo = [scale * (r[key] - min(r["step_times_s"])) for r in rows]
        hi = [scale * (max(r["step_times_s"]) - r[key]) for r in rows]
        ax.errorbar(vals, range(len(rows)), xerr=[lo, hi], fmt="none", color="black", capsize=2)
    ax.set_yticks(range(len(rows)), labels, fontsize=8)
    if not ax.yaxis_inverted():
        ax.invert_yaxis()
    if needs_log_scale(vals):
        ax.set_xscale("log")
        xlabel += " (log scale)"
    ax.set_xlabel(xlabel)


def plot_memory(rows: list[dict], path) -> None:
    """Horizontal stacked bars of peak memory by category per configuration, the prediction as a marker."""
    rows = [r for r in rows if "memory_by_category" in r]
    fig, (ax,) = _figure(len(rows))
    _memory_panel(ax, rows, short_labels(rows)[1])
    ax.set_title(_title(rows), fontsize=9)
    fig.tight_layout()
    _save_figure(fig, path)


def plot_bars(rows: list[dict], key: str, scale: float, xlabel: str, path) -> None:
    """One horizontal bar per configuration of rows[i][key] * scale (runtime with its spread, FLOPs); a log
    axis when the values span 10x or more."""
    rows = [r for r in rows if key in r]
    fig, (ax,) = _figure(len(rows))
    _bar_panel(ax, rows, short_labels(rows)[1], key, scale, xlabel)
    ax.set_title(_title(rows), fontsize=9)
    fig.tight_layout()
    _save_figure(fig, path)


def plot_lab(rows: list[dict], path) -> None:
    """The lab grid in one figure: memory by category and step time side by side, one line per row."""
    rows = [r for r in rows if "memory_by_category" in r]
    fig, (ax_m, ax_t) = _figure(len(rows), 2)
    labels = short_labels(rows)[1]
    _memory_panel(ax_m, rows, labels)
    _bar_panel(ax_t, rows, labels, "step_time_s", 1000, "step time (ms; bar: median, line: range of repeats)")
    fig.suptitle(_title(rows), fontsize=10)
    fig.tight_layout()
    _save_figure(fig, path)


def plot_scaling(panels: dict[str, list[dict]], path) -> None:
    """Measured peak memory (points, by category) against one grid dimension per panel, with the memory
    model's prediction as a line. panels: {dimension: rows that differ only in that dimension}."""
    from matplotlib.figure import Figure  # no pyplot: no backend is switched (see _figure)

    fig = Figure(figsize=(min(MAX_FIG_WIDTH_IN, 5 * len(panels)), 4))
    axes = fig.subplots(1, len(panels), squeeze=False)
    for ax, (key, rows) in zip(axes[0], panels.items()):
        rows = sorted((r for r in rows if "memory_by_category" in r), key=lambda r: r[key])
        x = [r[key] for r in rows]
        ax.plot(x, [r["predicted_peak_memory_bytes"] / MiB for r in rows], "k--", label="predicted peak")
        ax.plot(x, [r["peak_memory_bytes"] / MiB for r in rows], "ko", label="measured peak")
        for i, cat in enumerate(CATEGORIES):  # the colours of the stacked bars: C0, C1, ... in CATEGORIES order
            ax.plot(x, [r["memory_by_category"][cat] / MiB for r in rows], "o-", ms=3, lw=1, color=f"C{i}",
                    label=f"measured {cat}")
        ax.set_xticks(x, [str(v) for v in x])  # a linear axis: memory linear in batch or length is a straight line
        ax.set_xlabel({"batch": "batch (rows)", "seq_len": "sequence length (tokens)"}.get(key, key))
        ax.set_ylabel("MiB (1024**2 bytes)")
        ax.set_title(f"{short_labels(rows)[0]}", fontsize=9)
        ax.grid(alpha=0.3)
    fig.legend(*axes[0][0].get_legend_handles_labels(), fontsize=7, loc="center right")  # beside the panels, over no data
    r = rows[0] if rows else {}
    fig.suptitle(f"peak memory of one training step, {r.get('preset', '?')} model, {r.get('device_name', '?')}",
                 fontsize=10)
    fig.tight_layout(rect=(0, 0, 0.8, 1))
    _save_figure(fig, path)


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


def _pair_effect(key: str, off: dict, on: dict, get, tolerance: float) -> tuple[float, str]:
    """(ratio on/off, 'reduces' | 'raises' | 'same') for one pair of rows. A step time counts as 'same' when
    the ranges of the two rows' timed repeats overlap (the difference is inside the noise)."""
    a, b = get(on), get(off)
    ratio = a / b if b else (1.0 if a == 0 else float("inf"))
    if key == "step time" and "step_times_s" in on and "step_times_s" in off:
        if min(on["step_times_s"]) <= max(off["step_times_s"]) and min(off["step_times_s"]) <= max(on["step_times_s"]):
            return ratio, "same"
    return ratio, "same" if abs(ratio - 1) <= tolerance else ("reduces" if ratio < 1 else "raises")


def _pairs(rows: list[dict], dim: str, off, on) -> list[tuple[dict, dict]]:
    """(row with the technique off, row with it on) for every pair that differs in `dim` only."""
    pairs = []
    for r in rows:
        if dim not in r or r[dim] == off or (on is not None and r[dim] != on):
            continue
        rest = {k: v for k, v in r.items() if k in DIMENSIONS and k != dim}
        pairs += [(b, r) for b in rows if b.get(dim) == off and all(b.get(k) == v for k, v in rest.items())]
    return pairs


def technique_effects(rows: list[dict], tolerance: float = 0.03) -> list[dict]:
    """For each technique, what it does to every quantity over all pairs of measured rows that differ in that
    technique only: the median ratio on/off, the smallest and largest ratio, and one word that is true of
    every pair: "reduces", "raises", "same" (within `tolerance`; for step time, within the repeats' spread),
    or "depends" when the pairs disagree (e.g. AMP cuts activations without checkpointing and adds its 16-bit
    weight copies with it).

    Returns [{"technique", "pairs", "<quantity>": {"ratio", "min", "max", "effect", "counts"}}] for the
    techniques the rows vary.
    """
    rows = [r for r in rows if "memory_by_category" in r]
    out = []
    for tech, (dim, off, on) in TECHNIQUES.items():
        pairs = _pairs(rows, dim, off, on)
        if not pairs:
            continue
        entry = {"technique": tech, "pairs": len(pairs)}
        for key, get in EFFECT_KEYS:
            effects = [_pair_effect(key, b, a, get, tolerance) for b, a in pairs]
            ratios = [r for r, _ in effects]
            words = {w for _, w in effects}
            counts = {w: sum(e == w for _, e in effects) for w in sorted(words)}
            entry[key] = {"ratio": statistics.median(ratios), "min": min(ratios), "max": max(ratios),
                          "effect": words.pop() if len(words) == 1 else "depends", "counts": counts}
        out.append(entry)
    return out


def _effect_cell(e: dict, key: str) -> str:
    if e["ratio"] == float("inf"):
        return f"{e['effect']} (from 0)"
    if e["effect"] == "depends":  # say how the pairs split, and the range of ratios
        split = ", ".join(f"{n} {w}" for w, n in e["counts"].items())
        return f"depends: {split} (x{e['min']:.2f} to x{e['max']:.2f})"
    spread = f", x{e['min']:.2f} to x{e['max']:.2f}" if e["max"] - e["min"] > 0.01 else ""
    word = "within noise" if e["effect"] == "same" and key == "step time" else e["effect"]
    return f"{word} (x{e['ratio']:.2f}{spread})"


def format_effects(effects: list[dict]) -> str:
    """The qualitative table (markdown): each cell the word true of every pair, the median ratio on/off and
    its range; 'depends' says how many pairs went which way."""
    heads = ["technique", "pairs"] + [k for k, _ in EFFECT_KEYS]
    lines = ["| " + " | ".join(heads) + " |", "|" + "---|" * len(heads)]
    for e in effects:
        cells = [e["technique"], str(e["pairs"])] + [_effect_cell(e[k], k) for k, _ in EFFECT_KEYS]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_csv(rows: list[dict], path) -> None:
    """The rows as CSV: each dict-valued field (memory by category, ...) becomes one column per key,
    named `<field>_<key>` (`*_by_category` fields: `<first word>_<category>_bytes`)."""
    flat = []
    for r in rows:
        r = dict(r)
        for key in [k for k, v in r.items() if isinstance(v, dict)]:
            short = key.split("_")[0] + "_{}_bytes" if key.endswith("_by_category") else key + "_{}"
            for sub, v in r.pop(key).items():
                r[short.format(sub)] = v
        flat.append(r)
    fields = list(dict.fromkeys(k for r in flat for k in r))
    buf = io.StringIO(newline="")
    w = csv.DictWriter(buf, fieldnames=fields)
    w.writeheader()
    w.writerows(flat)
    atomic_write_text(path, buf.getvalue())


def write_results(rows: list[dict], out_dir) -> dict[str, Path]:
    """results.json, results.csv, table.md, memory.png, runtime.png, flops.png in out_dir."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {k: out / v for k, v in (("json", "results.json"), ("csv", "results.csv"), ("md", "table.md"),
                                       ("memory", "memory.png"), ("runtime", "runtime.png"),
                                       ("flops", "flops.png"))}
    atomic_write_text(paths["json"], json.dumps(rows, indent=2, default=str))
    write_csv(rows, paths["csv"])
    effects = technique_effects(rows)
    text = format_table(rows, "md") + "\n"
    if effects:
        text += ("\nWhat each technique does over the pairs of rows that differ only in it (median ratio "
                 "technique-on / technique-off and its range; 'same' within 3%, a step time within the spread of "
                 "its repeats; 'depends' when the pairs disagree):\n\n" + format_effects(effects) + "\n")
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
