"""Training: one loop for pre-training, SFT, LoRA and QLoRA, each technique a switch of TrainConfig.

    from minillama.training import TrainConfig, train
    train(model, train_rows, {"val": val_rows}, TrainConfig(steps=200, lora_r=8), "runs/lora")

The rooms: `settings.py` (TrainConfig and the rules of its settings, the optimizer names and AMP modes),
`techniques.py` (what is applied to the model before the first step: longer context, 4-bit, LoRA,
checkpointing, kernels, torch.compile), `run_state.py` (the run's checkpoint and exact resume, the log's start,
the saved adapter), `train.py` (the loop, one optimizer step, the held-out loss), `data.py` (packed pre-training
rows, Alpaca SFT examples, batching) and `distributed.py` (DDP / FSDP under torchrun).
"""

from .settings import TrainConfig
from .data import as_dataset, batches
from .run_state import save_run_adapter
from .techniques import compile_blocks, extend_context, prepare_model
from .train import evaluate_loss, make_optimizer, train, train_step

__all__ = ["TrainConfig", "as_dataset", "batches", "compile_blocks", "evaluate_loss", "extend_context",
           "make_optimizer", "prepare_model", "save_run_adapter", "train", "train_step"]
