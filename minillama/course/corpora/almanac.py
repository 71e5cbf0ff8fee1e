"""The almanac corpus: the base model's general knowledge of the facts' world before the LoRA: other years'
winners of the same awards and the invented geography (the control facts), in several phrasings and as Q&A,
never the facts themselves."""

from __future__ import annotations

import random
from typing import Dict, List

from ...evaluation.passkey import _check_int, _check_seed
from .facts import (AWARDS, CATEGORIES, CONTROL_TEMPLATES, COUNTRIES, FIRST_NAMES, LAST_NAMES, REPHRASED_TEMPLATES,
                    TRAINED_TEMPLATES, WORK_ADJECTIVES, WORK_NOUNS, WORLD_REPHRASINGS, YEARS, _fact_questions)

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
