"""The passkey retrieval protocol, owned by evaluation: the prompt builder, its filler, and the words of
the secret-phrase test.

Position Interpolation's "find the pass key" test (Chen et al. 2023), scaled down: a 5-digit key hidden at a
chosen depth among filler sentences, asked for at the end. evaluate.passkey_accuracy fits the filler to a
context length (passkey_prompt_filler) and scores greedy answers; the course's corpora import the same builder
for the tiny model's pre-training documents (passkey_training_text), so the model is tested on the very format
it was trained on. Plain Python, deterministic: all randomness comes from a random.Random or an int seed.
"""

from __future__ import annotations

import numbers
import random
from typing import List, Sequence, Union

RngOrSeed = Union[int, random.Random]
DEFAULT_DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)  # where the key sits: 0 right after the intro, 1 before the question

# The secret-phrase test (evaluation.longctx) plants "<colour> <animal>"; the stories use the same words.
COLOURS = [
    "red", "blue", "green", "yellow", "orange", "purple", "pink", "brown",
    "black", "white", "grey", "gold", "silver", "violet", "teal", "navy",
    "cream", "lemon", "mint", "coral", "plum", "amber", "ruby", "crimson",
    "scarlet", "turquoise", "lilac", "maroon", "beige", "peach",
]
ANIMALS = ["bird", "squirrel", "rabbit", "duck", "cow", "sheep", "fox",
           "frog", "butterfly", "horse", "goat", "owl"]


# ---- argument checks (the corpora use them too) ----------------------------------------------------------
def _rng(rng_or_seed: RngOrSeed, arg: str = "rng_or_seed") -> random.Random:
    """Return a ``random.Random``: use it as-is, or build one from an int seed."""
    if isinstance(rng_or_seed, random.Random):
        return rng_or_seed
    if isinstance(rng_or_seed, int) and not isinstance(rng_or_seed, bool):
        return random.Random(rng_or_seed)
    raise ValueError(
        f"{arg} must be an int seed or a random.Random instance, got {rng_or_seed!r}."
    )


def _check_int(value, arg: str, minimum: int = 1) -> int:
    """Raise ValueError unless ``value`` is an int >= ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{arg} must be an integer >= {minimum}, got {value!r}.")
    return value


def _check_seed(seed, arg: str = "seed") -> int:
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"{arg} must be an integer, got {seed!r}.")
    return seed


def _check_depth(depth, arg: str = "depth") -> float:
    if (isinstance(depth, bool) or not isinstance(depth, numbers.Real)
            or not 0.0 <= depth <= 1.0):
        raise ValueError(f"{arg} must be a number between 0 and 1, got {depth!r}.")
    return float(depth)


def _check_each(values, arg: str, expected: str, check) -> tuple:
    """``values`` as a tuple; ValueError when it is empty or when check(entry, "each entry of <arg>") fails."""
    values = tuple(values)
    if not values:
        raise ValueError(f"{arg} must be a non-empty sequence of {expected}, got ().")
    for v in values:
        check(v, f"each entry of {arg}")
    return values


# ---- the protocol ----------------------------------------------------------------------------------------
PASSKEY_INTRO = "There is a pass key hidden in this text. Find it and remember it."
PASSKEY_FILLER = ("The grass is green.", "The sky is blue.", "The sun is yellow.",
                  "Here we go.", "There and back again.")
PASSKEY_LINE = "The pass key is {key}. Remember it. {key} is the pass key."
PASSKEY_QUESTION = "What is the pass key? The pass key is"
# Invariant: intro, filler and question contain no digits, so the key's
# digits appear exactly twice in a prompt (both in PASSKEY_LINE) and exactly
# three times in a training text (prompt + " " + key + ".").
assert not any(c.isdigit() for c in PASSKEY_INTRO + "".join(PASSKEY_FILLER) + PASSKEY_QUESTION)


def _passkey_prompt(key: str, n_filler: int, depth: float) -> str:
    filler = [PASSKEY_FILLER[i % len(PASSKEY_FILLER)] for i in range(n_filler)]
    position = int(depth * n_filler + 0.5)   # 0 = right after the intro, n = right before the question
    parts = [PASSKEY_INTRO] + filler[:position] + [PASSKEY_LINE.format(key=key)] \
        + filler[position:] + [PASSKEY_QUESTION]
    return " ".join(parts)


def make_passkey(seed_or_rng: RngOrSeed, n_filler_sentences: int, depth: float) -> dict:
    """Return one passkey test item.

    ``{"prompt", "answer", "depth", "n_filler"}``: the prompt ends with
    "The pass key is" (no trailing space); the answer is the 5-digit key
    (first digit non-zero, no leading space). The key line sits after
    ``round(depth * n_filler_sentences)`` filler sentences. The answer occurs
    exactly twice in the prompt.
    """
    rng = _rng(seed_or_rng, "seed_or_rng")
    _check_int(n_filler_sentences, "n_filler_sentences")
    depth = _check_depth(depth)
    key = str(rng.randint(10000, 99999))
    return {"prompt": _passkey_prompt(key, n_filler_sentences, depth),
            "answer": key, "depth": depth, "n_filler": n_filler_sentences}


def make_passkeys(n: int, seed: int, n_filler_sentences: int,
                  depths: Sequence[float] = DEFAULT_DEPTHS) -> List[dict]:
    """Return ``n`` passkey items; item ``i`` uses depth ``depths[i % len(depths)]``."""
    _check_int(n, "n")
    _check_seed(seed)
    _check_int(n_filler_sentences, "n_filler_sentences")
    depths = _check_each(depths, "depths", "numbers in [0, 1]", _check_depth)
    rng = random.Random(seed)
    return [make_passkey(rng, n_filler_sentences, depths[i % len(depths)]) for i in range(n)]


def passkey_training_text(seed_or_rng: RngOrSeed, n_filler_sentences: int, depth: float) -> str:
    """A complete passkey document for pre-training: prompt + " " + answer + "."."""
    item = make_passkey(seed_or_rng, n_filler_sentences, depth)
    return item["prompt"] + " " + item["answer"] + "."
