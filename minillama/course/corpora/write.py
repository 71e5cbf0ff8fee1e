"""Writing every corpus to disk: `write_corpora` (byte-identical files for the same seed) and the command line
(`python -m minillama.course.corpora`, `minillama corpora`)."""

from __future__ import annotations

import argparse
import json
import os
from typing import Dict, Optional, Sequence, Tuple

from ...evaluation.passkey import DEFAULT_DEPTHS, _check_int, _check_seed
from ...files import atomic_write_text
from .almanac import make_almanac
from .facts import facts_training_text, make_facts
from .instructions import make_instructions, split_instructions
from .passkey_docs import passkey_documents
from .stories import DEFAULT_STORY_LENGTHS, make_stories


def _derive_seed(seed: int, stream: int) -> int:
    """Seed for one corpus/split: different streams never share a seed."""
    return seed * 1000 + stream


# Stream ids for ``_derive_seed`` (train and validation always differ).
_STORIES_TRAIN, _STORIES_VAL = 1, 2
_PASSKEY_TRAIN, _PASSKEY_VAL = 3, 4
_INSTRUCTIONS, _INSTRUCTIONS_SPLIT = 5, 6
_FACTS = 7
_ALMANAC = 8


def _jsonl(records: Sequence[dict]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)


def _check_corpora_args(seed, n_stories, n_val_stories, n_passkey_train, n_passkey_val_per_setting,
                        passkey_train_fillers, passkey_val_fillers, n_instructions) -> None:
    _check_seed(seed)
    _check_int(n_stories, "n_stories")
    _check_int(n_val_stories, "n_val_stories")
    _check_int(n_passkey_train, "n_passkey_train")
    _check_int(n_passkey_val_per_setting, "n_passkey_val_per_setting")
    lo, hi = passkey_train_fillers
    _check_int(lo, "passkey_train_fillers[0]")
    _check_int(hi, f"passkey_train_fillers[1] (at least {lo})", minimum=lo)
    if not passkey_val_fillers:
        raise ValueError("passkey_val_fillers must be a non-empty sequence of positive integers.")
    _check_int(n_instructions, "n_instructions")


