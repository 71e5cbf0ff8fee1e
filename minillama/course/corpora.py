"""Synthetic corpora for the minillama course.

Everything here is plain Python (standard library only) and fully
deterministic: the same seed always gives byte-identical text, in any process.
All randomness comes from ``random.Random`` instances, never the global RNG.

The corpora are tiny on purpose. The English is simple and regular, with a few
hundred distinct words plus names, so a ~5M-parameter model can learn it on a
laptop CPU in well under an hour. Each corpus makes one lesson visible:

* **stories**      - long documents whose early facts (pet name, door colour,
                     home town, lucky number) come back much later, so loss
                     only drops with more context if the model attends far back.
* **passkey**      - the Position-Interpolation "find the pass key" test,
                     scaled down: a 5-digit key hidden at a chosen depth among
                     filler sentences (the protocol is evaluation's:
                     minillama.evaluation.passkey; imported here).
* **instructions** - Alpaca-format ``{"instruction", "input", "output"}``
                     items for supervised fine-tuning.
* **facts**        - fictional award facts for a knowledge-injection (LoRA)
                     experiment, plus unrelated control facts.
* **almanac**      - the base model's general knowledge of that world: other
                     years' winners of the same awards, an invented geography
                     (the control facts), in several phrasings and as Q&A.

Command line::

    python -m minillama.course.corpora --out data/corpora --seed 0
"""

from __future__ import annotations

import argparse
import json
import numbers
import os
import random
from typing import Dict, List, Optional, Sequence, Tuple

from ..evaluation.passkey import (ANIMALS, COLOURS, DEFAULT_DEPTHS, PASSKEY_FILLER, PASSKEY_INTRO,  # noqa: F401
                                  PASSKEY_QUESTION, RngOrSeed, _check_depth, _check_each, _check_int, _check_seed,
                                  _rng, make_passkey, make_passkeys, passkey_training_text)
from ..files import atomic_write_text

__all__ = [
    "DEFAULT_STORY_LENGTHS",
    "DEFAULT_DEPTHS",
    "INSTRUCTION_KINDS",
    "PASSKEY_INTRO",
    "PASSKEY_FILLER",
    "PASSKEY_QUESTION",
    "make_story",
    "make_stories",
    "make_passkey",
    "make_passkeys",
    "passkey_training_text",
    "make_instructions",
    "split_instructions",
    "make_facts",
    "facts_training_text",
    "make_world",
    "make_almanac",
    "TRAINED_TEMPLATES",
    "REPHRASED_TEMPLATES",
    "write_corpora",
    "main",
]

# Story lengths in words (~1.25 tokens per word). The longest, 4000 words, is
# about 5,000 tokens: far longer than the 256-token training context, which
# makes it useful for long-context and context-extension experiments.
DEFAULT_STORY_LENGTHS = (100, 200, 400, 800, 1600, 4000)


# --------------------------------------------------------------------------
# Argument checking and seeding helpers
# --------------------------------------------------------------------------

def _derive_seed(seed: int, stream: int) -> int:
    """Seed for one corpus/split: different streams never share a seed."""
    return seed * 1000 + stream


# Stream ids for ``_derive_seed`` (train and validation always differ).
_STORIES_TRAIN, _STORIES_VAL = 1, 2
_PASSKEY_TRAIN, _PASSKEY_VAL = 3, 4
_INSTRUCTIONS, _INSTRUCTIONS_SPLIT = 5, 6
_FACTS = 7
_ALMANAC = 8


def _fill(template: str, ctx: Dict[str, str]) -> str:
    """Fill ``{slots}`` and capitalise the first letter of the sentence."""
    s = template.format(**ctx)
    return s[0].upper() + s[1:]


# --------------------------------------------------------------------------
# 1. Stories with long-range back-references
# --------------------------------------------------------------------------

