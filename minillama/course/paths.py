"""Where the shipped data lives: `data/` next to the package (the repository's own folder), or the folder
named by the environment variable MINILLAMA_DATA (for an installed copy, or a lab's shared disk)."""

from __future__ import annotations

import os
from pathlib import Path

ENV = "MINILLAMA_DATA"
_DEFAULT = Path(__file__).resolve().parents[2] / "data"  # minillama/course/paths.py -> repo/data


def data_dir() -> Path:
    """The data folder (holding tiny/ and corpora/); one clear sentence if it is not there."""
    where = os.environ.get(ENV)
    path = Path(where).expanduser() if where else _DEFAULT
    if not path.is_dir():
        source = f"${ENV}={where!r}" if where else "the folder next to the package"
        raise FileNotFoundError(f"The shipped data folder {path} ({source}) does not exist: set {ENV} to the "
                                f"repository's data/ folder (it holds tiny/ and corpora/).")
    return path


def tiny_model_dir() -> Path:
    """The shipped tiny model (config.json, model.safetensors, tokenizer.model)."""
    return data_dir() / "tiny"


def corpora_dir() -> Path:
    """The shipped synthetic corpora (stories, passkey, instructions, facts, almanac)."""
    return data_dir() / "corpora"
