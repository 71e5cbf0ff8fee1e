"""minillama: a minimal LLaMA-2, built from scratch for a course on fine-tuning on one GPU."""

from .checkpoints import load_model, save_model
from .config import PRESETS, ModelArgs, get_preset
from .generate import generate
from .model import Transformer, create_model
from .tokenizer import Tokenizer, load_tokenizer

__version__ = "0.1.0"

__all__ = ["ModelArgs", "PRESETS", "get_preset", "Transformer", "create_model", "load_model", "save_model",
           "generate", "Tokenizer", "load_tokenizer", "__version__"]
