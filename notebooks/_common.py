"""Setup shared by every notebook: the repo on sys.path, binary units, where the shipped data lives, and
where a measurement was made. Every notebook imports what it uses by name (`from _common import (BATCH,
make_model, ...)`); the measuring notebooks (03-05) then call `lab_banner()`.

Environment variables of the measuring lab (all optional; the defaults run on a laptop CPU with the
shipped tiny model):
  MINILLAMA_MODEL   checkpoint directory (GPU lab: Llama-2-7B in HF or Meta format)   default data/tiny
  MINILLAMA_DEVICE  cpu | cuda                                                       default: cuda if available
  MINILLAMA_BATCH, MINILLAMA_SEQ  effective batch and sequence length of the measurements  default 8, 128
  MINILLAMA_DTYPE   the weights' dtype: fp32 | bf16 | fp16                          default: bf16 on CUDA, else fp32
  MINILLAMA_PRESET  notebook 00's benchmarked shape: tiny | llama2-7b | ...            default tiny
On a GPU the rows of a table that the memory model says will not fit the card are skipped, each named with its
predicted peak (measure_rows, bench.configs_that_fit).
"""

import os
import sys
from pathlib import Path

import torch

# Jupyter starts in notebooks/; the repo root is one level up.
REPO = Path.cwd() if (Path.cwd() / "minillama").exists() else Path.cwd().parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))  # so the notebooks also run without `pip install -e .`

import minillama  # noqa: E402
from minillama.course.paths import corpora_dir, tiny_model_dir  # noqa: E402
from minillama.measuring import bench, report  # noqa: E402
from minillama.measuring.measure import CATEGORIES, alternate_times, device_name  # noqa: E402

KiB, MiB, GiB = 1024, 1024**2, 1024**3  # binary units, everywhere in the notebooks
TINY_PATH = tiny_model_dir()
CORPORA = corpora_dir()


def resolve(path: str) -> Path:
    """A relative path is looked up in the current directory first, then in the repo root."""
    p = Path(path).expanduser()
    return p.resolve() if p.is_absolute() or p.exists() else (REPO / p).resolve()


def where(device) -> str:
    """The device and torch version every printed table names."""
    return f"{device_name(torch.device(device))}, torch {torch.__version__}"


# ---- the measuring lab of notebooks 03-05 --------------------------------------------------------
MODEL = os.environ.get("MINILLAMA_MODEL", "data/tiny")
DEVICE = os.environ.get("MINILLAMA_DEVICE", "cuda" if torch.cuda.is_available() else "cpu")
BATCH = int(os.environ.get("MINILLAMA_BATCH", "8"))
SEQ = int(os.environ.get("MINILLAMA_SEQ", "128"))
# 16-bit weights on a GPU: Llama-2-7B in fp32 is 25 GiB before a gradient, and its full fp32 fine-tuning 100 GiB
DTYPE = os.environ.get("MINILLAMA_DTYPE", "bf16" if DEVICE.startswith("cuda") else "fp32")
MODEL_PATH = resolve(MODEL)


def lab_banner():
    print(f"model {MODEL_PATH}, {DTYPE} weights, on {where(DEVICE)}; measured at batch {BATCH} x {SEQ} tokens")


def make_model():
    """A fresh copy of the model for every measured row, its weights in DTYPE (fp32 master weights on the CPU)."""
    return minillama.load_model(MODEL_PATH, device=DEVICE, dtype=DTYPE)


def rows_that_fit(configs, gpu_mem=None):
    """(configs to measure, [(config, why skipped)]): on CUDA those whose predicted peak fits the card (gpu_mem:
    its bytes, default the card's total memory), by the memory model; on the CPU all of them."""
    if gpu_mem is None and not DEVICE.startswith("cuda"):
        return list(configs), []
    return bench.configs_that_fit(configs, _model_args(), gpu_mem=_card_bytes(gpu_mem), param_dtype=DTYPE,
                                  device="cuda")


def _card_bytes(gpu_mem=None) -> int:
    """gpu_mem, or the CUDA card's total memory."""
    return torch.cuda.mem_get_info(torch.device(DEVICE))[1] if gpu_mem is None else gpu_mem


def _model_args():
    from minillama.checkpoints.weights import read_model_args

    return read_model_args(MODEL_PATH)


def measure_rows(configs, repeats=3, gpu_mem=None):
    """bench.run_config for each config dict (train mode at BATCH x SEQ unless the config says otherwise), skipping,
    with a printed reason, the rows that the memory model says will not fit the card (rows_that_fit)."""
    configs = [{"mode": "train", "batch": BATCH, "seq_len": SEQ, **cfg} for cfg in configs]
    fit, skipped = rows_that_fit(configs, gpu_mem)
    for cfg, why in skipped:
        print(f"skipped {bench.config_name(cfg)}: {why}")
    return [bench.run_config(make_model, cfg, preset=MODEL_PATH.name, repeats=repeats) for cfg in fit]


