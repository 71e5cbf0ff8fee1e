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
file-backed (pages of mapped files: the libraries, and a checkpoint read through a memory map). The 4-bit loader
reads safetensors with plain reads into a buffer per tensor, and releases the mapped pages of each Meta weight
once it is quantised (checkpoints/quantized.py), so neither kind grows with the 16-bit checkpoint.

Measured on x86_64, torch 2.13 CPU, llama2-7b shapes, NF4 + double quantisation, extrapolated to 32 layers (4-bit
model 3.600 GiB; one layer in 16 bits 0.377 GiB; model + one layer 3.977 GiB):
- HF shards, --n-layers 1,2,4: peak RSS 3.89 GiB (anonymous 3.87, file-backed 0.09: the libraries); the
  anonymous memory held after loading grows 0.103 GiB per layer against 0.097 GiB of 4-bit weights.
- Meta .pth, --n-layers 1,3: peak RSS 3.49 GiB (anonymous held 2.98, file-backed 0.58: the libraries and the
  bf16 embeddings and head, which stay memory-mapped views of the file as the model's own weights).
- Before (safetensors through safe_open's memory map, Meta pages never released, the quantiser working on a
  whole matrix at once): peak RSS 17.09 GiB for HF (anonymous 4.76, file-backed 12.64: every page of the
  checkpoint read stayed resident until load_model returned) and 18.29 GiB for Meta (5.97 + 12.64).
A forward on 8 tokens afterwards peaks 0.96 GiB higher (HF): dequantize_4bit's temporaries for one 11008 x 4096
weight (an int64 index, fp32 values), which belong to the forward, not to loading.
Peak anonymous RSS is sampled every 5 ms and catches a varying part of the transients (one 16-bit weight
being read, the quantiser's chunk): its per-layer slope is noisy by about 10 MB.

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


def layer_bytes_16bit(args) -> int:
    """One transformer block in 16 bits: its seven linears and two norm weights, 2 bytes each."""
    return 2 * (sum(i * o for i, o in args.linear_shapes().values()) + 2 * args.dim)


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
    after_load, parts = peak_rss_bytes(), rss_parts()
    sampler.running = False
    sampler.join()
    with torch.no_grad():  # touch every weight once (an mmap-backed Meta checkpoint is read lazily)
        model(torch.ones(1, 8, dtype=torch.long))
    print(json.dumps({"rss_before_bytes": base, "peak_after_load_bytes": after_load,
                      "anon_before_bytes": anon_base, "anon_peak_load_bytes": sampler.peak,
                      "anon_after_load_bytes": parts.get("RssAnon", 0),
                      "file_rss_after_load_bytes": parts.get("RssFile", 0),
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
    layer16 = layer_bytes_16bit(preset_args(a.preset))
    peak = r["peak_after_load_bytes"] - r["rss_before_bytes"]
    rows = [
        ("preset / format / dtype", f"{a.preset} / {a.format} / {r['dtype']}"),
        ("machine", f"{platform.machine()}, {platform.processor() or 'cpu'}; torch {r['torch']}"),
        ("checkpoint size on disk", f"{disk / GiB:.2f} GiB"),
        ("parameter + buffer bytes" + (" (the 4-bit model)" if a.load_in_4bit else ""),
         f"{r['param_bytes'] / GiB:.3f} GiB"),
        ("one layer in 16 bits", f"{layer16 / GiB:.3f} GiB"),
        ("RSS before loading", f"{r['rss_before_bytes'] / GiB:.2f} GiB (python + torch)"),
        ("peak RSS of load_model (minus before)", f"{peak / GiB:.2f} GiB = "
         f"{peak / (r['param_bytes'] + layer16):.2f} x (model + one 16-bit layer)"),
        ("peak anonymous RSS of load_model (sampled, minus before)",
         f"{(r['anon_peak_load_bytes'] - r['anon_before_bytes']) / GiB:.2f} GiB"),
        ("file-backed RSS after load (libraries too)", f"{r['file_rss_after_load_bytes'] / GiB:.2f} GiB"),
        ("anonymous held after load (minus before)", f"{(r['anon_after_load_bytes'] - r['anon_before_bytes']) / GiB:.2f} GiB"),
        ("peak RSS after a forward (minus before)", f"{(r['peak_after_forward_bytes'] - r['rss_before_bytes']) / GiB:.2f} GiB"),
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
    cols = ("disk", "model", "before", "load", "peak", "anon", "held", "file")
    points = {}
    for n in counts:
        w, r, disk = measure(a, n)
        base_anon = r["anon_before_bytes"]
        points[n] = dict(disk=disk, model=r["param_bytes"], before=r["rss_before_bytes"],
                         load=r["peak_after_load_bytes"] - r["rss_before_bytes"],
                         peak=r["peak_after_forward_bytes"] - r["rss_before_bytes"], time=r["load_s"],
                         anon=r["anon_peak_load_bytes"] - base_anon, held=r["anon_after_load_bytes"] - base_anon,
                         file=r["file_rss_after_load_bytes"])
    lo, hi = min(counts), max(counts)
    est = {c: points[lo][c] + (full - lo) * (points[hi][c] - points[lo][c]) / (hi - lo) for c in cols}
    est["time"] = float("nan")  # load time is not linear on a shared machine: not extrapolated
    what = "4-bit (NF4 + DQ)" if a.load_in_4bit else "as saved"
    layer16 = layer_bytes_16bit(preset_args(a.preset))
    print(f"{a.preset} shapes, {a.format} bf16 checkpoint loaded {what} on {platform.machine()}, torch "
          f"{r['torch']}; sizes in GiB (1024**3 bytes); one layer in 16 bits = {layer16 / GiB:.3f} GiB; peak RSS = "
          f"ru_maxrss during load_model minus RSS before (anonymous and file-backed pages together); anonymous = "
          f"RssAnon minus RssAnon before (the process's own memory: its peak sampled every 5 ms, and what is "
          f"held once load_model returns); file = RssFile after loading (pages of mapped files: libraries, and a "
          f"checkpoint that is read through a memory map)")
    print("| layers | bf16 on disk | loaded model bytes | model + one 16-bit layer | peak RSS | peak anonymous | "
          "anonymous held after load | file | peak after a forward | load s |\n"
          "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for n, p in [*sorted(points.items()), (f"{full} (extrapolated per layer, not measured)", est)]:
        print(f"| {n} | {p['disk'] / GiB:.2f} | {p['model'] / GiB:.3f} | {(p['model'] + layer16) / GiB:.3f} | "
              f"{p['load'] / GiB:.2f} | {p['anon'] / GiB:.2f} | {p['held'] / GiB:.2f} | {p['file'] / GiB:.2f} | "
              f"{p['peak'] / GiB:.2f} | {p['time']:.0f} |")
    per = {c: (points[hi][c] - points[lo][c]) / (hi - lo) for c in cols}
    print(f"per layer: {per['disk'] / GiB:.3f} GiB bf16 on disk, {per['model'] / GiB:.3f} GiB of loaded model, "
          f"{per['load'] / GiB:.3f} GiB of peak RSS, {per['anon'] / GiB:.3f} GiB of peak anonymous RSS (a sampled "
          f"peak: the transient caught varies), {per['held'] / GiB:.3f} GiB of anonymous RSS held after load, "
          f"{per['peak'] / GiB:.3f} GiB of peak RSS after a forward")

if __name__ == "__main__":
    main()
