"""Checkpoint formats: model weights in minillama's native layout, HF's and Meta's (`weights.py`).

4-bit checkpoints (`quantized.py`: quantised while loading, saved in transformers' 4-bit layout) wrap
`weights.py`'s `load_model` / `save_model`: the package exports the wrappers. PEFT-format LoRA adapters are
read and written by `minillama.lora`, which shares the HF<->Meta layout (`minillama.layout`) and the atomic writer
(`minillama.files`) with this package.
"""

from .quantized import load_model, save_model
from .weights import FORMATS, detect_format

__all__ = ["FORMATS", "detect_format", "load_model", "save_model"]
