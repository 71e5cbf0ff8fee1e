"""Peak host memory while loading a checkpoint, against its size on disk (a benchmark, not a test).

    python benchmarks/load_memory.py --preset llama2-7b --format hf      # writes ~13.5 GB to a temp dir
    python benchmarks/load_memory.py --preset tiny --format meta
    python benchmarks/load_memory.py --preset llama2-7b --load-in-4bit   # quantised while reading (NF4 + DQ)

A random-weight checkpoint of the preset is written in bf16 (HF shards of 2 GiB, or Meta .pth), then a
fresh process loads it with `minillama.load_model` and reports its peak resident memory (ru_maxrss).
Building on the meta device and assigning the loaded tensors means the peak should be about one copy
of the weights plus the interpreter, never an fp32 copy (2x) or a model-plus-state-dict (2x).
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

GiB = 1024**3


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def write(preset: str, fmt: str, out: str) -> None:
    import torch

    import minillama

    t0 = time.perf_counter()
    model = minillama.create_model(minillama.get_preset(preset), dtype=torch.bfloat16, seed=0)
    minillama.save_model(model, out, format=fmt, max_shard_bytes=2 * GiB)
    print(json.dumps({"write_s": time.perf_counter() - t0}))


def load(path: str, load_in_4bit: bool = False) -> None:
    import torch

    import minillama

    base = peak_rss_bytes()
    t0 = time.perf_counter()
    model = minillama.load_model(path, load_in_4bit=load_in_4bit)
    load_s = time.perf_counter() - t0
    after_load = peak_rss_bytes()
    with torch.no_grad():  # touch every weight once (an mmap-backed Meta checkpoint is read lazily)
        model(torch.ones(1, 8, dtype=torch.long))
    print(json.dumps({"rss_before_bytes": base, "peak_after_load_bytes": after_load,
                      "peak_after_forward_bytes": peak_rss_bytes(), "load_s": load_s,
                      "param_bytes": sum(t.numel() * t.element_size() for t in [*model.parameters(),
                                                                                  *model.buffers()]),
                      "dtype": str(next(model.parameters()).dtype), "torch": torch.__version__}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="llama2-7b")
    p.add_argument("--format", default="hf", choices=["hf", "meta", "native"])
    p.add_argument("--dir", default=None, help="where to write the checkpoint (default: a temporary directory)")
    p.add_argument("--load-in-4bit", action="store_true", help="load with load_in_4bit=True (NF4, double quant)")
    p.add_argument("--_write", help=argparse.SUPPRESS)
    p.add_argument("--_load", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a._write:
        return write(a.preset, a.format, a._write)
    if a._load:
        return load(a._load, a.load_in_4bit)

    with tempfile.TemporaryDirectory(dir=a.dir) as tmp:
        ckpt = Path(tmp) / "ckpt"
        run = lambda *args: json.loads(subprocess.run(  # noqa: E731
            [sys.executable, __file__, "--preset", a.preset, "--format", a.format, *args],
            check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1])
        w = run("--_write", str(ckpt))
        disk = sum(f.stat().st_size for f in ckpt.iterdir())
        r = run("--_load", str(ckpt), *(["--load-in-4bit"] if a.load_in_4bit else []))
    rows = [
        ("preset / format / dtype", f"{a.preset} / {a.format} / {r['dtype']}"),
        ("machine", f"{platform.machine()}, {platform.processor() or 'cpu'}; torch {r['torch']}"),
        ("checkpoint size on disk", f"{disk / GiB:.2f} GiB"),
        ("parameter + buffer bytes" + (" (4-bit model)" if a.load_in_4bit else ""),
         f"{r['param_bytes'] / GiB:.3f} GiB"),
        ("RSS before loading", f"{r['rss_before_bytes'] / GiB:.2f} GiB (python + torch)"),
        ("peak RSS after load_model", f"{r['peak_after_load_bytes'] / GiB:.2f} GiB"),
        ("peak RSS after a forward", f"{r['peak_after_forward_bytes'] / GiB:.2f} GiB"),
        ("(peak - before) / size on disk", f"{(r['peak_after_forward_bytes'] - r['rss_before_bytes']) / disk:.3f}"),
        ("(peak - before) / loaded model bytes",
         f"{(r['peak_after_forward_bytes'] - r['rss_before_bytes']) / r['param_bytes']:.3f}"),
        ("load time", f"{r['load_s']:.1f} s (write took {w['write_s']:.1f} s)"),
    ]
    print("| quantity | value |\n| --- | --- |")
    for k, v in rows:
        print(f"| {k} | {v} |")


if __name__ == "__main__":
    main()
