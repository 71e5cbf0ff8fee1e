"""The GPU lab in one process: minillama beside HF transformers + PEFT, the whole table within a time budget.

    python benchmarks/gpu_lab.py --out notebooks/results/gpu            # on a lab GPU: llama2-7b shape, random weights
    python benchmarks/gpu_lab.py --out /tmp/lab --preset tiny --budget-s 60   # the CPU rehearsal (no CUDA)

Runs the rows of minillama.measuring.compare.ROWS in their order of importance (LoRA q/v, LoRA all linears,
full fine-tuning of a smaller shape, inference, QLoRA, long context, the checkpointing rows, then the same LoRA and
full rows with minillama's blocks torch.compiled). Before a row,
it checks that it fits: in time (the slowest row so far, plus a margin, must fit in what is left of the budget,
which counts from the start of this process, imports included) and, on CUDA, in memory (the memory model's
prediction for both implementations must fit in the free device memory). A row that does not fit, runs out of
memory, or needs a package that is missing (bitsandbytes) is recorded with the reason and the prediction.
Any other error of a row (a CUDA library that fails to load, a version mismatch) is recorded in that row too,
the memory it held is freed, and the lab goes on. A started row is stopped when the budget runs out, and a
SIGTERM (Slurm's time limit) stops the lab after recording the running row.

Each row is appended to --out/rows.jsonl as it finishes (flushed to disk), and the tables are written from that
file at the end, so a crash or a kill keeps every finished row. Writes to --out: rows.jsonl, results.json (rows +
settings + environment), results.csv, table.md (with the device, driver, torch version and date), speed.png,
memory.png; prints the table. Installs nothing; needs torch, transformers and peft (bitsandbytes optional), and
runs from a checkout without installing minillama.
"""

from __future__ import annotations

import time

START = time.monotonic()  # the budget counts the imports too

import argparse  # noqa: E402
import datetime  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout's minillama, installed or not

import torch  # noqa: E402

from minillama.files import atomic_write_text  # noqa: E402
from minillama.measuring.compare import (Settings, compare_row, describe_compare, format_compare,  # noqa: E402
                                         predicted_peak, row_header, select_rows, write_compare)

FIRST_ROW_GUESS_S = {"cuda": 60.0, "cpu": 20.0}  # before any row has run: a guess of one row's seconds
MARGIN = 1.2  # a row may take this much longer than the slowest row so far
COMPILE_GUESS_S = {"cuda": 90.0, "cpu": 40.0}  # a *-compiled row takes this much more: its first step compiles


