"""Checkpoint formats: model weights in minillama's native layout, HF's and Meta's (`weights.py`).

Later formats (4-bit checkpoints) join this package; PEFT-format LoRA adapters are read and written by
`minillama.lora`, which shares the HF<->Meta layout (`minillama.layout`) and the atomic writer
(`minillama.files`) with this package.
"""

from .weights import FORMATS, detect_format, load_model, save_model

__all__ = ["FORMATS", "detect_format", "load_model", "save_model"]