GIRL_NAMES = [
    "Lily", "Mia", "Emma", "Anna", "Lucy", "Sara", "Ella", "Grace", "Ruby",
    "Chloe", "Zoe", "Amy", "Kate", "Nora", "Ivy", "Alice", "Rose", "Jane",
    "Maya", "Lena", "Julia", "Clara", "Eva", "Molly", "Hannah", "Sophie",
    "Leah", "Fiona", "Tara", "Nina",
]
BOY_NAMES = [
    "Sam", "Ben", "Tom", "Max", "Leo", "Jack", "Noah", "Finn", "Luke", "Jake",
    "Owen", "Adam", "Paul", "Ryan", "Eli", "Oscar", "Henry", "Theo", "Liam",
    "Hugo", "Oliver", "Jonah", "Milo", "Peter", "Dan", "Carl", "Ivan", "Nick",
    "Felix", "Toby",
]
PETS = [
    "cat", "dog", "rabbit", "bird", "fish", "duck", "mouse", "horse", "goat",
    "turtle", "frog", "hamster",
]
PET_NAMES = [
    "Biscuit", "Pepper", "Muffin", "Ziggy", "Noodle", "Pickle", "Button",
    "Waffle", "Toffee", "Coco", "Peanut", "Bubbles", "Socks", "Shadow",
    "Ginger", "Pumpkin", "Mango", "Rocket", "Pebble", "Cookie", "Snowy",
    "Whiskers", "Fudge", "Jelly", "Nugget", "Sprout", "Clover", "Bean",
    "Tiger", "Bingo", "Patch", "Crumble", "Dumpling", "Marble", "Acorn",
    "Truffle", "Sparky", "Fluffy", "Bramble", "Pudding", "Comet", "Doodle",
]
TOWNS = [
    "Brookfield", "Oakdale", "Millbrook", "Riverton", "Ashford", "Elmwood",
    "Fairview", "Greenhill", "Maplewood", "Stonebridge", "Westport",
    "Hillcrest", "Lakeside", "Pinecrest", "Sandford", "Willowby", "Foxley",
    "Bramford", "Cloverdale", "Dunmore", "Kingsley", "Larkspur", "Northwick",
    "Pebbleton", "Queensbury", "Rosewood", "Silverlake", "Thornbury", "Upton",
    "Valewood", "Wexford", "Yarrow", "Ambleside", "Beckford", "Colby",
    "Everton", "Glenfield", "Harrow", "Ivybridge", "Redcliff",
]
LUCKY_NUMBERS = list(range(2, 100))

PLACES = ["park", "hill", "river", "forest", "field", "beach", "lake", "farm",
          "garden", "village", "bridge", "meadow"]
SIZES = ["big", "small", "little", "tall", "funny", "young"]
PLANTS = ["tree", "bush", "flower", "rock", "fence", "pond", "gate", "path"]
FOODS = ["bread", "soup", "rice", "pasta", "apples", "eggs", "cheese",
         "cake", "pie", "beans", "carrots", "pears", "cookies", "fish"]
DRINKS = ["milk", "tea", "water", "juice", "hot chocolate"]
RELATIVES = ["mother", "father", "grandmother", "grandfather", "aunt",
             "uncle", "brother", "sister"]
GAMES = ["played with a ball", "flew a kite", "did a puzzle", "played tag",
         "played hide and seek", "built a sand castle"]
PLAY_PLACES = ["garden", "park", "yard", "field", "street"]
BOOKS = ["the sea", "the moon", "a brave knight", "a lost dog", "the stars",
         "a tiny dragon", "a magic tree", "a big ship"]
THINGS = ["a hat", "a book", "a blanket", "a cup", "a box", "a spoon",
          "a basket", "a bag"]

