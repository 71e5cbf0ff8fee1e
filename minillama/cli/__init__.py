"""The `minillama` command line (`main.py`) and `minillama doctor` (`doctor.py`)."""

from .main import main

__all__ = ["main"]
