"""Where a training step of minillama spends its time: torch.profiler's top operators (a benchmark, not a test).

    python benchmarks/profile_step.py                       # tiny preset, LoRA r=16 on wq, wv, batch 4 x 128, CPU
    python benchmarks/profile_step.py --full --top 15       # full fine-tuning
    python benchmarks/profile_step.py --impl hf             # the same step through transformers + PEFT
    python benchmarks/profile_step.py --row lora-qv-compiled   # minillama's blocks torch.compiled

Builds the model (and its HF twin, for --impl hf) as `minillama bench --compare hf` does, takes two warm-up
steps, then profiles `--steps` steps and prints the operators sorted by their own (self) CPU time, and by CUDA
time on a GPU. Profile before optimising, and again after: the operators that moved are the evidence.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

from minillama.measuring.compare import ROWS, Settings, _train_steps, build_pair, make_batch, row_shape  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="tiny")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--row", default=None, help=f"one of {list(ROWS)} (default: lora-qv, or full with --full)")
    p.add_argument("--full", action="store_true", help="full fine-tuning (the 'full' row)")
    p.add_argument("--impl", default="minillama", choices=("minillama", "hf"))
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--top", type=int, default=12)
    a = p.parse_args(argv)
    row = ROWS[a.row or ("full" if a.full else "lora-qv")]
    s = Settings.defaults(a.preset, a.device)
    ours, hf, args = build_pair(row, s)
    _, batch, seq = row_shape(row, s)
    inputs, targets = make_batch(args.vocab_size, batch, seq, s.seed, torch.device(a.device))
    _, _, step = _train_steps(ours, hf, inputs, targets, s, {})[a.impl]
    for _ in range(2):
        step()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if a.device.startswith("cuda") else [])
    with profile(activities=activities, profile_memory=True) as prof:
        for _ in range(a.steps):
            step()
    key = "self_cuda_time_total" if a.device.startswith("cuda") else "self_cpu_time_total"
    print(f"{a.impl}, row {row.name}, preset {a.preset}, batch {batch} x {seq}, {a.steps} steps, on {a.device}")
    print(prof.key_averages().table(sort_by=key, row_limit=a.top, max_name_column_width=40))
    return 0


if __name__ == "__main__":
    sys.exit(main())