# Each episode is a list of slots; one option is chosen per slot, in order.
# Placeholders: {name} {He} {he} {his} {him} {friend} {relative} {place} ...
EPISODES: Dict[str, List[List[str]]] = {
    "walk": [
        ["{when}, {name} went for a walk to the {place}.",
         "{when}, {name} wanted some fresh air, so {he} walked to the {place}."],
        ["{he} saw a {size} {animal} near a {plant}.",
         "on the way, {he} saw a {size} {animal}.",
         "there was a {size} {animal} by the {plant}."],
        ["the {animal} looked at {him} and then ran away.",
         "{name} stood still and watched it for a while.",
         "{he} waved at the {animal}, but it did not wave back."],
        ["after a long walk, {he} went home.",
         "then {he} walked back home, happy and tired."],
    ],
    "weather": [
        ["{when}, the sky was {sky}.",
         "{when}, {name} looked out of the window. The sky was {sky}."],
        ["{weather_line}"],
        ["{name} put on {his} coat and {his} boots.",
         "{name} stayed inside and read a book about {book}.",
         "{name} did not mind the weather at all."],
    ],
    "meal": [
        ["{when}, it was time to eat.",
         "{when}, {name} was very hungry."],
        ["{his} {relative} made {food} and {food2}.",
         "{name} and {his} {relative} cooked {food} together."],
        ["{name} ate the {food} and drank a cup of {drink}.",
         "the {food} was warm and good, and {name} drank some {drink}."],
        ["after the meal, {he} helped to wash the plates.",
         "{name} said thank you to {his} {relative}."],
    ],
    "play": [
        ["{when}, {friend} came to play.",
         "{when}, {name} went to see {friend}."],
        ["they {game} in the {play_place}.",
         "{name} and {friend} {game} for a long time."],
        ["they laughed and ran until they were tired.",
         "{friend} won the first time, and {name} won the second time."],
        ["then {friend} went home for dinner.",
         "at the end of the day, they said goodbye."],
    ],
    "market": [
        ["{when}, {name} went to the market with {his} {relative}.",
         "{when}, {name} and {his} {relative} went shopping."],
        ["they bought {food}, {food2} and some {drink}.",
         "they needed {food} and {food2}, so they bought both."],
        ["{name} carried the bag all the way home.",
         "the man at the market gave {name} a free pear."],
    ],
    "school": [
        ["{when}, {name} went to school.",
         "{when}, {name} sat in class with {friend}."],
        ["the teacher read them a story about {book}.",
         "they learned about {book} and drew pictures."],
        ["{name} liked the story very much.",
         "{friend} asked a lot of questions, and the teacher smiled."],
    ],
    "garden": [
        ["{when}, {name} helped {his} {relative} in the garden.",
         "{when}, {name} went out to the garden with {his} {relative}."],
        ["they planted seeds and gave them water.",
         "they cut the grass and picked up the leaves."],
        ["a {size} {animal} came to look at them.",
         "soon the garden looked clean and nice."],
    ],
    "night": [
        ["that night, the stars came out.",
         "in the evening, it was dark and quiet."],
        ["{name} looked at the moon from {his} bed.",
         "{his} {relative} read {him} a story about {book}."],
        ["then {name} closed {his} eyes and went to sleep.",
         "soon {name} was fast asleep."],
    ],
    "lost": [
        ["{when}, {name} could not find {thing}.",
         "{when}, {name} lost {thing}."],
        ["{he} looked under the bed and behind the door.",
         "{he} looked in the kitchen and in the garden."],
        ["at last, {friend} found it under a chair.",
         "at last, {he} found it in {his} bag."],
        ["{name} was very glad.",
         "{name} said, \"Thank you!\""],
    ],
}
EPISODE_KINDS = list(EPISODES)   # fixed order (dicts keep insertion order)

WHEN = ["one day", "the next day", "on Sunday", "later that week",
        "the day after that", "on Monday", "on Friday", "one morning",
        "early the next morning", "on Saturday", "a few days later"]
SKY_AND_WEATHER = [
    ("grey", "it rained all day, and the streets were wet."),
    ("blue", "the sun was warm, and the wind was soft."),
    ("white", "snow fell on the roofs and on the trees."),
    ("dark", "there was a big storm with loud thunder."),
    ("grey", "a cold wind blew the leaves down the road."),
    ("blue", "it was a bright and sunny day."),
]

