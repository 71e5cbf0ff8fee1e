"""How long one redraw of notebook 00's "will it fit?" explorer takes (a benchmark, not a test).

    python benchmarks/fit_explorer_redraw.py [--rounds 5]

A redraw is what the widgets run on every change: the planner over every candidate configuration
(`fit_answer`: `minillama.measuring.plan.plan`), the stacked bar (`draw`) and its PNG, as the inline backend
sends it to the browser. Questions as a student moves the controls: each preset and method, short and long
sequences, with and without checkpointing. The tiny preset's first redraw of a configuration measures it on
this machine (bench.run_config: seconds); later redraws read the cache; both are printed apart.
In the browser (tests/test_browser.py) the same redraw adds the widget round trip; that test prints it.

Measured 2026-12-07 on x86_64 (AMD EPYC, 2 cores shared with other jobs), torch 2.13.0 CPU, matplotlib 3.11.2:
  load average 2.5:  redraw median 0.146 s, max 0.305 s; tiny first (measures) 1.86 s, cached 0.109 s
  load average 14.6: redraw median 0.724 s, max 1.422 s; tiny first 5.48 s, cached 0.303 s (an earlier draw
  through pyplot at 100 dpi; now a plain Figure at 80 dpi)
"""

from __future__ import annotations

import argparse
import io
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import matplotlib

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "notebooks"))
import _explorer  # noqa: E402
import torch  # noqa: E402

QUESTIONS = [dict(preset=p, method=m, seq_len=s, checkpointing=c)
             for p in ("llama2-7b", "llama2-13b", "llama3-8b") for m in _explorer.METHODS
             for s in (512, 4096) for c in (False, True)]
TINY = dict(preset="tiny", method="lora", weights="fp32+amp", seq_len=128, batch=4)


def redraw(q: dict) -> float:
    t0 = time.perf_counter()
    _explorer.draw(_explorer.fit_answer(**q)).savefig(io.BytesIO(), format="png", dpi=80)  # as _explorer.show
    return time.perf_counter() - t0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=3, help="times every question is redrawn")
    a = p.parse_args(argv)
    torch.set_num_threads(1)  # as the notebooks (fix_threads)
    redraw(QUESTIONS[0])  # warm-up: matplotlib's first figure loads fonts
    times = [redraw(q) for _ in range(a.rounds) for q in QUESTIONS]
    first_tiny = redraw(TINY)
    cached_tiny = [redraw(TINY) for _ in range(a.rounds)]
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} logical CPUs, load average {load:.1f}, "
          f"torch {torch.__version__}, matplotlib {matplotlib.__version__}, 1 torch thread")
    print(f"redraw, 7B-13B presets ({len(times)} redraws): median {statistics.median(times):.3f} s, "
          f"max {max(times):.3f} s")
    print(f"redraw, tiny preset: first (measures) {first_tiny:.2f} s, cached median "
          f"{statistics.median(cached_tiny):.3f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
