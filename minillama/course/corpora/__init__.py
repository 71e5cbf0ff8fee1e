"""Synthetic corpora for the minillama course, one file per corpus.

Everything here is plain Python (standard library only) and fully
deterministic: the same seed always gives byte-identical text, in any process.
All randomness comes from ``random.Random`` instances, never the global RNG.

The corpora are tiny on purpose. The English is simple and regular, with a few
hundred distinct words plus names, so a ~5M-parameter model can learn it on a
laptop CPU in well under an hour. Each corpus makes one lesson visible:

* **stories**      (stories.py) - long documents whose early facts (pet name, door
                     colour, home town, lucky number) come back much later, so loss
                     only drops with more context if the model attends far back.
* **passkey**      (passkey_docs.py) - the Position-Interpolation "find the pass key"
                     test, scaled down: a 5-digit key hidden at a chosen depth among
                     filler sentences (the protocol is evaluation's:
                     minillama.evaluation.passkey, imported from there).
* **instructions** (instructions.py) - Alpaca-format ``{"instruction", "input",
                     "output"}`` items for supervised fine-tuning.
* **facts**        (facts.py) - fictional award facts for a knowledge-injection
                     (LoRA) experiment, plus unrelated control facts.
* **almanac**      (almanac.py) - the base model's general knowledge of that world:
                     other years' winners of the same awards, an invented geography
                     (the control facts), in several phrasings and as Q&A.

write.py writes them all (`write_corpora`). Command line::

    python -m minillama.course.corpora --out data/corpora --seed 0
"""

from .almanac import make_almanac
from .facts import REPHRASED_TEMPLATES, TRAINED_TEMPLATES, facts_training_text, make_facts, make_world
from .instructions import INSTRUCTION_KINDS, make_instructions, split_instructions
from .stories import DEFAULT_STORY_LENGTHS, make_stories, make_story
from .write import main, write_corpora

__all__ = [
    "DEFAULT_STORY_LENGTHS",
    "INSTRUCTION_KINDS",
    "make_story",
    "make_stories",
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
