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

import itertools
import json
import os
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch

from ..config import dtype_name, parse_dtype
from ..files import atomic_write_text
from ..kernels import enable_kernels
from .measure import CATEGORIES, Measurement, measure, model_flops_per_token
from .memory import effective_amp, estimate_memory
from .report import (UNKNOWN, mib, percent, plot_bars, plot_memory, short_labels, table, where_measured,
                     write_csv)


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
    """One measured row on one line, each value after its column's name (the table's columns; empty and
    unknown values left out)."""
    cells = [(h, f(row)) for h, f in COLUMNS]
    return cells[0][1] + ": " + ", ".join(f"{h} {v}" for h, v in cells[1:] if v not in ("", UNKNOWN))


# ---- tables (drawn by measuring.report) -----------------------------------------------------------
COLUMNS = [  # (header, function of a row)
    ("configuration", lambda r: r["name"]),
    ("peak MiB", lambda r: mib(r.get("peak_memory_bytes"))),
    ("predicted MiB", lambda r: mib(r.get("predicted_peak_memory_bytes"))),
    ("error", lambda r: f"{100 * r['prediction_error']:+.1f}%" if "prediction_error" in r else ""),
    *[(f"{c} MiB", (lambda c: lambda r: mib(r.get("memory_by_category", {}).get(c)))(c)) for c in CATEGORIES],
    ("step ms", lambda r: f"{1000 * r['step_time_s']:.1f}" if "step_time_s" in r else ""),
    ("tokens/s", lambda r: f"{r['tokens_per_s']:.0f}" if "tokens_per_s" in r else ""),
    ("GFLOP/step", lambda r: f"{r['flops_per_step'] / 1e9:.2f}" if "flops_per_step" in r else ""),
    ("MFU", lambda r: (percent(r["mfu"]) if r.get("mfu") is not None else UNKNOWN) if "step_time_s" in r
     else r.get("error", "")),
]


def describe(rows: list[dict]) -> str:
    """One line above a table: the settings every row shares, where it was measured, the unit."""
    shared = short_labels(rows, list(DIMENSIONS))[0] if len(rows) > 1 else ""
    return (f"{shared} | " if shared else "") + where_measured(rows) + " | MiB = 1024**2 bytes"


def format_table(rows: list[dict], fmt: str = "md", header: bool = True, name_width: int = 0) -> str:
    """The rows as a markdown, plain-text or HTML table, each row named by what differs between the rows and
    the rest said once above (header=False: the rows only, no line above and, in text, no column names).
    name_width: the least width of the text table's first column (rows printed one at a time then line up)."""
    labels = short_labels(rows, list(DIMENSIONS))[1] if len(rows) > 1 else [r["name"] for r in rows]
    cells = [[label] + [f(r) for _, f in COLUMNS[1:]] for label, r in zip(labels, rows)]
    text = table([h for h, _ in COLUMNS], cells, fmt, above=describe(rows) if header else "", name_width=name_width)
    return text if header or fmt != "text" else "\n".join(text.splitlines()[1:])


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
        top = f"x{e['max']:.2f}" if e["max"] != float("inf") else "some from 0"  # a ratio over 0 is no number
        return f"depends: {split} (x{e['min']:.2f} to {top})"
    spread = f", x{e['min']:.2f} to x{e['max']:.2f}" if e["max"] - e["min"] > 0.01 else ""
    word = "within noise" if e["effect"] == "same" and key == "step time" else e["effect"]
    return f"{word} (x{e['ratio']:.2f}{spread})"


def format_effects(effects: list[dict], keys: Optional[Sequence[str]] = None) -> str:
    """The qualitative table (markdown): each cell the word true of every pair, the median ratio on/off and
    its range; 'depends' says how many pairs went which way. keys: the quantities shown (default: all)."""
    keys = [k for k, _ in EFFECT_KEYS] if keys is None else list(keys)
    heads = ["technique", "pairs"] + keys
    cells = [[e["technique"], str(e["pairs"])] + [_effect_cell(e[k], k) for k in keys] for e in effects]
    return table(heads, cells, "md")


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
        text += ("\nWhat each technique does: median ratio on/off over the pairs of rows differing only in it "
                 "('same': within 3%, or a step time within its repeats' spread):\n\n" + format_effects(effects) + "\n")
    atomic_write_text(paths["md"], text)
    if any("memory_by_category" in r for r in rows):
        keys = list(DIMENSIONS)
        plot_memory(rows, paths["memory"], keys)
        plot_bars(rows, "step_time_s", 1000, "step time (ms)", paths["runtime"], keys)
        plot_bars(rows, "flops_per_step", 1e-9, "GFLOP per step", paths["flops"], keys)
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
