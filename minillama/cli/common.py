"""What several `minillama` commands share: the --device and positive-integer flag checks, and the plain-text
tables of `demo` and `eval`."""

from __future__ import annotations

from typing import Optional

import torch


def pick_device(name: str) -> str:
    """--device: auto (CUDA when present, else the CPU), cpu, cuda, cuda:N or mps; refused if this machine lacks it."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        kind = torch.device(name).type
    except RuntimeError:
        kind = None
    available = {"cpu": lambda: True, "cuda": lambda: torch.cuda.is_available(),
                 "mps": lambda: torch.backends.mps.is_available()}
    if kind not in available:
        raise ValueError(f"--device {name!r} is not a device: expected auto, cpu, cuda, cuda:N or mps.")
    if not available[kind]():
        raise ValueError(f"--device {name!r} needs {kind.upper()}, which this machine lacks: use --device cpu or auto.")
    if kind == "cuda" and (torch.device(name).index or 0) >= torch.cuda.device_count():
        raise ValueError(f"--device {name!r}: this machine has {torch.cuda.device_count()} CUDA device(s), "
                         f"numbered from 0.")
    return name


def check_positive(args, *keys: str) -> None:
    """Refuse a given flag that is not a positive integer (None means "not given": the default)."""
    for key in keys:
        value = getattr(args, key)
        if value is not None and value <= 0:
            raise ValueError(f"--{key.replace('_', '-')} {value} is invalid: expected a positive integer.")


def aligned_table(header: list[str], rows: list[list[str]], notes: Optional[list[str]] = None) -> list[str]:
    """Lines of a plain-text table: cells right-aligned under their header, columns joined by " | ";
    notes[i] (if any) is appended to row i."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    lines = [" | ".join(h.rjust(w) for h, w in zip(header, widths))]
    for i, r in enumerate(rows):
        lines.append(" | ".join(c.rjust(w) for c, w in zip(r, widths)) + (notes[i] if notes else ""))
    return lines


def ppl_table(rows: list[dict], trained: int, nll: bool = False) -> list[str]:
    """The perplexity rows of `eval ppl` and `demo` (one per context), contexts beyond `trained` marked."""
    header = ["context", "perplexity"] + (["nll/token"] if nll else [])
    cells = [[str(r["context"]), f"{r['ppl']:.3f}"] + ([f"{r['nll']:.4f}"] if nll else []) for r in rows]
    notes = [f"  (beyond the trained {trained}: no RoPE scaling)" if r["context"] > trained else "" for r in rows]
    return aligned_table(header, cells, notes)