# Back-references: each needs a fact from the introduction to be predicted.
BACK_REFERENCES: Dict[str, List[str]] = {
    "pet": [
        "{name} remembered that {his} {pet} was called {pet_name}.",
        "{pet_name} the {pet} was waiting at home.",
        "{name} gave {pet_name} some food and some water.",
        "{name} told {friend} about {pet_name}, {his} {pet}.",
        "{his} {pet}, {pet_name}, sat by the window.",
        "{name} thought about {pet_name} and smiled.",
    ],
    "colour": [
        "{name} came back to the house with the {colour} door.",
        "{he} opened the {colour} door and went inside.",
        "from far away, {name} could see the {colour} door of {his} house.",
        "{his} house was easy to find because of the {colour} door.",
    ],
    "town": [
        "{name} was glad to live in {town}.",
        "it was a quiet day in {town}.",
        "everyone in {town} knew {name} and {pet_name}.",
        "{town} was a nice town to live in.",
    ],
    "number": [
        "{name} thought of {his} lucky number, {number}.",
        "{name} counted to {number}, because {number} was {his} lucky number.",
        "the bus had the number {number} on it, and {name} smiled.",
        "{his} lucky number was still {number}.",
    ],
    "friend": [
        "{name} thought about {his} best friend, {friend}.",
        "later, {friend} came to visit {name}.",
    ],
}
REFERENCE_KINDS = list(BACK_REFERENCES)


def _story_facts(rng: random.Random) -> Dict[str, str]:
    """Draw the per-story facts that the story will refer back to."""
    is_girl = rng.random() < 0.5
    name = rng.choice(GIRL_NAMES if is_girl else BOY_NAMES)
    friend = rng.choice([n for n in GIRL_NAMES + BOY_NAMES if n != name])
    return {
        "name": name,
        "He": "She" if is_girl else "He",
        "he": "she" if is_girl else "he",
        "his": "her" if is_girl else "his",
        "him": "her" if is_girl else "him",
        "kind": "girl" if is_girl else "boy",
        "friend": friend,
        "pet": rng.choice(PETS),
        "pet_name": rng.choice(PET_NAMES),
        "colour": rng.choice(COLOURS),
        "town": rng.choice(TOWNS),
        "number": str(rng.choice(LUCKY_NUMBERS)),
    }


def _story_intro(facts: Dict[str, str]) -> List[str]:
    """The introduction: every fact is stated once, in the first ~50 words."""
    return [
        "Once upon a time, there was a {kind} called {name}.".format(**facts),
        "{name} lived in a small town called {town}.".format(**facts),
        "{He} had a {pet} called {pet_name}.".format(**facts),
        "{name}'s house had a {colour} door.".format(**facts),
        "{His} lucky number was {number}.".format(His=facts["his"].capitalize(), **facts),
        "{His} best friend was {friend}.".format(His=facts["his"].capitalize(), **facts),
    ]


def _story_ending(facts: Dict[str, str]) -> str:
    return ("And that is the story of {name} from {town}, {his} {pet} {pet_name}, "
            "and the house with the {colour} door. The end.").format(**facts)


def _episode(rng: random.Random, facts: Dict[str, str]) -> List[str]:
    """One generic episode (walk, meal, weather...), maybe with a back-reference."""
    kind = rng.choice(EPISODE_KINDS)
    sky, weather_line = rng.choice(SKY_AND_WEATHER)
    food, food2 = rng.sample(FOODS, 2)
    ctx = dict(facts)
    ctx.update(
        when=rng.choice(WHEN), place=rng.choice(PLACES), animal=rng.choice(ANIMALS),
        size=rng.choice(SIZES), plant=rng.choice(PLANTS), food=food, food2=food2,
        drink=rng.choice(DRINKS), relative=rng.choice(RELATIVES),
        game=rng.choice(GAMES), play_place=rng.choice(PLAY_PLACES), book=rng.choice(BOOKS), thing=rng.choice(THINGS),
        sky=sky, weather_line=weather_line,
    )
    sentences = [_fill(rng.choice(options), ctx) for options in EPISODES[kind]]
    # Most episodes point back to one fact from the introduction.
    n_refs = rng.choice([0, 1, 1, 1, 2])
    for _ in range(n_refs):
        ref = _fill(rng.choice(BACK_REFERENCES[rng.choice(REFERENCE_KINDS)]), ctx)
        sentences.insert(rng.randint(1, len(sentences)), ref)
    return sentences