def show_table(rows):
    from IPython.display import Markdown, display

    display(Markdown(bench.format_table(rows, "md")))


def show_memory_plot(rows, name):
    from IPython.display import Image, display


    out = REPO / "runs" / "notebooks"
    out.mkdir(parents=True, exist_ok=True)
    report.plot_memory(rows, out / name, list(bench.DIMENSIONS))
    display(Image(filename=str(out / name)))


def by_category(row):
    return {c: row["memory_by_category"][c] / MiB for c in CATEGORIES}


# ---- prose that stays true to the numbers (issue 12) -----------------------------------------------
# A number in a markdown cell is either printed by code from the measurement (use `say`), or a fact with
# its source in docs/references.md. The few typed numbers that stay are checked with `claim`, and
# comparisons of noisy timings go through `verdict`, so a notebook fails (nbmake) instead of contradicting
# itself.

def say(text: str):
    """Render a sentence built from measured values (an f-string) as markdown under the cell."""
    from IPython.display import Markdown, display

    display(Markdown(text))


def claim(name: str, measured: float, typed: float, rel: float = 0.1):
    """Fail loudly when a number typed in the prose (`typed`) disagrees with the measured one."""
    if not abs(measured - typed) <= rel * max(abs(typed), 1e-12):
        raise AssertionError(f"the text says {name} is about {typed:g}, but this run measured {measured:g} "
                             f"(more than {rel:.0%} apart): update the text")


