"""The "will it fit?" explorer of notebook 00: pick a model, a fine-tuning method and its knobs, and a GPU;
see the predicted peak by memory category, the verdict, and the planner's best fitting configuration.

It asks exactly what `minillama plan` asks (`minillama.measuring.plan.plan`, the memory model
`estimate_memory` under it) and reads its own configuration off the planner's rows, so the explorer and the
command cannot disagree. On the tiny preset it also measures the configuration on this machine
(`bench.run_config`, the harness of section 5) and shows the measured peak beside the prediction.

    from _explorer import fit_explorer
    fit_explorer()            # widgets in Jupyter; a static table where ipywidgets is missing
    fit_answer(preset="llama2-7b", method="lora", seq_len=2048, gpu_gib=24).text()
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Optional

import _common  # noqa: F401  (first: it puts the repo on sys.path, for notebooks run without `pip install -e .`)
from minillama.config import get_preset
from minillama.measuring import bench
from minillama.measuring.measure import CATEGORIES
from minillama.measuring.memory import GiB, format_bytes
from minillama.measuring.plan import PlanRow, best_per_method, plan

# The choices offered. Weights and optimizers are the planner's own settings (see minillama/measuring/plan.py).
PRESETS = ("tiny", "llama2-7b", "llama2-13b", "llama3-8b")
METHODS = ("full", "lora", "qlora")
WEIGHTS = ("bf16", "fp32+amp")  # 16-bit weights, or fp32 master weights under bf16 autocast
OPTIMIZERS = ("adamw", "paged_adamw8bit")
SEQ_LENS = (64, 128, 256, 512, 1024, 2048, 4096, 8192)
BATCHES = (1, 2, 4, 8, 16, 32)  # rows per optimizer step
ACCUMS = (1, 2, 4, 8, 16, 32)  # micro-steps per optimizer step: must divide the batch
RANKS = (4, 8, 16, 32, 64)
TARGETS = ("wq,wv", "all")
GPU_GIB = (16, 24, 40, 80)
QUESTION = dict(preset="llama2-7b", method="lora", weights="bf16", seq_len=2048, batch=4, accum=1,
                checkpointing=False, lora_r=16, lora_targets="wq,wv", optimizer="adamw", gpu_gib=24)

_MEASURED: dict = {}  # bench config -> measured row, so that a redraw of a measured question costs nothing


@dataclass
class FitAnswer:
    question: dict
    row: Optional[PlanRow] = None  # the question, as the planner predicts it
    best: Optional[PlanRow] = None  # the planner's best fitting configuration, any method
    best_same_method: Optional[PlanRow] = None
    problem: str = ""  # why there is no answer (a sentence), else ""
    measured: Optional[dict] = None  # tiny preset: bench.run_config's row, measured on this machine

    def text(self) -> str:
        q = self.question
        head = (f"{q['preset']}, batch {q['batch']} x {q['seq_len']} tokens, one {q['gpu_gib']} GiB GPU "
                f"(GiB = 2^30 bytes):")
        if self.problem:
            return f"{head}\n  {self.problem}"
        r = self.row
        verdict = "FITS" if r.fits else "DOES NOT FIT"
        lines = [head, f"  {verdict}: predicted peak {format_bytes(r.peak_bytes)} for {r.label()}",
                 "  (fits = the peak stays under the GPU's memory less the planner's reserve for the CUDA "
                 "context and its fragmentation headroom)"]
        best_line = lambda name, b: (f"  {name}: {b.label()}: peak {format_bytes(b.peak_bytes)}, "
                                     f"{b.compute_per_token}N FLOPs per token")
        if self.best is None:
            lines.append("  the planner's best fitting configuration: nothing fits this GPU")
        elif self.best is r:
            lines.append("  this is the planner's best fitting configuration")
        else:
            lines.append(best_line("the planner's best fitting configuration", self.best))
        if self.best_same_method not in (None, self.best, r):
            lines.append(best_line(f"best with {q['method']}", self.best_same_method))
        if self.measured is not None:
            lines += measured_lines(self.measured)
        return "\n".join(lines)


def measured_lines(m: dict) -> list[str]:
    if "error" in m:
        return [f"  measured on this machine: could not run ({m['error']})"]
    return [f"  measured on {m['device_name']} ({m['dtype']} weights): peak {format_bytes(m['peak_memory_bytes'])};"
            f" the memory model for {m['device']} predicts {format_bytes(m['predicted_peak_memory_bytes'])} "
            f"({100 * m['prediction_error']:+.1f}%)"]


def _matches(r: PlanRow, q: dict) -> bool:
    return (r.method == q["method"] and r.weights == q["weights"] and r.optimizer == q["optimizer"]
            and r.checkpointing == q["checkpointing"] and r.accum == q["accum"]
            and (r.method == "full" or r.lora_targets == q["lora_targets"]))


def fit_answer(measure_tiny: bool = True, **question) -> FitAnswer:
    """The answer to one question (keywords as in QUESTION), from the planner's rows: `minillama plan
    --preset P --gpu-mem G --seq-len T --batch B --lora-r R` computes the same rows."""
    q = {**QUESTION, **question}
    unknown = sorted(set(q) - set(QUESTION))
    if unknown:
        raise ValueError(f"fit_answer: unknown question key(s) {unknown}: expected some of {sorted(QUESTION)}.")
    ans = FitAnswer(question=q)
    try:
        rows = plan(get_preset(q["preset"]), gpu_mem=int(q["gpu_gib"] * GiB), seq_len=q["seq_len"],
                    batch=q["batch"], lora_r=q["lora_r"])
    except ValueError as e:  # the planner's own sentence: sequence too long, batch not divisible, ...
        ans.problem = str(e)
        return ans
    ans.best = rows[0] if rows[0].fits else None
    ans.best_same_method = next((r for r in best_per_method(rows) if r.method == q["method"]), None)
    ans.row = next((r for r in rows if _matches(r, q)), None)
    if ans.row is None:
        ans.problem = (f"accumulation {q['accum']} does not divide the batch {q['batch']}: the accumulation must "
                       f"divide the batch." if q["batch"] % q["accum"] else
                       f"the planner lists no {q['method']} configuration with {q['weights']} weights on a GPU "
                       f"(QLoRA computes in bf16 there): choose bf16 weights.")
    elif q["preset"] == "tiny" and measure_tiny:
        ans.measured = measure_on_this_machine(ans.row, q["seq_len"])
    return ans


def measure_on_this_machine(row: PlanRow, seq_len: int) -> dict:
    """One training step of the tiny model in the row's configuration, measured by the harness on the CPU
    (cached: measuring takes seconds, a cached redraw nothing)."""
    cfg = row.bench_config(seq_len)
    dtype = "bf16" if row.weights == "bf16" else "fp32"
    key = json.dumps([cfg, dtype], sort_keys=True)
    if key not in _MEASURED:
        make_model = bench.model_factory("tiny", random_weights=True, device="cpu", dtype=dtype)
        try:
            _MEASURED[key] = bench.run_config(make_model, cfg, preset="tiny", repeats=1)
        except Exception as e:  # e.g. an optimizer this machine's bitsandbytes cannot run: say so, keep exploring
            _MEASURED[key] = {"error": f"{type(e).__name__}: {e}"}
    return _MEASURED[key]


def draw(ans: FitAnswer):
    """A stacked horizontal bar per configuration (the question, the planner's best), by memory category at
    the peak, with the GPU's size as a vertical line. Returns the matplotlib figure."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9, 2.6), layout="constrained")  # not pyplot: no global state, whatever the backend
    ax = fig.subplots()
    bars = [("your configuration", ans.row), ("planner's best", ans.best)]
    bars = [(name, r) for name, r in bars if r is not None]
    if ans.measured is not None and "peak_memory_bytes" in ans.measured:
        bars.append(("measured here", ans.measured))
    for y, (name, r) in enumerate(reversed(bars)):
        cats = r.at_peak if isinstance(r, PlanRow) else r["memory_by_category"]
        left = 0.0
        for i, c in enumerate(CATEGORIES):
            width = cats.get(c, 0) / GiB
            ax.barh(y, width, left=left, color=f"C{i}", label=c if y == 0 else None)
            left += width
    ax.set_yticks(range(len(bars)), [name for name, _ in reversed(bars)])
    if ans.question["preset"] != "tiny":  # the tiny model is megabytes: a GPU line would flatten its bars
        ax.axvline(ans.question["gpu_gib"], color="black", linestyle="--", label=f"{ans.question['gpu_gib']} GiB GPU")
    ax.set_xlabel("GiB at the peak (2^30 bytes)")
    ax.set_title(ans.problem[:90] if ans.problem else
                 f"{'fits' if ans.row.fits else 'does not fit'}: {format_bytes(ans.row.peak_bytes)} predicted peak")
    ax.legend(loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8)
    return fig


def show(**question) -> FitAnswer:
    """Answer, print and draw one question (what every redraw of the explorer runs). The figure goes out as a
    PNG of its own: pyplot's show() draws nothing once a library has switched matplotlib to Agg
    (`minillama.measuring.bench` does, for its plot files)."""
    import io

    from IPython.display import Image, display

    ans = fit_answer(**question)
    print(ans.text())
    if ans.row is not None or ans.best is not None:
        png = io.BytesIO()
        draw(ans).savefig(png, format="png", dpi=80)
        display(Image(data=png.getvalue()))
    return ans


def static_table(presets=PRESETS[1:], gpus=GPU_GIB, **question) -> str:
    """Markdown: the planner's best fitting configuration for each model and GPU size (the explorer without
    widgets)."""
    q = {**QUESTION, **question}
    lines = ["| model | " + " | ".join(f"{g} GiB" for g in gpus) + " |", "|---" * (len(gpus) + 1) + "|"]
    for p in presets:
        cells = []
        for g in gpus:
            a = fit_answer(measure_tiny=False, **{**q, "preset": p, "gpu_gib": g})
            cells.append(a.problem or (f"{a.best.label()}: {format_bytes(a.best.peak_bytes)}" if a.best
                                       else "nothing fits"))
        lines.append(f"| {p} | " + " | ".join(cells) + " |")
    return (f"Best fitting configuration at batch {q['batch']} x {q['seq_len']} tokens, LoRA rank {q['lora_r']} "
            f"(`minillama plan`):\n\n" + "\n".join(lines))


def _controls(widgets, q: dict) -> dict:
    style = {"description_width": "100px"}  # the labels in full

    def dd(options, value, description):
        return widgets.Dropdown(options=options, value=value, description=description, style=style)

    return dict(
        preset=dd(PRESETS, q["preset"], "model"), method=dd(METHODS, q["method"], "method"),
        weights=dd(WEIGHTS, q["weights"], "weights/AMP"), optimizer=dd(OPTIMIZERS, q["optimizer"], "optimizer"),
        seq_len=widgets.SelectionSlider(options=SEQ_LENS, value=q["seq_len"], description="seq len", style=style),
        batch=widgets.SelectionSlider(options=BATCHES, value=q["batch"], description="batch", style=style),
        accum=dd(ACCUMS, q["accum"], "accumulation"),
        checkpointing=widgets.Checkbox(value=q["checkpointing"], description="checkpointing", style=style),
        lora_r=dd(RANKS, q["lora_r"], "LoRA rank"), lora_targets=dd(TARGETS, q["lora_targets"], "LoRA targets"),
        gpu_gib=widgets.ToggleButtons(options=GPU_GIB, value=q["gpu_gib"], description="GPU GiB", style=style))


def fit_explorer(**question) -> FitAnswer:
    """The explorer: widgets that redraw `show(...)` on every change, or, without ipywidgets, the static
    table and the figure of the first question. Returns the first question's answer (computed here, so that
    a notebook run without a browser still checks it)."""
    from IPython.display import Markdown, display

    q = {**QUESTION, **question}
    first = fit_answer(**q)
    if first.problem:
        raise ValueError(f"fit_explorer: the first question has no answer: {first.problem}")
    try:
        import ipywidgets as widgets
    except ImportError:
        print("ipywidgets is not installed (pip install -e '.[notebooks]'): a static table instead of the explorer.")
        display(Markdown(static_table(**q)))
        show(**q)
        return first
    c = _controls(widgets, q)
    out = widgets.interactive_output(show, c)
    names = list(c)
    left, right = widgets.VBox([c[n] for n in names[:6]]), widgets.VBox([c[n] for n in names[6:]])
    bundle = widgets.VBox([widgets.HBox([left, right]), out])._repr_mimebundle_()
    # Where widgets do not render (a saved copy of the notebook), the first answer instead of the VBox(...) repr.
    bundle["text/plain"] = first.text()
    display(bundle, raw=True)
    return first