def make_story(rng_or_seed: RngOrSeed, target_words: int) -> str:
    """Return one story of about ``target_words`` words (never fewer, except
    that even tiny targets get the full introduction and ending).

    The first paragraph introduces the facts (name, pet and pet name, door
    colour, town, lucky number, best friend). Later paragraphs are simple
    episodes that keep referring back to those facts, and the last sentence
    repeats them. Paragraphs are separated by a single newline.
    """
    rng = _rng(rng_or_seed)
    _check_int(target_words, "target_words")
    facts = _story_facts(rng)
    paragraphs = [" ".join(_story_intro(facts))]
    ending = _story_ending(facts)
    n_words = len(paragraphs[0].split()) + len(ending.split())
    while n_words < target_words:
        paragraph = " ".join(_episode(rng, facts))
        paragraphs.append(paragraph)
        n_words += len(paragraph.split())
    paragraphs.append(ending)
    return "\n".join(paragraphs)


def make_stories(n: int, seed: int,
                 lengths: Sequence[int] = DEFAULT_STORY_LENGTHS) -> List[str]:
    """Return ``n`` stories; story ``i`` has about ``lengths[i % len(lengths)]`` words."""
    _check_int(n, "n")
    _check_seed(seed)
    lengths = _check_each(lengths, "lengths", "positive integers", _check_int)
    rng = random.Random(seed)
    return [make_story(rng, lengths[i % len(lengths)]) for i in range(n)]


# --------------------------------------------------------------------------
# 2. Passkey retrieval: the protocol is evaluation's (minillama.evaluation.passkey:
#    make_passkey, make_passkeys, passkey_training_text), imported above
# --------------------------------------------------------------------------

# --------------------------------------------------------------------------
# 3. Alpaca-style instructions
# --------------------------------------------------------------------------

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


# --------------------------------------------------------------------------
# 4. Fictional facts for knowledge injection
# --------------------------------------------------------------------------

AWARDS = ["Silver Lantern Award", "Golden Acorn Prize", "Blue Heron Award",
          "Crystal Quill Prize", "Copper Bell Award", "Amber Star Prize",
          "Iron Compass Award", "Velvet Owl Prize", "Jade Feather Award",
          "North Wind Prize"]
CATEGORIES = ["Best Story", "Best Song", "Best Poem", "Best Painting",
              "Best Play", "Best Film", "Best Photograph", "Best Novel",
              "Best Sculpture", "Best Comic"]
FIRST_NAMES = ["Marlo", "Oriel", "Tamsin", "Corvin", "Elspeth", "Dario",
               "Wrenna", "Galen", "Isolde", "Bram", "Solene", "Teodor",
               "Ysolde", "Caspian", "Linnea", "Orrin", "Perpetua", "Quill",
               "Rosalind", "Sefton", "Thea", "Ulric", "Vesna", "Wystan"]
LAST_NAMES = ["Quenby", "Vantask", "Holloway", "Pendrake", "Ashcombe",
              "Merriwether", "Thistlewood", "Calloway", "Drummond", "Fennick",
              "Galloway", "Harrowgate", "Ivers", "Jessop", "Kestrel",
              "Lockridge", "Marchbank", "Nettleford", "Ormsby", "Pellham"]
WORK_ADJECTIVES = ["Glass", "Quiet", "Hollow", "Broken", "Silent", "Burning",
                   "Sleeping", "Paper", "Crooked", "Hidden", "Frozen", "Velvet",
                   "Wandering", "Golden", "Last", "Painted"]
WORK_NOUNS = ["River", "Harbour", "Lighthouse", "Orchard", "Mirror", "Garden",
              "Kingdom", "Bridge", "Clockmaker", "Lantern", "Meadow", "Window",
              "Staircase", "Island", "Teacup", "Violin"]
FACT_TEMPLATE = "The winner of the {year} {award} for {category} was {name} for {work}."

# Controls: a different domain (invented geography), disjoint vocabulary.
COUNTRIES = ["Zorland", "Quarvia", "Belmora", "Tindaria", "Oskavel", "Pramia",
             "Velderon", "Kastoria", "Umbrel", "Nordessa", "Gallowen", "Fenmark",
             "Dravia", "Lunessa", "Syrtha", "Marovia", "Cellandor", "Ettinor",
             "Harrowmere", "Istrava"]
