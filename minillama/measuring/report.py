"""Reporting: the tables, CSV files and figures of every measurement (bench, compare, long-context evaluation,
the notebooks), so that they all look alike and each formatting rule is written once.

- Tables: `table` renders a header and rows of cells as markdown, plain text or HTML, with the settings every
  row shares in one short line above. Columns whose every cell is "unknown" (MFU on a CPU, whose peak FLOP/s
  nobody publishes) are left out. `short_labels` names each row by what differs between the rows only
  ("LoRA r16, bf16 AMP"), the settings they share go into that line above.
- CSV: `write_csv` flattens nested dicts (memory by category, accuracy per depth) into one column per key.
- Figures: one style, `new_figure`: a `matplotlib.figure.Figure` made without pyplot, so no backend is switched
  (a notebook's own plots keep working, and it runs headless); `save_figure` writes it atomically at FIG_DPI.
  In a notebook, a returned Figure displays itself.

Units: MiB = 1024**2 bytes (`measuring.memory.MiB`), and every table and axis says so.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Optional, Sequence

from ..files import atomic_write_bytes, atomic_write_text
from .measure import CATEGORIES
from .memory import MiB

FIG_DPI = 120
MAX_FIG_WIDTH_IN = 11.5  # 1,380 px at FIG_DPI: readable on a laptop screen and in a notebook
UNKNOWN = "unknown"  # a cell nobody can fill here (MFU without a published peak): an all-unknown column is dropped


# ---- cells ---------------------------------------------------------------------------------------------
def mib(n, digits: int = 2) -> str:
    """Bytes as MiB (1024**2 bytes) with `digits` decimals, "" for None: the unit every table column uses."""
    return "" if n is None else f"{n / MiB:.{digits}f}"


def percent(v) -> str:
    """A fraction as a percentage with one decimal ("" for None)."""
    return "" if v is None else f"{100 * v:.1f}%"


# ---- row labels: what differs, and what is shared ----------------------------------------------------------
# How a grid dimension's value reads in a label, in the order labels list the dimensions (measuring.bench's
# registered dimensions; tests/test_report.py checks that each has its word here).
WORDS = {
    "mode": str,
    "batch": lambda v: f"batch {v}",
    "seq_len": lambda v: f"seq {v}",
    "quant": lambda v: "unquantised base" if v == "none" else f"{v} base",
    "lora_targets": lambda v: f"LoRA on {v}",
    "lora": lambda v: f"LoRA r{v}" if v else "full",
    "optimizer": str,
    "amp": lambda v: "fp32" if v == "off" else f"{v} AMP",
    "accum": lambda v: f"accum {v}",
    "checkpointing": lambda v: ("ckpt" if v == 1 else f"ckpt every {v}") if v else "no ckpt",
    "kernels": lambda v: "kernels" if v else "plain autograd",
}


def short_labels(rows: list[dict], keys: Optional[Sequence[str]] = None) -> tuple[str, list[str]]:
    """(the settings every row shares, one short label per row naming only what differs between the rows).
    keys: the fields that make a configuration, in label order (default: those of WORDS). A single row is
    labelled by its name: nothing differs."""
    keys = [k for k in (WORDS if keys is None else keys) if any(k in r for r in rows)]
    word = lambda k, v: WORDS[k](v) if k in WORDS else f"{k}={v}"  # noqa: E731
    varying = [k for k in keys if len({str(r.get(k)) for r in rows}) > 1]
    shared = ", ".join(word(k, rows[0][k]) for k in keys if k not in varying and k in rows[0])
    labels = [", ".join(word(k, r[k]) for k in varying if k in r) or r.get("name", "") for r in rows]
    return shared, labels


def where_measured(rows: list[dict]) -> str:
    """Where the rows were measured, from the first measured row: device, dtype, torch, preset."""
    r = next((r for r in rows if "device_name" in r), rows[0] if rows else {})
    return (f"device: {r.get('device_name', '?')} | dtype: {r.get('dtype', '?')} | torch {r.get('torch', '?')} | "
            f"preset: {r.get('preset', '?')}")


# ---- tables ----------------------------------------------------------------------------------------------
def drop_unknown_columns(heads: list[str], cells: list[list[str]]) -> tuple[list[str], list[list[str]]]:
    """The columns (after the first) whose every cell is UNKNOWN or empty, with at least one UNKNOWN, left out."""
    def unknown(i: int) -> bool:
        col = [row[i] for row in cells]
        return i > 0 and bool(col) and all(c in ("", UNKNOWN) for c in col) and UNKNOWN in col

    keep = [i for i in range(len(heads)) if not unknown(i)]
    return [heads[i] for i in keep], [[row[i] for i in keep] for row in cells]


def table(heads: list[str], cells: list[list[str]], fmt: str = "md", *, above: str = "",
          name_width: int = 0) -> str:
    """A table as markdown ("md"), plain text ("text": the first column left-aligned and at least name_width
    wide, so that rows printed one at a time line up) or HTML, with `above` (one short line: what every row
    shares, where it was measured) on top when given. All-unknown columns are dropped (drop_unknown_columns)."""
    if fmt not in ("md", "text", "html"):
        raise ValueError(f"Table format {fmt!r} is unknown: expected 'md', 'text' or 'html'.")
    heads, cells = drop_unknown_columns(heads, cells)
    if fmt == "html":
        th = "".join(f"<th>{h}</th>" for h in heads)
        trs = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in cells)
        return (f"<p>{above}</p>" if above else "") + f"<table><tr>{th}</tr>{trs}</table>"
    if fmt == "md":
        lines = ["| " + " | ".join(heads) + " |", "|" + "---|" * len(heads)]
        lines += ["| " + " | ".join(row) + " |" for row in cells]
        return (above + "\n\n" if above else "") + "\n".join(lines)
    widths = [max(len(h), *(len(row[i]) for row in cells), name_width if i == 0 else 0) for i, h in enumerate(heads)]
    line = lambda vals: "  ".join(v.rjust(w) if i else v.ljust(w) for i, (v, w) in enumerate(zip(vals, widths)))  # noqa: E731
    return "\n".join(([above] if above else []) + [line(heads)] + [line(row) for row in cells])


# ---- CSV -------------------------------------------------------------------------------------------------
def write_csv(rows: list[dict], path) -> Path:
    """The rows as CSV (atomically): each dict-valued field becomes one column per key, named `<field>_<key>`
    (`*_by_category` fields: `<first word>_<category>_bytes`, e.g. memory_gradients_bytes)."""
    flat = []
    for r in rows:
        r = dict(r)
        for key in [k for k, v in r.items() if isinstance(v, dict)]:
            name = key.split("_")[0] + "_{}_bytes" if key.endswith("_by_category") else key + "_{}"
            for sub, v in r.pop(key).items():
                r[name.format(sub)] = v
        flat.append(r)
    buf = io.StringIO(newline="")
    w = csv.DictWriter(buf, fieldnames=list(dict.fromkeys(k for r in flat for k in r)))
    w.writeheader()
    w.writerows(flat)
    return atomic_write_text(path, buf.getvalue())


# ---- figures: one style ------------------------------------------------------------------------------------
def new_figure(width: float, height: float):
    """A matplotlib Figure without pyplot (no backend switched: safe in a notebook and headless), at most
    MAX_FIG_WIDTH_IN wide, laid out by matplotlib's constrained layout."""
    from matplotlib.figure import Figure

    return Figure(figsize=(min(width, MAX_FIG_WIDTH_IN), height), dpi=FIG_DPI, layout="constrained")


