"""Training: data sets (packed pre-training rows, Alpaca SFT examples; `data.py`) and the one training loop
for pre-training, SFT and LoRA with AMP, accumulation, checkpointing and exact resume (`train.py`)."""