def environment(device: str) -> dict:
    """Device, driver, versions and date, for the table's header and results.json."""
    env = {"date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
           "torch": torch.__version__, "cuda": torch.version.cuda, "python": sys.version.split()[0]}
    if device.startswith("cuda"):
        props = torch.cuda.get_device_properties(torch.device(device))
        env.update(device_name=props.name, device_memory_bytes=props.total_memory)
        try:
            env["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                           capture_output=True, text=True, timeout=20).stdout.strip().splitlines()[0]
        except (OSError, subprocess.SubprocessError, IndexError):
            env["driver"] = None
    return env


def fits(row, s: Settings, left_s: float, slowest_s: float) -> str:
    """'' if the row may run now, else why not (time or memory)."""
    compiling = COMPILE_GUESS_S["cuda" if s.device.startswith("cuda") else "cpu"] if row.compiled else 0.0
    if (slowest_s + compiling) * MARGIN > left_s:
        return (f"would not fit in the time left ({left_s:.0f} s of the budget; the slowest row so far took "
                f"{slowest_s:.0f} s" + (f", and compiling takes about {compiling:.0f} s more)" if compiling else ")"))
    if s.device.startswith("cuda"):
        need, free = predicted_peak(row, s), torch.cuda.mem_get_info(torch.device(s.device))[0]
        if need is not None and 2 * need > free:  # both implementations are resident at once
            return (f"would not fit in memory: predicted {need / 2**30:.1f} GiB per implementation, "
                    f"{free / 2**30:.1f} GiB free")
    return ""


class OverBudget(BaseException):
    """Raised inside a running row when the budget runs out (SIGALRM). A BaseException, so that compare_row's
    own handlers let it through."""


class Killed(BaseException):
    """Raised when the job is being killed (SIGTERM: Slurm's time limit, scancel): the lab records the running
    row and writes its tables."""


def _stop(signum, _frame):
    if signum == signal.SIGALRM:
        raise OverBudget("stopped at the time budget")
    raise Killed(f"killed by {signal.Signals(signum).name} (a job's time limit or scancel)")


def free_memory() -> None:
    """After a failed row: collect the tensors its traceback and reference cycles still held, and give the
    CUDA allocator's cached blocks back, so that the next row starts from a clean device."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def run_one(row, s: Settings, left_s: float) -> tuple[dict, bool]:
    """compare_row under a timer of `left_s` seconds (SIGALRM: the row stops at its next Python instruction).
    Returns (the row's result, whether the lab must stop: a SIGTERM). Any error is recorded in the row (its
    type and first line) instead of ending the lab."""
    out, stop = None, False
    signal.signal(signal.SIGALRM, _stop)
    t0 = time.monotonic()
    try:
        signal.setitimer(signal.ITIMER_REAL, max(left_s, 0.01))
        out = compare_row(row, s)
    except (Exception, OverBudget, Killed) as e:
        first = str(e).splitlines()[0] if str(e) else ""
        out = {**row_header(row, s), "error": f"{type(e).__name__}: {first[:300]}",
               "predicted_peak_memory_bytes": predicted_peak(row, s)}
        stop = isinstance(e, Killed)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
    if "error" in out:
        free_memory()  # the exception (and its frames) are gone now: their tensors can be freed
    out["row_seconds"] = time.monotonic() - t0
    return out, stop


def append_row(path: Path, row: dict) -> None:
    """One JSON line per finished row, flushed to disk at once: a later crash or kill keeps it."""
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(row, default=str) + "\n")
        f.flush()
        os.fsync(f.fileno())


def read_rows(path: Path) -> list[dict]:
    """The rows of a JSONL file; a last line cut by a kill is left out."""
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def run_lab(s: Settings, rows, budget_s: float, jsonl: Path) -> list[dict]:
    """Every row that fits, in order; each appended to `jsonl` and printed as it finishes. A started row is
    stopped at the budget (the rows after it are skipped for time); SIGTERM stops the lab after recording the
    running row. Returns the rows."""
    results, slowest = [], None  # seconds of the slowest measured row so far
    guess = FIRST_ROW_GUESS_S["cuda" if s.device.startswith("cuda") else "cpu"]
    previous = signal.signal(signal.SIGTERM, _stop)
    try:
        for row in select_rows(rows):
            left = budget_s - (time.monotonic() - START)
            why = fits(row, s, left, guess if slowest is None else slowest)
            stop = False
            if why:
                r = {**row_header(row, s), "skipped": why, "predicted_peak_memory_bytes": predicted_peak(row, s)}
            else:
                r, stop = run_one(row, s, left)
                if "skipped" not in r and "error" not in r:
                    slowest = max(slowest or 0.0, r["row_seconds"])
            append_row(jsonl, r)
            results.append(r)
            print(format_compare([r], "text", header=len(results) == 1), flush=True)
            if stop:
                break
    finally:
        signal.signal(signal.SIGTERM, previous)
    return results


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--budget-s", type=float, default=420.0, help="seconds for the whole run, start-up included")
    p.add_argument("--preset", default=None, help="default: llama2-7b on CUDA, tiny without it")
    p.add_argument("--device", default=None, help="default: cuda when present, else cpu")
    p.add_argument("--rows", default=None, help="comma-separated rows (default: all, in order of importance)")
    p.add_argument("--repeats", type=int, default=None, help="timed steps per implementation and row")
    p.add_argument("--batch", type=int, default=None, help="rows per step (default: 2 on CUDA, 4 on the CPU)")
    p.add_argument("--seq-len", type=int, default=None, help="tokens per row (default: 512 on CUDA, 128 on the CPU)")
    p.add_argument("--compile-hf", action="store_true",
                   help="in the *-compiled rows, compile HF's decoder layers too (default: HF eager)")
    a = p.parse_args(argv)
    device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    preset = a.preset or ("llama2-7b" if device.startswith("cuda") else "tiny")
    extra = {k: v for k, v in (("repeats", a.repeats), ("batch", a.batch), ("seq_len", a.seq_len)) if v}
    extra["compile_hf"] = a.compile_hf
    s = Settings.defaults(preset, device, **extra)
    env = environment(device)
    print(f"GPU lab: preset {preset} (random weights) on {device}, budget {a.budget_s:.0f} s; {env}", flush=True)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    jsonl = out / "rows.jsonl"
    jsonl.unlink(missing_ok=True)  # this run's rows only
    try:
        run_lab(s, a.rows, a.budget_s, jsonl)
    except Killed as e:  # between rows: nothing was running, every finished row is on disk
        print(f"{e}: writing the tables of the finished rows", flush=True)
    results = read_rows(jsonl)  # the tables come from what reached the disk
    paths = write_compare(results, a.out, s)
    doc = json.loads(paths["json"].read_text())
    doc.update(environment=env, budget_s=a.budget_s, total_s=time.monotonic() - START)
    atomic_write_text(paths["json"], json.dumps(doc, indent=2, default=str))
    header = " | ".join(f"{k}: {v}" for k, v in env.items() if v is not None)
    atomic_write_text(paths["md"], f"{header}\n\n{format_compare(results, 'md', settings=s)}\n")
    print()
    print(header)
    print(format_compare(results, "md", settings=s))
    print(f"\n{describe_compare(results, s)}\nwrote {a.out}: rows.jsonl, results.json, results.csv, table.md, "
          f"speed.png, memory.png in {time.monotonic() - START:.0f} s of a {a.budget_s:.0f} s budget")
    return 0


if __name__ == "__main__":
    sys.exit(main())