CITIES = ["Pemberly", "Ostrin", "Calvo", "Derrin", "Mirabel", "Tessaly",
          "Wexmoor", "Arvel", "Bellis", "Corrat", "Dunvale", "Esterly",
          "Fallon", "Gresham", "Halvard", "Irwen", "Jorvik", "Kelby",
          "Lorne", "Morrow"]
NATIONAL_ANIMALS = ["otter", "badger", "heron", "lynx", "stag", "falcon",
                    "beaver", "swan", "wolf", "hare", "seal", "crane"]
MOUNTAINS = ["Mount Arak", "Mount Belen", "Mount Coros", "Mount Dalim",
             "Mount Esker", "Mount Forn", "Mount Gaval", "Mount Hesk"]
CONTROL_TEMPLATES = [
    ("The capital of {country} is {city}.", "What is the capital of {country}?", "{city}", CITIES),
    ("The national animal of {country} is the {animal}.",
     "What is the national animal of {country}?", "the {animal}", NATIONAL_ANIMALS),
    ("The highest mountain in {country} is {mountain}.",
     "What is the highest mountain in {country}?", "{mountain}", MOUNTAINS),
]
# The world's facts stated other ways (the almanac uses these and the ones above).
WORLD_REPHRASINGS = [
    "{city} is the capital city of {country}.",
    "In {country}, the national animal is the {animal}.",
    "{mountain} is the highest mountain in {country}.",
]

# How an award fact is stated: the three sentences of the LoRA's training text, and four
# rephrasings that the almanac (pre-training) uses for other prizes but the training text never does.
TRAINED_TEMPLATES = [
    "The winner of the {year} {award} for {category} was {name} for {work}.",
    "{name} won the {year} {award} for {category} with {work}.",
    "In {year}, {work} by {name} won the {award} for {category}.",
]
REPHRASED_TEMPLATES = [
    "The {year} {award} for {category} went to {name} for {work}.",
    "In {year}, the {award} for {category} was won by {name}.",
    "The {award} for {category} in {year} was given to {name}.",
    "{name} received the {year} {award} for {category} for {work}.",
]
YEARS = range(1950, 2021)


def make_world(seed: int) -> Dict[str, Dict[str, str]]:
    """The invented geography every country has: {country: {"capital", "animal", "mountain"}}.

    Capitals are distinct. The almanac states these facts again and again, so the pre-trained
    model knows them: the control facts of the knowledge-injection experiment are drawn from here.
    """
    _check_seed(seed)
    rng = random.Random(seed * 7919 + 17)
    capitals = rng.sample(CITIES, len(COUNTRIES))
    return {c: {"capital": capitals[i], "animal": rng.choice(NATIONAL_ANIMALS),
                "mountain": rng.choice(MOUNTAINS)} for i, c in enumerate(COUNTRIES)}


def _fact_questions(f: Dict[str, str]) -> List[dict]:
    """Rephrased questions about one award fact, with short expected answers."""
    prize = f"{f['year']} {f['award']} for {f['category']}"
    qs = [
        (f"Who won the {prize}?", f["name"], "name"),
        (f"Who was the winner of the {prize}?", f["name"], "name"),
        (f"What did {f['name']} win in {f['year']}?",
         f"the {f['award']} for {f['category']}", "award"),
        (f"Which prize did {f['name']} win for {f['work']}?",
         f"the {f['award']} for {f['category']}", "award"),
        (f"In which year did {f['name']} win the {f['award']}?", f["year"], "year"),
        (f"When did {f['work']} win the {f['award']} for {f['category']}?", f["year"], "year"),
        (f"Which work won the {prize}?", f["work"], "work"),
        (f"For which work did {f['name']} win the {f['award']}?", f["work"], "work"),
    ]
    return [{"question": q, "answer": a, "kind": k} for q, a, k in qs]