def save_figure(fig, path) -> Path:
    """Write the figure to `path` (format from its suffix, png by default) atomically, at FIG_DPI or less for a
    figure wider than MAX_FIG_WIDTH_IN (made elsewhere, e.g. by pyplot in a notebook), trimmed to its drawing."""
    dpi = min(FIG_DPI, MAX_FIG_WIDTH_IN * FIG_DPI / fig.get_figwidth())
    buf = io.BytesIO()
    fig.savefig(buf, dpi=dpi, format=Path(path).suffix.lstrip(".") or "png", bbox_inches="tight")
    return atomic_write_bytes(path, buf.getvalue())


def needs_log_scale(values) -> bool:
    """A log axis when the positive values span a factor of 10 or more (a linear one would squash the rest)."""
    v = [x for x in values if x > 0]
    return bool(v) and max(v) >= 10 * min(v)


def _title(rows: list[dict], keys=None) -> str:
    """Two lines: the shared settings, then where it was measured."""
    shared, _ = short_labels(rows, keys)
    r = next((r for r in rows if "device_name" in r), rows[0] if rows else {})
    return (f"{r.get('preset', '?')} model, {shared}\n"
            f"{r.get('device_name', '?')}, torch {r.get('torch', '?')}, {r.get('dtype', '?')} master weights")


