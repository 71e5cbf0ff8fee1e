"""Safe file writing shared by checkpoints, adapters and training runs: whole directories replaced in one
rename (a killed process leaves the old one or the new one, never a mix), and JSON read with a clear error."""

from __future__ import annotations

import json
import os
import secrets
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Union

PathLike = Union[str, os.PathLike]


def read_json(path: Path) -> dict:
    try:
        with open(path) as f:
            out = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e}).") from None
    if not isinstance(out, dict):
        raise ValueError(f"{path} must hold a JSON object, not {type(out).__name__}.")
    return out


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextmanager
def atomic_directory(path: PathLike) -> Iterator[Path]:
    """Yield a temporary sibling directory to fill; on success it replaces `path` in one rename, on any
    error it is deleted and `path` is left as it was. A process killed at any moment leaves either the
    old directory or the new one (at worst plus a hidden `.NAME.tmp-*` leftover), never a mix."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"Cannot write the directory {path}: it is an existing file.")
    path.parent.mkdir(parents=True, exist_ok=True)
    # A plain mkdir (not tempfile.mkdtemp, which makes a private 0700 directory), so the checkpoint gets
    # the usual permissions and classmates sharing a lab folder can read it.
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
    tmp.mkdir()
    try:
        yield tmp
        mode = 0o666 & ~_umask()  # some writers (safetensors) create private 0600 files
        for f in tmp.rglob("*"):
            if f.is_file():
                f.chmod(mode)
        old = None
        if path.exists():
            old = path.parent / f".{path.name}.old-{os.getpid()}-{secrets.token_hex(4)}"
            os.replace(path, old)
        try:
            os.replace(tmp, path)
        except BaseException:
            if old is not None:
                os.replace(old, path)  # put the previous directory back
            raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
