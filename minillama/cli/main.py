"""The `minillama` command line: `minillama doctor | generate | demo | eval | train | bench | ...`.

This module holds only the top-level parser, its global flag (--no-progress) and the dispatch: each command's
flags and work live in its own module (`generate_cmd.py`, `train_cmd.py`, ...), which adds its subparser with
`add_parser(sub)` and runs in `run(args)`. Every command's error (bad input) is printed here, as one line
`minillama COMMAND: error: ...`, with exit code 2."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional

from ..progress import set_progress
from . import (bench_cmd, build_tiny_cmd, corpora_cmd, demo_cmd, doctor, eval_cmd, generate_cmd, longctx_cmd,
               plan_cmd, train_cmd)

# in the order `minillama --help` lists them
COMMANDS = (doctor, generate_cmd, demo_cmd, eval_cmd, train_cmd, bench_cmd, corpora_cmd, build_tiny_cmd,
            longctx_cmd, plan_cmd)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="minillama", description="minillama: LLaMA-2 from scratch, fine-tuned on one GPU.")
    p.add_argument("--no-progress", action="store_true",
                   help="no progress bars (they go to stderr, and only when it is a terminal)")
    sub = p.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        command.add_parser(sub)
    return p


def _missing_folders(path: Optional[str]) -> list[Path]:
    """`path` and those of its parents that do not exist yet, deepest first."""
    missing = []
    p = Path(path).absolute() if path else None
    while p is not None and not p.exists() and p != p.parent:
        missing.append(p)
        p = p.parent
    return missing


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    set_progress(not args.no_progress)
    new_folders = _missing_folders(getattr(args, "out", None))
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, FloatingPointError, ImportError, OSError) as e:
        print(f"minillama {args.command}: error: {e}", file=sys.stderr)
        for folder in new_folders:  # leave no empty --out behind (rmdir removes empty folders only)
            try:
                folder.rmdir()
            except OSError:
                break
        return 2


if __name__ == "__main__":
    sys.exit(main())
