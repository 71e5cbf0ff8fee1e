"""The instructions corpus: Alpaca-format ``{"instruction", "input", "output"}`` items for supervised
fine-tuning, some about a short story (made with the stories' own sentences)."""

from __future__ import annotations

import numbers
import random
from typing import Dict, List, Optional, Sequence, Tuple

from ...evaluation.passkey import _check_int, _check_seed
from .stories import BACK_REFERENCES, REFERENCE_KINDS, _episode, _fill, _story_facts, _story_intro

WORDS = ["apple", "dog", "tree", "house", "cat", "ball", "book", "river",
         "bird", "cake", "door", "hat", "moon", "star", "fish", "bread",
         "chair", "table", "cup", "milk", "boat", "garden", "flower", "sun",
         "rain", "shoe", "key", "box", "hill", "duck", "egg", "lamp", "road",
         "bed", "kite", "pear", "frog", "sock", "train", "snow"]
OPPOSITES = [("hot", "cold"), ("big", "small"), ("up", "down"), ("day", "night"),
             ("happy", "sad"), ("fast", "slow"), ("open", "closed"), ("old", "new"),
             ("tall", "short"), ("wet", "dry"), ("light", "dark"), ("in", "out"),
             ("full", "empty"), ("yes", "no"), ("left", "right"), ("early", "late")]
KNOWN_COLOURS = [("the sky", "blue"), ("grass", "green"), ("snow", "white"),
                 ("the sun", "yellow"), ("a banana", "yellow"), ("milk", "white"),
                 ("coal", "black"), ("a carrot", "orange"), ("a tomato", "red"),
                 ("a leaf", "green")]

INSTRUCTION_KINDS = (
    "pet_name", "pet_kind", "door_colour", "town", "lucky_number", "best_friend",
    "reverse_words", "sort_numbers", "upper_case", "lower_case", "count_words",
    "repeat", "first_word", "last_word", "largest_number", "next_number",
    "previous_number", "add", "opposite", "colour_of",
)


def _short_story(rng: random.Random) -> Tuple[str, Dict[str, str]]:
    """A short story (~70 words) for reading-comprehension instructions."""
    facts = _story_facts(rng)
    intro = _story_intro(facts)
    rest = intro[1:]
    rng.shuffle(rest)                      # keep "Once upon a time" first
    intro = intro[:1] + rest
    return " ".join(intro + _episode(rng, facts)), facts


def _instruction(kind: str, rng: random.Random) -> Dict[str, str]:
    """Build one ``{"instruction", "input", "output"}`` item of the given kind."""
    if kind in ("pet_name", "pet_kind", "door_colour", "town", "lucky_number", "best_friend"):
        story, f = _short_story(rng)
        n = f["name"]
        questions = {
            "pet_name": ([f"What is the name of {n}'s pet?",
                          f"What is {n}'s {f['pet']} called?"], f["pet_name"]),
            "pet_kind": ([f"What kind of pet does {n} have?",
                          f"What animal is {f['pet_name']}?"], f"a {f['pet']}"),
            "door_colour": ([f"What colour is the door of {n}'s house?",
                             f"What colour is {n}'s door?"], f["colour"]),
            "town": ([f"Where does {n} live?",
                      f"What is the name of {n}'s town?"], f["town"]),
            "lucky_number": ([f"What is {n}'s lucky number?"], f["number"]),
            "best_friend": ([f"Who is {n}'s best friend?"], f["friend"]),
        }
        options, answer = questions[kind]
        return {"instruction": "Read the story and answer the question. " + rng.choice(options),
                "input": story, "output": answer}
    if kind in ("reverse_words", "upper_case", "lower_case", "first_word", "last_word"):
        words = rng.sample(WORDS, rng.randint(3, 6))
        if kind == "reverse_words":
            return {"instruction": rng.choice(["Reverse this list of words.",
                                               "Write these words in reverse order."]),
                    "input": ", ".join(words), "output": ", ".join(reversed(words))}
        if kind == "upper_case":
            return {"instruction": "Write this word in upper case.",
                    "input": words[0], "output": words[0].upper()}
        if kind == "lower_case":
            return {"instruction": "Write this word in lower case.",
                    "input": words[0].upper(), "output": words[0]}
        if kind == "first_word":
            return {"instruction": "What is the first word in this list?",
                    "input": ", ".join(words), "output": words[0]}
        return {"instruction": "What is the last word in this list?",
                "input": ", ".join(words), "output": words[-1]}
    if kind in ("count_words", "repeat"):
        facts = _story_facts(rng)
        sentence = _fill(rng.choice(BACK_REFERENCES[rng.choice(REFERENCE_KINDS)]), facts)
        if kind == "count_words":
            return {"instruction": "How many words are in this sentence?",
                    "input": sentence, "output": str(len(sentence.split()))}
        return {"instruction": rng.choice(["Repeat this sentence.",
                                           "Say this sentence again."]),
                "input": sentence, "output": sentence}
    if kind in ("sort_numbers", "largest_number"):
        numbers_ = rng.sample(range(1, 100), rng.randint(3, 6))
        text = " ".join(str(x) for x in numbers_)
        if kind == "sort_numbers":
            return {"instruction": "Sort these numbers from smallest to largest.",
                    "input": text, "output": " ".join(str(x) for x in sorted(numbers_))}
        return {"instruction": "Which number is the largest?",
                "input": text, "output": str(max(numbers_))}
    if kind == "next_number":
        x = rng.randint(0, 98)
        return {"instruction": f"What number comes after {x}?", "input": "", "output": str(x + 1)}
    if kind == "previous_number":
        x = rng.randint(1, 99)
        return {"instruction": f"What number comes before {x}?", "input": "", "output": str(x - 1)}
    if kind == "add":
        a, b = rng.randint(0, 9), rng.randint(0, 9)
        return {"instruction": f"What is {a} plus {b}?", "input": "", "output": str(a + b)}
    if kind == "opposite":
        a, b = rng.choice(OPPOSITES)
        if rng.random() < 0.5:
            a, b = b, a
        return {"instruction": f"What is the opposite of {a}?", "input": "", "output": b}
    if kind == "colour_of":
        thing, colour = rng.choice(KNOWN_COLOURS)
        return {"instruction": f"What colour is {thing}?", "input": "", "output": colour}
    raise ValueError(f"kind must be one of {', '.join(INSTRUCTION_KINDS)}, got {kind!r}.")


