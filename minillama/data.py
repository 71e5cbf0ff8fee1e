"""Data for language-model training: JSONL text corpora, tokenised and packed into fixed-length rows.

Every document becomes `[BOS] ids [EOS]`. A document longer than one row is cut into consecutive
pieces of seq_len + 1 tokens; pieces are shuffled and packed in that order (next-fit) into rows of seq_len + 1
tokens (a row's inputs are tokens[:-1], its targets tokens[1:]). Unused room at the end of a row is
padded and its targets set to -100, so no loss is computed on padding. As in GPT-style
pre-training, a piece may attend to the piece packed before it in the same row, and the last token of
one piece predicts the first of the next (BOS, when a document starts there).
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import torch

IGNORE_INDEX = -100


def read_jsonl_texts(path) -> list[str]:
    """The "text" field of every line of a JSONL file."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"Data file {path} does not exist.")
    texts = []
    with open(path) as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}, line {i}: not valid JSON ({e.msg}).") from None
            if not isinstance(row, dict) or not isinstance(row.get("text"), str):
                raise ValueError(f"{path}, line {i}: expected an object with a string field 'text'.")
            texts.append(row["text"])
    return texts


def pack_documents(docs: Iterable[Sequence[int]], seq_len: int, pad_id: int = 0,
                   seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Pack token lists into rows. Returns (inputs, targets), both [n_rows, seq_len] int64."""
    width = seq_len + 1
    pieces = [list(d[i:i + width]) for d in docs for i in range(0, len(d), width) if len(d[i:i + width]) > 1]
    random.Random(seed).shuffle(pieces)
    rows: list[list[int]] = [[]]
    for piece in pieces:  # next-fit: start a new row when the piece does not fit in the current one
        if len(rows[-1]) + len(piece) > width:
            rows.append([])
        rows[-1].extend(piece)
    order = list(range(len(rows)))
    random.Random(seed + 1).shuffle(order)
    data = torch.full((len(rows), width), pad_id, dtype=torch.long)
    valid = torch.zeros((len(rows), width), dtype=torch.bool)
    for out_i, r in enumerate(order):
        data[out_i, : len(rows[r])] = torch.tensor(rows[r])
        valid[out_i, : len(rows[r])] = True
    inputs, targets = data[:, :-1].clone(), data[:, 1:].clone()
    targets[~valid[:, 1:]] = IGNORE_INDEX
    return inputs, targets


def batches(inputs: torch.Tensor, targets: torch.Tensor, batch_size: int, seed: int,
            start_step: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Endless shuffled mini-batches, reshuffled every epoch; deterministic from (seed, step), so a
    resumed run sees exactly the batches the uninterrupted run would have seen."""
    n = inputs.shape[0]
    per_epoch = max(1, n // batch_size)
    step = start_step
    while True:
        epoch, k = divmod(step, per_epoch)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100003 + epoch))
        idx = perm[k * batch_size:(k + 1) * batch_size]
        yield inputs[idx], targets[idx]
        step += 1
