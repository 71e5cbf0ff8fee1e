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

Writes to --out: results.json (rows + settings + environment), results.csv, table.md (with the device, driver,
torch version and date), speed.png, memory.png; prints the table. Installs nothing; needs torch, transformers
and peft (bitsandbytes optional), and runs from a checkout without installing minillama.
"""

from __future__ import annotations

import time

START = time.monotonic()  # the budget counts the imports too

import argparse  # noqa: E402
import datetime  # noqa: E402
import json  # noqa: E402
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


def run_lab(s: Settings, rows, budget_s: float) -> list[dict]:
    """Every row that fits, in order; each printed as it finishes."""
    results, slowest = [], None  # seconds of the slowest measured row so far
    guess = FIRST_ROW_GUESS_S["cuda" if s.device.startswith("cuda") else "cpu"]
    for row in select_rows(rows):
        left = budget_s - (time.monotonic() - START)
        why = fits(row, s, left, guess if slowest is None else slowest)
        if why:
            r = {**row_header(row, s), "skipped": why, "predicted_peak_memory_bytes": predicted_peak(row, s)}
        else:
            t0 = time.monotonic()
            r = compare_row(row, s)
            r["row_seconds"] = time.monotonic() - t0
            if "skipped" not in r:
                slowest = max(slowest or 0.0, r["row_seconds"])
        results.append(r)
        print(format_compare([r], "text", header=len(results) == 1), flush=True)
    return results


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--budget-s", type=float, default=420.0, help="seconds for the whole run, start-up included")
    p.add_argument("--preset", default=None, help="default: llama2-7b on CUDA, tiny without it")
    p.add_argument("--device", default=None, help="default: cuda when present, else cpu")
    p.add_argument("--rows", default=None, help="comma-separated rows (default: all, in order of importance)")
    p.add_argument("--repeats", type=int, default=None, help="timed steps per implementation and row")
    p.add_argument("--compile-hf", action="store_true",
                   help="in the *-compiled rows, compile HF's decoder layers too (default: HF eager)")
    a = p.parse_args(argv)
    device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    preset = a.preset or ("llama2-7b" if device.startswith("cuda") else "tiny")
    extra = {"repeats": a.repeats} if a.repeats else {}
    extra["compile_hf"] = a.compile_hf
    s = Settings.defaults(preset, device, **extra)
    env = environment(device)
    print(f"GPU lab: preset {preset} (random weights) on {device}, budget {a.budget_s:.0f} s; {env}", flush=True)
    results = run_lab(s, a.rows, a.budget_s)
    paths = write_compare(results, a.out, s)
    doc = json.loads(paths["json"].read_text())
    doc.update(environment=env, budget_s=a.budget_s, total_s=time.monotonic() - START)
    atomic_write_text(paths["json"], json.dumps(doc, indent=2, default=str))
    header = " | ".join(f"{k}: {v}" for k, v in env.items() if v is not None)
    atomic_write_text(paths["md"], f"{header}\n\n{format_compare(results, 'md', settings=s)}\n")
    print()
    print(header)
    print(format_compare(results, "md", settings=s))
    print(f"\n{describe_compare(results, s)}\nwrote {a.out}: results.json, results.csv, table.md, speed.png, "
          f"memory.png in {time.monotonic() - START:.0f} s of a {a.budget_s:.0f} s budget")
    return 0


if __name__ == "__main__":
    sys.exit(main())