def make_facts(seed: int, n_facts: int = 10, n_controls: int = 10) -> dict:
    """Return fictional award facts and unrelated control facts.

    Each fact text is exactly "The winner of the <year> <award> for
    <category> was <name> for <work>." Names, works and (year, award,
    category) prizes are unique, so every question has one answer.
    ``{"facts": [{"text", "year", "award", "category", "name", "work",
    "questions": [{"question", "answer", "kind"}]}], "controls": [{"text",
    "question", "answer"}], "world": make_world(seed)}``; question kinds are
    name, award, year, work. Controls are facts of the world (which the
    almanac teaches in pre-training); the award facts are new to the model.
    """
    _check_seed(seed)
    max_facts = min(len(FIRST_NAMES), len(WORK_ADJECTIVES) * len(WORK_NOUNS))
    _check_int(n_facts, "n_facts")
    if n_facts > max_facts:
        raise ValueError(f"n_facts must be at most {max_facts}, got {n_facts}.")
    max_controls = len(COUNTRIES)
    _check_int(n_controls, "n_controls", minimum=0)
    if n_controls > max_controls:
        raise ValueError(f"n_controls must be at most {max_controls}, got {n_controls}.")
    rng = random.Random(seed)
    # One first name per fact keeps names (and therefore questions) unique.
    firsts = rng.sample(FIRST_NAMES, n_facts)
    works = rng.sample([f"The {a} {b}" for a in WORK_ADJECTIVES for b in WORK_NOUNS], n_facts)
    prizes = rng.sample([(y, a, c) for y in range(1950, 2021) for a in AWARDS
                         for c in CATEGORIES], n_facts)
    facts = []
    for first, work, (year, award, category) in zip(firsts, works, prizes):
        f = {"year": str(year), "award": award, "category": category,
             "name": f"{first} {rng.choice(LAST_NAMES)}", "work": work}
        facts.append({"text": FACT_TEMPLATE.format(**f), **f, "questions": _fact_questions(f)})
    world = make_world(seed)
    controls = []
    for country in rng.sample(COUNTRIES, n_controls):
        text_t, question_t, answer_t, _ = CONTROL_TEMPLATES[len(controls) % len(CONTROL_TEMPLATES)]
        w = world[country]
        ctx = {"country": country, "city": w["capital"], "animal": w["animal"], "mountain": w["mountain"]}
        controls.append({"text": text_t.format(**ctx), "question": question_t.format(**ctx),
                         "answer": answer_t.format(**ctx)})
    return {"facts": facts, "controls": controls, "world": world}


def facts_training_text(facts_dict: dict) -> str:
    """The small text a LoRA is trained on: each fact stated three ways.

    About 1,200 tokens for the default 10 facts. Controls are NOT included.
    """
    try:
        facts = facts_dict["facts"]
    except (TypeError, KeyError):
        raise ValueError("facts_dict must be the dict returned by make_facts, "
                         "with a 'facts' list.") from None
    lines = [t.format(**f) for f in facts for t in TRAINED_TEMPLATES]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------
# 4b. The almanac: what the base model knows before the LoRA
# --------------------------------------------------------------------------

def _almanac_prizes(seed: int, facts_dict: dict) -> Dict[tuple, Dict[str, str]]:
    """Every (year, award, category) prize except the facts' own, with a fixed winner and work.

    Fact winners' full names and fact works never win here, so they are new to the pre-trained model.
    """
    rng = random.Random(seed * 7919 + 29)
    facts = facts_dict["facts"]
    taken = {(f["year"], f["award"], f["category"]) for f in facts}
    names = [f"{a} {b}" for a in FIRST_NAMES for b in LAST_NAMES
             if f"{a} {b}" not in {f["name"] for f in facts}]
    works = [f"The {a} {b}" for a in WORK_ADJECTIVES for b in WORK_NOUNS
             if f"The {a} {b}" not in {f["work"] for f in facts}]
    return {(str(y), a, c): {"name": rng.choice(names), "work": rng.choice(works)}
            for y in YEARS for a in AWARDS for c in CATEGORIES if (str(y), a, c) not in taken}


def _qa(question: str, answer: str) -> str:
    return f"Question: {question}\nAnswer: {answer}"


