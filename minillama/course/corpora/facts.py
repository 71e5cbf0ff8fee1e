"""The facts corpus: fictional award facts for the knowledge-injection (LoRA) experiment, each stated in the
trained phrasings and asked in rephrased ones, plus unrelated control facts of an invented geography."""

from __future__ import annotations

import random
from typing import Dict, List

from ...evaluation.passkey import _check_int, _check_seed

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
