"""`minillama doctor`: the facts an instructor asks for in a bug report."""

from __future__ import annotations

import importlib
import logging
import os
import platform
import sys
from typing import Optional

import torch

# bitsandbytes (0.49+) logs this when it is imported on a CPU with AVX512-BF16: it tries to fetch an optional
# faster 4-bit matmul from the Hugging Face Hub through the `kernels` package, which the course does not install.
BNB_KERNELS_LOGGER = "bitsandbytes.backends.cpu.ops"
BNB_KERNELS_NOTE = ("its optional faster CPU 4-bit matmul (the `kernels` package, fetched from the Hugging Face "
                    "Hub) is not installed, so bitsandbytes uses its built-in CPU code: harmless, the course "
                    "does not need it")


class _KernelsWarningFilter(logging.Filter):
    """Drops bitsandbytes' "Failed to load CPU gemm_4bit_forward from kernels-community" record, and counts it."""

    def __init__(self):
        super().__init__()
        self.seen = 0

    def filter(self, record: logging.LogRecord) -> bool:
        if "kernels" in record.getMessage():
            self.seen += 1
            return False
        return True


def silence_bitsandbytes_kernels_warning() -> _KernelsWarningFilter:
    """Hide bitsandbytes' `kernels` warning (call before bitsandbytes, or peft, is imported); returns the
    filter, whose `.seen` counts the warnings it hid. Installed once per process."""
    logger = logging.getLogger(BNB_KERNELS_LOGGER)
    found = [f for f in logger.filters if isinstance(f, _KernelsWarningFilter)]
    if found:
        return found[0]
    flt = _KernelsWarningFilter()
    logger.addFilter(flt)
    return flt


def read_cpuinfo() -> Optional[str]:
    """The text of /proc/cpuinfo, or None where there is none (macOS, Windows)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            return f.read()
    except OSError:
        return None


def cpu_flags(cpuinfo: Optional[str]) -> set[str]:
    """The CPU's feature flags from the text of /proc/cpuinfo (x86 "flags", Arm "Features"); empty if none."""
    flags = set()
    for line in (cpuinfo or "").splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):  # x86 and Arm spell the list differently
            flags.update(value.split())
    return flags


def cpu_bf16_support(cpuinfo: Optional[str]) -> str:
    """How bf16 autocast runs on this CPU, from the text of /proc/cpuinfo (None: unknown).

    x86: native with the avx512_bf16 (AVX512-BF16) or amx_bf16 (AMX) instruction flags, else emulated
    (bf16 numbers converted to fp32 and back around every operation: slower than fp32). Arm (aarch64):
    native with the bf16 feature (Armv8.6, e.g. Neoverse V1).
    """
    if cpuinfo is None:
        return "unknown (no /proc/cpuinfo to read the CPU's flags from; Apple silicon and Windows: not detected)"
    flags = cpu_flags(cpuinfo)
    native = [f for f in ("avx512_bf16", "amx_bf16") if f in flags] or (["bf16"] if "bf16" in flags else [])
    if native:
        return f"native ({', '.join(native)}): bf16 autocast is fast on this CPU"
    if not flags:
        return "unknown (no CPU flags found in /proc/cpuinfo)"
    return "emulated, slow (no avx512_bf16 or amx_bf16 flag): on this CPU fp32 is faster than bf16 autocast"


def bnb_cpu_4bit_path(cpuinfo: Optional[str]) -> str:
    """Which path bitsandbytes' 4-bit matmul takes on this CPU (bitsandbytes 0.50: its own check is the
    AVX512-BF16 instructions, the avx512_bf16 flag; tests/conftest.py describes both paths)."""
    flags = cpu_flags(cpuinfo)
    if not flags:
        return "unknown (the CPU's flags cannot be read here)"
    if "avx512_bf16" in flags:
        return ("fused bf16 kernel (avx512_bf16): bitsandbytes' Linear4bit in eval mode without gradients "
                "(transformers' 4-bit models, backend='bnb') rounds inputs and outputs to bf16, so logits differ "
                "from minillama's fp32 4-bit layers by up to ~1e-2 (tiny model); training stays fp32")
    return "fp32 (no avx512_bf16 flag): bitsandbytes dequantises the weights and multiplies in fp32, as minillama does"


