"""The stories corpus: long documents whose early facts (pet name, door colour, home town, lucky number) come
back much later, so loss only drops with more context if the model attends far back."""

from __future__ import annotations

import random
from typing import Dict, List, Sequence

from ...evaluation.passkey import ANIMALS, COLOURS, RngOrSeed, _check_each, _check_int, _check_seed, _rng

# Story lengths in words (~1.25 tokens per word). The longest, 4000 words, is
# about 5,000 tokens: far longer than the 256-token training context, which
# makes it useful for long-context and context-extension experiments.
DEFAULT_STORY_LENGTHS = (100, 200, 400, 800, 1600, 4000)


def _fill(template: str, ctx: Dict[str, str]) -> str:
    """Fill ``{slots}`` and capitalise the first letter of the sentence."""
    s = template.format(**ctx)
    return s[0].upper() + s[1:]


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
