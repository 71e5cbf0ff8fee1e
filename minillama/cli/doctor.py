"""`minillama doctor`: the facts an instructor asks for in a bug report."""

from __future__ import annotations

import importlib
import os
import platform
import sys

import torch


def _version(module: str) -> str:
    try:
        return getattr(importlib.import_module(module), "__version__", "installed")
    except Exception as e:  # noqa: BLE001 - report any import failure, e.g. a broken CUDA library
        return "not installed" if isinstance(e, ImportError) else f"broken ({type(e).__name__}: {e})"


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
        rows.append(("bf16 supported", str(torch.cuda.is_bf16_supported())))
    else:
        mps = getattr(torch.backends, "mps", None)
        rows.append(("mps available", str(bool(mps and mps.is_available()))))
        rows.append(("bf16 supported", "on CPU: yes (emulated, slow)"))
    for mod in ("numpy", "sentencepiece", "safetensors", "bitsandbytes", "transformers", "peft"):
        rows.append((mod, _version(mod)))
    rows.append(("jupyter kernels", _jupyter_kernels()))
    return rows


def main() -> int:
    rows = report()
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    return 0