def write_corpora(out_dir: str, seed: int = 0,
                  n_stories: int = 2400,
                  n_val_stories: int = 120,
                  story_lengths: Sequence[int] = DEFAULT_STORY_LENGTHS,
                  n_passkey_train: int = 6000,
                  passkey_train_fillers: Tuple[int, int] = (4, 40),
                  n_passkey_val_per_setting: int = 4,
                  passkey_val_fillers: Sequence[int] = (10, 20, 30, 60, 120),
                  passkey_val_depths: Sequence[float] = DEFAULT_DEPTHS,
                  n_instructions: int = 600,
                  held_out_fraction: float = 0.1,
                  n_facts: int = 10,
                  n_controls: int = 10,
                  n_almanac: int = 8000) -> Dict[str, str]:
    """Write all corpora into ``out_dir`` and return ``{name: path}``.

    Files (every one written atomically, byte-identical for the same seed):

    * ``stories_train.jsonl`` / ``stories_val.jsonl``  - ``{"text"}`` per line
    * ``passkey_train.jsonl`` - ``{"text"}``: full passkey documents with
      ``passkey_train_fillers`` = (min, max) filler sentences (the longest fill a
      256-token context, so keys are seen at every distance the context allows)
      and random depths
    * ``passkey_val.jsonl`` - make_passkey dicts for every (n_filler, depth)
      setting; n_filler > 30 exceeds a 256-token context on purpose
      (for context-extension experiments)
    * ``instructions_train.json`` / ``instructions_val.json`` - Alpaca lists
    * ``alpaca_data_200.json`` - the first 200 training instructions
    * ``facts.json`` - make_facts output plus ``"training_text"``
    * ``almanac_train.jsonl`` / ``almanac_val.jsonl`` - ``{"text"}``: the
      general knowledge of the facts' world (make_almanac), without the facts

    Validation data uses seeds derived differently from training data.
    """
    _check_corpora_args(seed, n_stories, n_val_stories, n_passkey_train, n_passkey_val_per_setting,
                        passkey_train_fillers, passkey_val_fillers, n_instructions)
    lo, hi = passkey_train_fillers
    os.makedirs(out_dir, exist_ok=True)
    paths: Dict[str, str] = {}

    def put(name: str, filename: str, text: str) -> None:
        path = os.path.join(out_dir, filename)
        atomic_write_text(path, text)
        paths[name] = path

    # Stories.
    train = make_stories(n_stories, _derive_seed(seed, _STORIES_TRAIN), story_lengths)
    val = make_stories(n_val_stories, _derive_seed(seed, _STORIES_VAL), story_lengths)
    put("stories_train", "stories_train.jsonl", _jsonl([{"text": t} for t in train]))
    put("stories_val", "stories_val.jsonl", _jsonl([{"text": t} for t in val]))

    train_docs, val_items = passkey_documents(_derive_seed(seed, _PASSKEY_TRAIN), _derive_seed(seed, _PASSKEY_VAL),
                                              n_passkey_train, (lo, hi), n_passkey_val_per_setting,
                                              passkey_val_fillers, passkey_val_depths)
    put("passkey_train", "passkey_train.jsonl", _jsonl(train_docs))
    put("passkey_val", "passkey_val.jsonl", _jsonl(val_items))

    # Instructions.
    items = make_instructions(n_instructions, _derive_seed(seed, _INSTRUCTIONS))
    itrain, ival = split_instructions(items, held_out_fraction,
                                      _derive_seed(seed, _INSTRUCTIONS_SPLIT))
    if len(itrain) < 200:
        raise ValueError(f"n_instructions must leave at least 200 training items for "
                         f"alpaca_data_200.json, got {len(itrain)}.")
    put("instructions_train", "instructions_train.json", json.dumps(itrain, indent=2) + "\n")
    put("instructions_val", "instructions_val.json", json.dumps(ival, indent=2) + "\n")
    put("alpaca_data_200", "alpaca_data_200.json", json.dumps(itrain[:200], indent=2) + "\n")

    # Facts.
    facts = make_facts(_derive_seed(seed, _FACTS), n_facts, n_controls)
    facts_out = dict(facts, training_text=facts_training_text(facts))
    put("facts", "facts.json", json.dumps(facts_out, indent=2) + "\n")

    # Almanac: what the pre-trained model knows of that world (never the facts themselves).
    _check_int(n_almanac, "n_almanac")
    almanac = make_almanac(n_almanac, _derive_seed(seed, _ALMANAC), facts)
    n_val = max(1, n_almanac // 50)
    put("almanac_train", "almanac_train.jsonl", _jsonl([{"text": t} for t in almanac[n_val:]]))
    put("almanac_val", "almanac_val.jsonl", _jsonl([{"text": t} for t in almanac[:n_val]]))
    return paths


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, str]:
    """Command line: write the corpora and print each file with its size."""
    parser = argparse.ArgumentParser(description="Write the minillama synthetic corpora.")
    parser.add_argument("--out", default="data/corpora", help="output directory")
    parser.add_argument("--seed", type=int, default=0, help="random seed")
    parser.add_argument("--n-stories", type=int, default=2400, help="training stories")
    parser.add_argument("--n-val-stories", type=int, default=120, help="validation stories")
    parser.add_argument("--n-passkey-train", type=int, default=3000, help="passkey documents")
    parser.add_argument("--n-instructions", type=int, default=600, help="instruction items")
    args = parser.parse_args(argv)
    paths = write_corpora(args.out, seed=args.seed, n_stories=args.n_stories,
                          n_val_stories=args.n_val_stories,
                          n_passkey_train=args.n_passkey_train,
                          n_instructions=args.n_instructions)
    for name, path in paths.items():
        with open(path, encoding="utf-8") as fh:
            n_words = len(fh.read().split())
        print(f"{path:<50s} {os.path.getsize(path) / 1e6:7.2f} MB {n_words:>11,d} words")
    return paths

