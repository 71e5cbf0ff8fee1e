"""Quickstart command 1: make .venv, install the course into it, run `minillama demo`.

    python3 scripts/setup_env.py            # from the repository root, on Linux, macOS or Windows

Why a Python script and not a shell one: it runs the same on every platform (Windows has no bash, and its
venv keeps programs in Scripts\\ rather than bin/), with only the Python that made the venv.

Steps, each skipped when already done, so running it again is cheap and safe:
1. `python -m venv .venv` (unless .venv exists);
2. PyTorch, only if the venv has none: on Linux without an NVIDIA GPU (no `nvidia-smi`) the CPU build from
   PyTorch's CPU wheel index, because the default Linux wheel from PyPI is the multi-GB CUDA build; anywhere
   else the default wheel comes with step 3. A torch already in the venv is kept as it is (CI installs one
   from its wheel cache first; pip then only needs PyPI, or nothing, for the rest);
3. `pip install -c constraints.txt -e ".[dev,notebooks,quant,llama3]"`: the course and the versions of the
   reference tools (transformers, peft, bitsandbytes) that its tests were run with, and of the Llama-3
   tokenizers (tiktoken, tokenizers);
4. `.venv/bin/minillama demo` (skip with --no-demo).
"""

from __future__ import annotations

import argparse
import platform
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CPU_INDEX = "https://download.pytorch.org/whl/cpu"
TORCH = "torch>=2.6"  # as in pyproject.toml
EXTRAS = ".[dev,notebooks,quant,llama3]"


def venv_program(venv: Path, name: str) -> Path:
    """A program inside the venv: bin/NAME on Linux and macOS, Scripts\\NAME.exe on Windows."""
    if platform.system() == "Windows":
        return venv / "Scripts" / f"{name}.exe"
    return venv / "bin" / name


def torch_command(python: str, *, system: str, has_nvidia: bool, has_torch: bool, force_cpu: bool = False):
    """The pip command that installs PyTorch before the course, or None when the course's own install
    should bring it (or it is there already)."""
    if has_torch:
        return None
    if force_cpu or (system == "Linux" and not has_nvidia):
        return [python, "-m", "pip", "install", TORCH, "--index-url", CPU_INDEX]
    return None


def has_torch(python: str) -> bool:
    """Whether the venv's Python finds torch (without importing it: that takes seconds)."""
    code = "import importlib.util, sys; sys.exit(importlib.util.find_spec('torch') is None)"
    return subprocess.run([python, "-c", code]).returncode == 0


def run(cmd: list) -> None:
    print("+", " ".join(str(c) for c in cmd), flush=True)
    subprocess.run([str(c) for c in cmd], check=True, cwd=ROOT)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--venv", default=".venv", help="where to make the virtual environment (default .venv)")
    p.add_argument("--cpu", action="store_true", help="install PyTorch's CPU build even where a GPU is found")
    p.add_argument("--no-demo", action="store_true", help="stop after installing")
    a = p.parse_args(argv)
    venv = ROOT / a.venv
    if not venv_program(venv, "python").exists():
        run([sys.executable, "-m", "venv", venv])
    python = str(venv_program(venv, "python"))
    cmd = torch_command(python, system=platform.system(), has_nvidia=shutil.which("nvidia-smi") is not None,
                        has_torch=has_torch(python), force_cpu=a.cpu)
    if cmd:
        print("No NVIDIA GPU (nvidia-smi not found): installing PyTorch's CPU build.", flush=True)
        run(cmd)
    run([python, "-m", "pip", "install", "-c", "constraints.txt", "-e", EXTRAS])
    if not a.no_demo:
        run([venv_program(venv, "minillama"), "demo"])
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except subprocess.CalledProcessError as e:
        print(f"setup_env: `{' '.join(map(str, e.cmd))}` failed with exit code {e.returncode}.", file=sys.stderr)
        sys.exit(e.returncode or 1)