def compile_support(device: str) -> str:
    """Whether torch.compile can generate kernels for `device` here (train --compile, the *-compiled rows)."""
    from ..training.techniques import compile_problem

    problem = compile_problem(device)
    return f"usable on {device} (train --compile, bench --compare hf's *-compiled rows)" if not problem else problem


def _version(module: str) -> str:
    try:
        return getattr(importlib.import_module(module), "__version__", "installed")
    except Exception as e:  # noqa: BLE001 - report any import failure, e.g. a broken CUDA library
        return "not installed" if isinstance(e, ImportError) else f"broken ({type(e).__name__}: {e})"


def ipykernel_note(version: str) -> str:
    """The ipykernel version, with a warning for 7.x (the course pins it below 7: constraints.txt says why)."""
    if version.split(".")[0] == "7":
        return (f"{version}: 7.x can leave a notebook's first cell waiting forever under CPU load (ipykernel "
                f"issue 1554); pip install -c constraints.txt 'ipykernel<7'")
    return version


def _jupyter_kernels() -> str:
    try:
        from jupyter_client.kernelspec import KernelSpecManager
    except ImportError:
        return "jupyter_client not installed (pip install -e '.[notebooks]')"
    specs = KernelSpecManager().find_kernel_specs()
    return ", ".join(f"{name} ({path})" for name, path in sorted(specs.items())) or "none found"


def report() -> list[tuple[str, str]]:
    """(label, value) rows describing Python, torch, the accelerator and optional packages."""
    from .. import __version__

    rows = [
        ("minillama", __version__),
        ("python", f"{sys.version.split()[0]} ({sys.executable})"),
        ("platform", platform.platform()),
        ("cpu threads", f"{torch.get_num_threads()} (of {os.cpu_count()} logical CPUs)"),
        ("torch", torch.__version__),
        ("cuda available", str(torch.cuda.is_available())),
    ]
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            rows.append((f"cuda:{i}", f"{p.name}, {p.total_memory / 1024**3:.1f} GiB, compute capability "
                                      f"{p.major}.{p.minor}"))
        rows.append(("cuda version", str(torch.version.cuda)))
        rows.append(("bf16 supported (GPU)", str(torch.cuda.is_bf16_supported())))
    else:
        mps = getattr(torch.backends, "mps", None)
        rows.append(("mps available", str(bool(mps and mps.is_available()))))
    cpuinfo = read_cpuinfo()
    rows.append(("bf16 autocast (CPU)", cpu_bf16_support(cpuinfo)))
    rows.append(("bitsandbytes 4-bit (CPU)", bnb_cpu_4bit_path(cpuinfo)))
    rows.append(("torch.compile", compile_support("cuda" if torch.cuda.is_available() else "cpu")))
    kernels = silence_bitsandbytes_kernels_warning()
    seen = kernels.seen
    for mod in ("numpy", "sentencepiece", "safetensors", "bitsandbytes", "transformers", "peft"):
        rows.append((mod, _version(mod)))
        if mod == "bitsandbytes" and kernels.seen > seen:
            rows.append(("bitsandbytes note", BNB_KERNELS_NOTE))
    rows.append(("ipykernel", ipykernel_note(_version("ipykernel"))))
    rows.append(("jupyter kernels", _jupyter_kernels()))
    return rows


def main() -> int:
    rows = report()
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    return 0


def add_parser(sub) -> None:
    d = sub.add_parser("doctor", help="print the environment (paste it into bug reports)")
    d.set_defaults(func=lambda args: main())