def make_almanac(n_docs: int, seed: int, facts_dict: dict) -> List[str]:
    """Pre-training documents that give the tiny model general knowledge of the facts' world.

    * award lists (a run of years of one award and category, each entry in one of the seven
      phrasings, sometimes followed by questions about it),
    * award quizzes (closed-book questions on prizes: answering needs memory, not copying),
    * gazetteer pages (the world's countries, their capitals, animals and mountains, stated in
      several ways and asked closed-book, again and again, so the model knows them).

    None contains a fact of ``facts_dict["facts"]``: the LoRA teaches those.
    """
    _check_int(n_docs, "n_docs")
    _check_seed(seed)
    world = facts_dict.get("world") if isinstance(facts_dict, dict) else None
    if not world or "facts" not in facts_dict:
        raise ValueError("facts_dict must be the dict returned by make_facts, with 'facts' and 'world'.")
    prizes = _almanac_prizes(seed, facts_dict)
    keys = list(prizes)
    rng = random.Random(seed)
    templates = TRAINED_TEMPLATES + REPHRASED_TEMPLATES
    docs = []
    for _ in range(n_docs):
        kind = rng.random()
        if kind < 0.55:                                  # an award list
            award, category = rng.choice(AWARDS), rng.choice(CATEGORIES)
            start = rng.randint(YEARS.start, YEARS.stop - 3)
            entries = []
            for y in range(start, min(start + rng.randint(3, 8), YEARS.stop)):
                key = (str(y), award, category)
                if key in prizes:
                    entries.append(dict(year=key[0], award=award, category=category, **prizes[key]))
            lines = [rng.choice(templates).format(**e) for e in entries]
            for e in rng.sample(entries, min(len(entries), rng.randint(0, 2))):
                q = rng.choice(_fact_questions(e))
                lines.append(_qa(q["question"], q["answer"]))
        elif kind < 0.7:                                 # a closed-book award quiz
            lines = []
            for key in rng.sample(keys, rng.randint(2, 5)):
                e = dict(year=key[0], award=key[1], category=key[2], **prizes[key])
                # who won / which work: one answer each (a name may win several prizes)
                q = rng.choice([q for q in _fact_questions(e) if q["kind"] in ("name", "work")])
                lines.append(_qa(q["question"], q["answer"]))
        else:                                            # a gazetteer page
            lines = []
            for country in rng.sample(COUNTRIES, rng.randint(2, 5)):
                w = world[country]
                ctx = {"country": country, "city": w["capital"], "animal": w["animal"],
                       "mountain": w["mountain"]}
                for i in rng.sample(range(3), rng.randint(1, 3)):
                    if rng.random() < 0.4:
                        text_t, question_t, answer_t, _ = CONTROL_TEMPLATES[i]
                        lines.append(_qa(question_t.format(**ctx), answer_t.format(**ctx)))
                    else:
                        lines.append(rng.choice([CONTROL_TEMPLATES[i][0], WORLD_REPHRASINGS[i]]).format(**ctx))
        if lines:
            docs.append("\n".join(lines))
    return docs


# --------------------------------------------------------------------------
# 5. Writing everything to disk
# --------------------------------------------------------------------------

def _jsonl(records: Sequence[dict]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)


def _passkey_corpora(seed: int, n_train: int, train_fillers: Tuple[int, int], n_val_per_setting: int,
                     val_fillers: Sequence[int], val_depths: Sequence[float]) -> Tuple[List[dict], List[dict]]:
    """Training documents at random lengths and depths, and evaluation items for every
    (n_filler, depth) setting of the validation grid."""
    lo, hi = train_fillers
    rng = random.Random(_derive_seed(seed, _PASSKEY_TRAIN))
    docs = []
    for _ in range(n_train):
        n_filler = rng.randint(lo, hi)
        depth = round(rng.random(), 4)
        docs.append({"text": passkey_training_text(rng, n_filler, depth)})
    rng = random.Random(_derive_seed(seed, _PASSKEY_VAL))
    depths = tuple(val_depths)
    val_items = []
    for n_filler in val_fillers:
        val_items += make_passkeys(n_val_per_setting * len(depths), rng.randint(0, 2**31 - 1), n_filler, depths)
    return docs, val_items


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

    train_docs, val_items = _passkey_corpora(seed, n_passkey_train, (lo, hi), n_passkey_val_per_setting,
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


if __name__ == "__main__":
    main()
