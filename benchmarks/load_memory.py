"""Peak host memory while loading a checkpoint, against its size on disk (a benchmark, not a test).

    python benchmarks/load_memory.py --preset llama2-7b --format hf      # writes ~13.5 GB to a temp dir
    python benchmarks/load_memory.py --preset tiny --format meta
    python benchmarks/load_memory.py --preset llama2-7b --load-in-4bit   # quantised while reading (NF4 + DQ)
    python benchmarks/load_memory.py --preset llama2-7b --load-in-4bit --n-layers 2,4   # bounded: see below

--n-layers 2,4 keeps the preset's shapes (dim, heads, FFN, vocabulary) but writes checkpoints of 2 and 4
layers only, measures each, and extrapolates to the preset's layer count along the straight line through the
two points (every layer has the same shapes, so the cost per layer is the slope; the intercept is what does
not depend on the layer count: embeddings, output head, interpreter). For a machine whose disk or time does not
allow the full 13.5 GB checkpoint; the extrapolated row says so.

Two kinds of resident memory are reported apart: anonymous (tensors, the heap: what the loader itself holds) and
file-backed (pages of the memory-mapped safetensors shards). Measured with llama2-7b shapes (1 and 3 layers, bf16
HF shards, NF4 + double quantisation): the file-backed pages grow to the size of the checkpoint while it is being
read (the shards stay mapped until load_model returns; the kernel may drop such clean pages under pressure), so
ru_maxrss grows by about the bf16 size per layer; the anonymous peak grows by about the 4-bit size per layer plus
allocator slack, above a constant for the quantiser's temporaries of the largest tensor.

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
import threading
import time
from pathlib import Path

GiB = 1024**3


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def preset_args(preset: str, n_layers: int = 0):
    import minillama

    args = minillama.get_preset(preset)
    return args.replace(n_layers=n_layers) if n_layers else args


def write(preset: str, fmt: str, out: str, n_layers: int = 0) -> None:
    import torch

    import minillama

    t0 = time.perf_counter()
    model = minillama.create_model(preset_args(preset, n_layers), dtype=torch.bfloat16, seed=0)
    minillama.save_model(model, out, format=fmt, max_shard_bytes=2 * GiB)
    print(json.dumps({"write_s": time.perf_counter() - t0}))


def rss_parts() -> dict:
    """RssAnon (the process's own memory: tensors, heap) and RssFile (pages of memory-mapped files, such as a
    safetensors checkpoint being read; clean, so the kernel may drop them under pressure), in bytes."""
    with open("/proc/self/status") as f:
        return {k: int(v.split()[0]) * 1024 for k, v in (line.split(":", 1) for line in f)
                if k in ("RssAnon", "RssFile")}


class AnonPeak(threading.Thread):
    """Samples RssAnon every few milliseconds (ru_maxrss counts file-backed pages too)."""

    def __init__(self):
        super().__init__(daemon=True)
        self.peak, self.running = rss_parts().get("RssAnon", 0), True

    def run(self):
        while self.running:
            self.peak = max(self.peak, rss_parts().get("RssAnon", 0))
            time.sleep(0.005)


def load(path: str, load_in_4bit: bool = False) -> None:
    import torch

    import minillama

    base, anon_base = peak_rss_bytes(), rss_parts().get("RssAnon", 0)
    sampler = AnonPeak()
    sampler.start()
    t0 = time.perf_counter()
    model = minillama.load_model(path, load_in_4bit=load_in_4bit)
    load_s = time.perf_counter() - t0
    after_load, file_after_load = peak_rss_bytes(), rss_parts().get("RssFile", 0)
    sampler.running = False
    sampler.join()
    with torch.no_grad():  # touch every weight once (an mmap-backed Meta checkpoint is read lazily)
        model(torch.ones(1, 8, dtype=torch.long))
    print(json.dumps({"rss_before_bytes": base, "peak_after_load_bytes": after_load,
                      "anon_before_bytes": anon_base, "anon_peak_load_bytes": sampler.peak,
                      "file_rss_after_load_bytes": file_after_load,
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
    p.add_argument("--n-layers", default="", help="e.g. 2,4: measure these layer counts of the preset's shape and "
                                                  "extrapolate to its full depth (bounded disk and time)")
    p.add_argument("--_write", help=argparse.SUPPRESS)
    p.add_argument("--_load", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a._write:
        return write(a.preset, a.format, a._write, int(a.n_layers or 0))
    if a._load:
        return load(a._load, a.load_in_4bit)
    if a.n_layers:
        return extrapolate(a, [int(n) for n in a.n_layers.split(",")])
    print_table(a, *measure(a))


def measure(a, n_layers: int = 0) -> tuple[dict, dict, int]:
    """Write a bf16 checkpoint in a fresh process, load it in another; (write info, load info, bytes on disk)."""
    with tempfile.TemporaryDirectory(dir=a.dir) as tmp:
        ckpt = Path(tmp) / "ckpt"
        run = lambda *args: json.loads(subprocess.run(  # noqa: E731
            [sys.executable, __file__, "--preset", a.preset, "--format", a.format, *args],
            check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1])
        w = run("--_write", str(ckpt), *(["--n-layers", str(n_layers)] if n_layers else []))
        disk = sum(f.stat().st_size for f in ckpt.iterdir())
        r = run("--_load", str(ckpt), *(["--load-in-4bit"] if a.load_in_4bit else []))
    return w, r, disk


def print_table(a, w: dict, r: dict, disk: int) -> None:
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


def extrapolate(a, counts: list[int]) -> None:
    """One row per measured layer count, then the preset's depth on the line through the first and last."""
    if len(counts) < 2 or len(set(counts)) != len(counts):
        raise SystemExit(f"--n-layers {a.n_layers}: give at least two different layer counts, e.g. 2,4.")
    full = preset_args(a.preset).n_layers
    cols = ("disk", "model", "before", "load", "peak", "anon", "file")
    points = {}
    for n in counts:
        w, r, disk = measure(a, n)
        points[n] = dict(disk=disk, model=r["param_bytes"], before=r["rss_before_bytes"],
                         load=r["peak_after_load_bytes"] - r["rss_before_bytes"],
                         peak=r["peak_after_forward_bytes"] - r["rss_before_bytes"], time=r["load_s"],
                         anon=r["anon_peak_load_bytes"] - r["anon_before_bytes"], file=r["file_rss_after_load_bytes"])
    lo, hi = min(counts), max(counts)
    est = {c: points[lo][c] + (full - lo) * (points[hi][c] - points[lo][c]) / (hi - lo) for c in cols}
    est["time"] = float("nan")  # load time is not linear on a shared machine: not extrapolated
    what = "4-bit (NF4 + DQ)" if a.load_in_4bit else "as saved"
    print(f"{a.preset} shapes, {a.format} bf16 checkpoint loaded {what} on {platform.machine()}, torch "
          f"{r['torch']}; sizes in GiB (1024**3 bytes); peak RSS = ru_maxrss minus RSS before loading (it counts "
          f"the pages of the memory-mapped checkpoint); anonymous = peak RssAnon minus RssAnon before (the process's "
          f"own memory, sampled every 5 ms); file = RssFile after loading")
    print("| layers | bf16 on disk | loaded model bytes | peak RSS | peak after a forward | peak anonymous | "
          "anonymous / model | file | load s |\n| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for n, p in [*sorted(points.items()), (f"{full} (extrapolated per layer, not measured)", est)]:
        print(f"| {n} | {p['disk'] / GiB:.2f} | {p['model'] / GiB:.3f} | {p['load'] / GiB:.2f} | "
              f"{p['peak'] / GiB:.2f} | {p['anon'] / GiB:.2f} | {p['anon'] / p['model']:.2f} | "
              f"{p['file'] / GiB:.2f} | {p['time']:.0f} |")
    per = {c: (points[hi][c] - points[lo][c]) / (hi - lo) for c in ("disk", "model", "peak", "anon")}
    print(f"per layer: {per['disk'] / GiB:.3f} GiB bf16 on disk, {per['model'] / GiB:.3f} GiB of 4-bit model, "
          f"{per['peak'] / GiB:.3f} GiB of peak RSS, {per['anon'] / GiB:.3f} GiB of peak anonymous RSS")


if __name__ == "__main__":
    main()