def spread(values) -> tuple:
    """(median, half the range) of repeated measurements."""
    v = sorted(float(x) for x in values)
    return v[len(v) // 2], (v[-1] - v[0]) / 2


def verdict(name_a: str, a, name_b: str, b, what: str = "time", lower_is_better: bool = True) -> str:
    """Compare two lists of repeated measurements (taken alternately): 'A: x1.8 lower ms than B (...)' or
    'A and B: ... within noise (...)'.
    The difference counts only when the two ranges do not overlap."""
    ma, sa = spread(a)
    mb, sb = spread(b)
    if time_change(a, b) == "within noise":  # the one noise rule of every verdict here
        return f"{name_a} and {name_b}: {what} within noise ({ma:.3g} ± {sa:.2g} vs {mb:.3g} ± {sb:.2g})"
    a_wins = (ma < mb) == lower_is_better
    (win, vw), (lose, vl) = ((name_a, ma), (name_b, mb)) if a_wins else ((name_b, mb), (name_a, ma))
    ratio = max(ma, mb) / max(min(ma, mb), 1e-12)
    side = "lower" if lower_is_better else "higher"
    return f"{win}: x{ratio:.2f} {side} {what} than {lose} ({vw:.3g} vs {vl:.3g}; ranges do not overlap)"


# ---- fast and repeatable on a busy laptop; shipped results; figures (notebooks 00-02, issue 12) -----------
FULL = os.environ.get("MINILLAMA_FULL", "0") == "1"  # 1: rerun the long experiments instead of loading them
RESULTS = REPO / "notebooks" / "results"  # the full results the repo ships, each with the command that made it
FIGURES = REPO / "runs" / "notebooks"  # where the notebooks save their figures (not committed)


def fix_threads(n=None) -> int:
    """Fix torch's intra-op threads (MINILLAMA_THREADS, default 1) and return the number.

    A fixed count gives the same floating-point sums, hence the same greedy tokens, on every run. One
    thread because the tiny model is too small to gain from more, and on a laptop busy with other
    programs two torch threads spend their time waiting for each other."""
    n = int(n or os.environ.get("MINILLAMA_THREADS", "1"))
    torch.set_num_threads(n)
    return n


def load_shipped(name: str, command: str = "the command named in this cell") -> dict:
    """The shipped results file notebooks/results/<name> (".json" added when the name has no suffix);
    `command` is what regenerates it."""
    import json

    path = RESULTS / (name if Path(name).suffix else f"{name}.json")
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: regenerate it with `{command}` (or set MINILLAMA_FULL=1).")
    return json.loads(path.read_text())


def shipped_note(meta: dict, command: str = None) -> str:
    """One line saying where and when shipped numbers were measured, and by which command. Either (meta,
    command), or one shipped dict {"command", "measured": {device, torch, date, threads, load}}."""
    if command is None:
        m = meta["measured"]
        return (f"**Shipped** (`{meta['command']}`): measured on {m['device']}, torch {m['torch']}, {m['date']}, "
                f"torch threads: {m['threads']}, machine load average {m['load']} (a shared machine: its timings are "
                f"noisy, its memory numbers exact and load-independent).")
    return (f"*Shipped numbers: measured on {meta.get('device', '?')}, torch {meta.get('torch', '?')}, "
            f"{meta.get('date', 'date not recorded')}, by `{command}`.*")


def show_figure(fig, name: str) -> Path:
    """Save a matplotlib figure under runs/notebooks/ (measuring.report.save_figure: at most ~1,400 px wide)
    and display it; a pyplot figure is closed, so that the notebook does not draw it a second time."""
    from IPython.display import Image, display

    FIGURES.mkdir(parents=True, exist_ok=True)
    path = report.save_figure(fig, FIGURES / name)
    if fig.canvas.manager is not None:  # made by pyplot (a plain Figure has no manager)
        import matplotlib.pyplot as plt

        plt.close(fig)
    display(Image(filename=str(path)))
    return path


def time_alternating(steps: dict, rounds: int = 5, warmup: int = 1) -> dict:
    """Seconds per call of each step function on DEVICE, in alternation (a, b, c, c, b, a, ...) so that a change in
    the machine's load hits every configuration alike, CUDA synchronised around each call: the harness's one
    alternating timer, minillama.measuring.measure.alternate_times. Returns {name: [seconds per round]}."""
    return alternate_times(steps, DEVICE, rounds, warmup=warmup)


def train_step_fn(cfg: dict):
    """One training step of a fresh model under a bench config dict (train mode at BATCH x SEQ), to time."""
    return bench.build_step(make_model, {"mode": "train", "batch": BATCH, "seq_len": SEQ, **cfg})["step"]


def time_settings(settings: dict, rounds: int = 3, gpu_mem=None) -> dict:
    """Seconds per training step of each setting ({name: bench config dict}, train mode at BATCH x SEQ):
    alternated (time_alternating) when all their models fit on the device at once, as on the CPU; on a GPU where
    they do not (Llama-2-7B: one full fine-tune fills an 80 GiB card), each built, timed and freed in turn. A
    setting that does not fit the card alone is skipped with its reason (rows_that_fit)."""
    import gc

    configs = {k: {"mode": "train", "batch": BATCH, "seq_len": SEQ, **c} for k, c in settings.items()}
    fit, skipped = rows_that_fit(list(configs.values()), gpu_mem)
    for cfg, why in skipped:
        print(f"skipped {bench.config_name(cfg)}: {why}")
    kept = {k: c for k, c in configs.items() if any(c is f for f in fit)}
    on_cpu = gpu_mem is None and not DEVICE.startswith("cuda")
    if on_cpu or _fit_together(list(kept.values()), gpu_mem):
        return time_alternating({k: train_step_fn(c) for k, c in kept.items()}, rounds=rounds)
    print("the models do not fit on the card together: each setting timed alone, one after the other")
    times = {}
    for k, c in kept.items():
        times[k] = time_alternating({k: train_step_fn(c)}, rounds=rounds)[k]
        gc.collect()  # the step's model and optimizer go before the next setting is built
        if DEVICE.startswith("cuda"):
            torch.cuda.empty_cache()
    return times


def _fit_together(configs, gpu_mem=None) -> bool:
    """Whether the memory model's peaks of these configs, added up, fit the card (the planner's usable bytes)."""
    from minillama.measuring.plan import usable_bytes

    args = _model_args()
    need = sum(bench.predict_config(args, c, param_dtype=DTYPE, device="cuda").peak_bytes for c in configs)
    return need <= usable_bytes(_card_bytes(gpu_mem), "cuda")


# --- notebooks 00-01 ---
# Notebook 00 benchmarks a preset's shape (section 5): the shipped tiny model on a laptop, "llama2-7b" in the GPU lab.
PRESET = os.environ.get("MINILLAMA_PRESET", "tiny")
# Its weights: MINILLAMA_MODEL when set, the shipped tiny model for the tiny preset, else None (random weights).
PRESET_MODEL_PATH = MODEL_PATH if "MINILLAMA_MODEL" in os.environ or PRESET == "tiny" else None


def repeats_ngram(ids, n: int) -> bool:
    """Whether some run of n consecutive tokens occurs twice in ids (greedy decoding falling into a loop)."""
    seen = set()
    for i in range(len(ids) - n + 1):
        key = tuple(ids[i:i + n])
        if key in seen:
            return True
        seen.add(key)
    return False


# --- notebooks 02-04 ---
def time_change(times, base_times) -> str:
    """'x1.23 faster', 'x1.10 slower' or 'within noise': step times taken alternately in one run against the base's;
    a difference counts only when the ranges of the repeats do not overlap (the rule of `verdict`)."""
    m, s = spread(times)
    mb, sb = spread(base_times)
    if abs(m - mb) <= s + sb:
        return "within noise"
    return f"x{max(m, mb) / max(min(m, mb), 1e-12):.2f} {'faster' if m < mb else 'slower'}"


def step_verdict(name: str, times, base_name: str, base_times, what: str = "step") -> str:
    """One plain sentence: 'bf16 AMP: x1.23 faster step than fp32 (ranges do not overlap)', or 'bf16 AMP against
    fp32: step time within noise (ranges overlap)'; `what` names what was timed."""
    change = time_change(times, base_times)
    if change == "within noise":
        return f"{name} against {base_name}: {what} time within noise (ranges overlap)"
    return f"{name}: {change} {what} than {base_name} (ranges do not overlap)"


def memory_time_table(memory: dict, times: dict, base, predicted: dict = None, base_name: str = None,
                      context: str = "") -> str:
    """Markdown: one line per setting with its memory at the peak by category and in all (MiB; memory:
    {setting: {category: bytes}}), the memory model's peak (predicted: {setting: bytes}, optional) and the step
    time taken alternately in this run (times: {setting: [seconds per round]}, median ± half the range) with its
    change against its base, side by side. base: one setting, or {setting: its base setting}; base_name: what the
    last column's header calls the base (default: the base setting's name); context: what every row shares (batch,
    sequence length, dtype, model), said above the table with the device."""
    bases = base if isinstance(base, dict) else {name: base for name in memory}
    head = ["setting", *CATEGORIES, "peak", *(["predicted peak"] if predicted else []),
            "step ms (alternated)", f"time vs {base_name or base}"]
    rows = []
    for name, cats in memory.items():
        t, b = times.get(name), bases.get(name)
        ms = "-" if t is None else "{:.1f} ± {:.1f}".format(*(1000 * v for v in spread(t)))
        change = "-" if t is None or b not in times else "base" if name == b else time_change(t, times[b])
        cells = [name, *(f"{cats.get(c, 0) / MiB:.2f}" for c in CATEGORIES), f"**{sum(cats.values()) / MiB:.2f}**",
                 *([f"{predicted[name] / MiB:.2f}"] if predicted else []), ms, change]
        rows.append(cells)
    above = (f"{context + ': ' if context else ''}MiB (1024**2 bytes) at the peak of one training step, by category; "
             f"step time in ms over {len(next(iter(times.values()), []))} alternated rounds (median ± half the range) "
             f"[{where(DEVICE)}]")
    return report.table(head, rows, "md", above=above)


# --- notebooks 05-07 ---
def ms(seconds) -> str:
    """Alternated step times as 'median ± half the range' in ms (spread)."""
    med, half = spread(seconds)
    return f"{1000 * med:.0f} ± {1000 * half:.0f}"


def time_verdict(a, base: str, b) -> str:
    """time_change as a phrase: 'x1.23 faster than <base> (ranges do not overlap)' or 'within noise of <base>
    (ranges overlap)'."""
    change = time_change(a, b)
    if change == "within noise":
        return f"within noise of {base} (ranges overlap)"
    return f"{change} than {base} (ranges do not overlap)"


def rows_memory_time_table(rows, times=None, labels=None, base=None) -> str:
    """Markdown for bench rows: one row per measured config (label: what differs, report.short_labels, unless
    `labels`), MiB at the peak by category, peak measured and predicted; with `times` (one list of alternated
    seconds per row) the step time in ms, and with `base` (a row index) each row's time_verdict against it."""
    shared, short = report.short_labels(rows, list(bench.DIMENSIONS))
    labels = labels or short
    heads = ["", *(c.replace("_", " ") for c in CATEGORIES), "peak", "predicted"]
    heads += (["step ms (alternated)"] if times else []) + (["step time"] if times and base is not None else [])
    cells = []
    for i, (r, label) in enumerate(zip(rows, labels)):
        row = [label] + [f"{r['memory_by_category'][c] / MiB:.2f}" for c in CATEGORIES]
        row += [f"**{r['peak_memory_bytes'] / MiB:.2f}**", f"{r['predicted_peak_memory_bytes'] / MiB:.2f}"]
        row += [ms(times[i])] if times else []
        if times and base is not None:
            row += ["baseline" if i == base else time_verdict(times[i], labels[base], times[base])]
        cells.append(row)
    return report.table(heads, cells, "md", above=f"{shared}; MiB (1024**2 bytes) at each row's peak")


def effects_table(effects, keys=("parameters", "gradients", "optimizer state", "activations", "peak memory",
                                 "FLOPs per step")) -> str:
    """bench.technique_effects as markdown, only the quantities in `keys` (memory and FLOPs: exact, whatever
    the machine's load; step time is left out, since shipped timings under load draw no conclusion)."""
    return bench.format_effects(effects, keys)