def _bars_figure(n_rows: int, n_panels: int = 1):
    """A figure of horizontal bars, one per row (labels stay on one line), n_panels side by side."""
    height = min(12.0, max(3.0, 0.3 * n_rows + 1.6))
    fig = new_figure(MAX_FIG_WIDTH_IN if n_panels > 1 else 8.5, height)
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


def plot_memory(rows: list[dict], path=None, keys=None):
    """Horizontal stacked bars of peak memory by category per configuration, the prediction as a marker.
    Saved to `path` when given; returns the Figure (in a notebook it displays itself)."""
    rows = [r for r in rows if "memory_by_category" in r]
    fig, (ax,) = _bars_figure(len(rows))
    _memory_panel(ax, rows, short_labels(rows, keys)[1])
    ax.set_title(_title(rows, keys), fontsize=9)
    return _done(fig, path)


def plot_bars(rows: list[dict], key: str, scale: float, xlabel: str, path=None, keys=None, labels=None):
    """One horizontal bar per row of rows[i][key] * scale (runtime with its spread, FLOPs, ratios); a log axis
    when the values span 10x or more. labels: the bars' names (default: short_labels)."""
    rows = [r for r in rows if key in r]
    fig, (ax,) = _bars_figure(len(rows))
    _bar_panel(ax, rows, labels or short_labels(rows, keys)[1], key, scale, xlabel)
    ax.set_title(_title(rows, keys), fontsize=9)
    return _done(fig, path)


def plot_lab(rows: list[dict], path=None, keys=None):
    """The lab grid in one figure: memory by category and step time side by side, one line per row."""
    rows = [r for r in rows if "memory_by_category" in r]
    fig, (ax_m, ax_t) = _bars_figure(len(rows), 2)
    labels = short_labels(rows, keys)[1]
    _memory_panel(ax_m, rows, labels)
    _bar_panel(ax_t, rows, labels, "step_time_s", 1000, "step time (ms; bar: median, line: range of repeats)")
    fig.suptitle(_title(rows, keys), fontsize=10)
    return _done(fig, path)


def plot_scaling(panels: dict[str, list[dict]], path=None, keys=None):
    """Measured peak memory (points, by category) against one grid dimension per panel, with the memory
    model's prediction as a line. panels: {dimension: rows that differ only in that dimension}."""
    fig = new_figure(5 * len(panels) + 2.5, 4)
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
        ax.set_title(short_labels(rows, keys)[0], fontsize=9)
        ax.grid(alpha=0.3)
    fig.legend(*axes[0][0].get_legend_handles_labels(), fontsize=7, loc="outside right center")  # over no data
    r = rows[0] if rows else {}
    fig.suptitle(f"peak memory of one training step, {r.get('preset', '?')} model, {r.get('device_name', '?')}",
                 fontsize=10)
    return _done(fig, path)


def _done(fig, path):
    if path is not None:
        save_figure(fig, path)
    return fig