def make_instructions(n: int, seed: int,
                      kinds: Optional[Sequence[str]] = None) -> List[dict]:
    """Return ``n`` distinct Alpaca items ``{"instruction", "input", "output"}``.

    Task kinds (see ``INSTRUCTION_KINDS``) are used in turn, so every kind is
    well represented; ``kinds`` restricts the mix. Some items have input "".
    """
    _check_int(n, "n")
    _check_seed(seed)
    kinds = tuple(INSTRUCTION_KINDS if kinds is None else kinds)
    if not kinds:
        raise ValueError("kinds must be a non-empty sequence of instruction kinds, got ().")
    for kind in kinds:
        if kind not in INSTRUCTION_KINDS:
            raise ValueError(f"kinds must contain only {', '.join(INSTRUCTION_KINDS)}; "
                             f"unknown kind {kind!r}.")
    rng = random.Random(seed)
    items: List[dict] = []
    seen = {}                       # dict, not set: only used for membership
    failures = 0
    i = 0
    while len(items) < n:
        kind = kinds[i % len(kinds)]
        i += 1
        for _ in range(20):         # small task spaces (e.g. "opposite") run out
            item = _instruction(kind, rng)
            key = (item["instruction"], item["input"], item["output"])
            if key not in seen:
                seen[key] = True
                items.append(item)
                failures = 0
                break
        else:
            failures += 1
            if failures > 10 * len(kinds):
                raise ValueError(f"n is too large: only {len(items)} distinct items "
                                 f"exist for kinds {kinds}.")
    return items


def split_instructions(items: Sequence[dict], held_out_fraction: float = 0.1,
                       seed: int = 0) -> Tuple[List[dict], List[dict]]:
    """Split ``items`` into ``(train, held_out)`` at random but deterministically.

    ``round(held_out_fraction * len(items))`` items are held out; both parts
    keep the original order.
    """
    _check_seed(seed)
    if (isinstance(held_out_fraction, bool) or not isinstance(held_out_fraction, numbers.Real)
            or not 0.0 <= held_out_fraction < 1.0):
        raise ValueError(f"held_out_fraction must be a number in [0, 1), got {held_out_fraction!r}.")
    items = list(items)
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    n_held = int(held_out_fraction * len(items) + 0.5)
    held = sorted(order[:n_held])
    is_held = [False] * len(items)
    for j in held:
        is_held[j] = True
    train = [it for j, it in enumerate(items) if not is_held[j]]
    held_out = [items[j] for j in held]
    return train, held_out
