"""The passkey corpus: the Position-Interpolation "find the pass key" test, scaled down: a 5-digit key hidden
at a chosen depth among filler sentences. The protocol (prompt, filler, question, depths) is evaluation's,
minillama.evaluation.passkey; this file only draws the documents of the training and validation files."""

from __future__ import annotations

import random
from typing import List, Sequence, Tuple

from ...evaluation.passkey import make_passkeys, passkey_training_text


def passkey_documents(train_seed: int, val_seed: int, n_train: int, train_fillers: Tuple[int, int],
                      n_val_per_setting: int, val_fillers: Sequence[int],
                      val_depths: Sequence[float]) -> Tuple[List[dict], List[dict]]:
    """Training documents ({"text"}) at random lengths (train_fillers = (min, max) filler sentences) and depths,
    and evaluation items (make_passkey dicts) for every (n_filler, depth) setting of the validation grid."""
    lo, hi = train_fillers
    rng = random.Random(train_seed)
    docs = []
    for _ in range(n_train):
        n_filler = rng.randint(lo, hi)
        depth = round(rng.random(), 4)
        docs.append({"text": passkey_training_text(rng, n_filler, depth)})
    rng = random.Random(val_seed)
    depths = tuple(val_depths)
    val_items = []
    for n_filler in val_fillers:
        val_items += make_passkeys(n_val_per_setting * len(depths), rng.randint(0, 2**31 - 1), n_filler, depths)
    return docs, val_items
