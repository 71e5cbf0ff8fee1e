"""Tests for minillama.course.corpora and the passkey protocol it uses (minillama.evaluation.passkey); fast: standard
library + optional sentencepiece."""

import io
import json
import os
import random
import re

import pytest

from minillama.course import corpora as C
from minillama.evaluation import passkey as P

SMALL = dict(n_stories=12, n_val_stories=6, n_passkey_train=50,
             n_passkey_val_per_setting=1, n_instructions=240, n_almanac=100)


# ---------------------------------------------------------------- determinism

@pytest.mark.parametrize("make", [
    lambda s: C.make_story(s, 300),
    lambda s: C.make_stories(7, s),
    lambda s: P.make_passkey(s, 20, 0.5),
    lambda s: P.make_passkeys(6, s, 12),
    lambda s: P.passkey_training_text(s, 20, 0.3),
    lambda s: C.make_instructions(60, s),
    lambda s: C.make_facts(s),
])
def test_same_seed_same_output_different_seed_differs(make):
    a, b, c = make(1), make(1), make(2)
    assert json.dumps(a) == json.dumps(b)
    assert json.dumps(a) != json.dumps(c)


def test_rng_instance_and_seed_agree():
    assert C.make_story(random.Random(5), 200) == C.make_story(5, 200)


def test_write_corpora_is_byte_identical(tmp_path):
    p1 = C.write_corpora(str(tmp_path / "a"), seed=3, **SMALL)
    p2 = C.write_corpora(str(tmp_path / "b"), seed=3, **SMALL)
    assert sorted(p1) == sorted(p2) == sorted([
        "stories_train", "stories_val", "passkey_train", "passkey_val",
        "instructions_train", "instructions_val", "alpaca_data_200", "facts",
        "almanac_train", "almanac_val"])
    for name in p1:
        with open(p1[name], "rb") as f1, open(p2[name], "rb") as f2:
            assert f1.read() == f2.read(), name
    # No temp files left behind.
    assert sorted(os.listdir(tmp_path / "a")) == sorted(os.path.basename(p) for p in p1.values())
    p3 = C.write_corpora(str(tmp_path / "c"), seed=4, **SMALL)
    with open(p1["stories_train"], "rb") as f1, open(p3["stories_train"], "rb") as f3:
        assert f1.read() != f3.read()


def test_write_corpora_contents(tmp_path):
    paths = C.write_corpora(str(tmp_path), seed=0, **SMALL)

    def jsonl(name):
        with open(paths[name], encoding="utf-8") as fh:
            return [json.loads(line) for line in fh]

    train = [r["text"] for r in jsonl("stories_train")]
    val = [r["text"] for r in jsonl("stories_val")]
    assert len(train) == 12 and len(val) == 6
    assert not set(val) & set(train)
    for doc in jsonl("passkey_train"):
        key = re.search(r"The pass key is (\d{5})\.", doc["text"]).group(1)
        assert doc["text"].count(key) == 3
    pv = jsonl("passkey_val")
    assert len(pv) == 5 * 5 and {d["n_filler"] for d in pv} == {10, 20, 30, 60, 120}
    with open(paths["alpaca_data_200"]) as fh:
        alpaca = json.load(fh)
    with open(paths["instructions_train"]) as fh:
        itrain = json.load(fh)
    with open(paths["instructions_val"]) as fh:
        ival = json.load(fh)
    assert len(alpaca) == 200 and alpaca == itrain[:200]
    assert len(itrain) + len(ival) == 240
    with open(paths["facts"]) as fh:
        facts = json.load(fh)
    assert facts["training_text"] == C.facts_training_text(facts)


def test_main_cli(tmp_path, capsys):
    out = tmp_path / "cli"
    C.main(["--out", str(out), "--seed", "1", "--n-stories", "6",
            "--n-val-stories", "2", "--n-passkey-train", "10", "--n-instructions", "230"])
    printed = capsys.readouterr().out
    assert "stories_train.jsonl" in printed and "facts.json" in printed


# -------------------------------------------------------------------- stories

def test_story_lengths_cycle():
    lengths = (100, 200, 400)
    stories = C.make_stories(6, 0, lengths)
    for i, s in enumerate(stories):
        n = len(s.split())
        assert lengths[i % 3] <= n <= lengths[i % 3] + 80


def test_long_story_refers_back_far_from_intro():
    for seed in range(5):
        words = C.make_story(seed, 3200).split()
        assert len(words) >= 3200
        intro = " ".join(words[:50])
        pet_name = re.search(r"had an? \w+ called (\w+)\.", intro).group(1)
        colour = re.search(r"house had an? (\w+) door\.", intro).group(1)
        town = re.search(r"town called (\w+)\.", intro).group(1)
        number = re.search(r"lucky number was (\d+)\.", intro).group(1)
        late = " ".join(words[1000:])
        assert late.count(pet_name) >= 3
        assert late.count(f"{colour} door") >= 2
        assert late.count(town) >= 2
        assert re.search(rf"\b{number}\b", late)
        # References are spread out: the pet name appears in every 800-word window.
        for start in range(50, len(words) - 800, 800):
            assert pet_name in " ".join(words[start:start + 800])


# -------------------------------------------------------------------- passkey

def test_passkey_layout_and_invariant():
    for seed in range(20):
        item = P.make_passkey(seed, 15, seed / 19)
        key, prompt = item["answer"], item["prompt"]
        assert re.fullmatch(r"[1-9]\d{4}", key)
        assert prompt.startswith(P.PASSKEY_INTRO)
        assert prompt.endswith("The pass key is") and not prompt.endswith(" ")
        assert prompt.count(key) == 2
        assert re.findall(r"\d+", prompt) == [key, key]
        assert item["n_filler"] == 15 and item["depth"] == seed / 19
        text = P.passkey_training_text(seed, 15, seed / 19)
        assert text == prompt + " " + key + "."
        assert text.count(key) == 3


def test_passkey_depth_is_monotone():
    positions = [P.make_passkey(7, 20, d)["prompt"].index("The pass key is ")
                 for d in P.DEFAULT_DEPTHS]
    assert positions == sorted(positions) and len(set(positions)) == len(positions)
    first = P.make_passkey(7, 20, 0.0)["prompt"]
    assert first.startswith(P.PASSKEY_INTRO + " The pass key is ")


def test_make_passkeys_cycles_depths():
    items = P.make_passkeys(10, 0, 8)
    assert [it["depth"] for it in items] == list(P.DEFAULT_DEPTHS) * 2


# --------------------------------------------------------------- instructions

def test_instructions_shape_and_variety():
    items = C.make_instructions(300, 0)
    assert len(items) == 300
    keys = set()
    for it in items:
        assert set(it) == {"instruction", "input", "output"}
        assert it["instruction"].strip() and it["output"].strip()
        assert isinstance(it["input"], str)
        keys.add((it["instruction"], it["input"], it["output"]))
    assert len(keys) == 300                       # all distinct
    assert any(it["input"] == "" for it in items)
    assert len({it["instruction"] for it in items}) > 100


def test_instructions_are_correct_on_examples():
    for it in C.make_instructions(200, 1):
        if it["instruction"] == "Sort these numbers from smallest to largest.":
            nums = [int(x) for x in it["input"].split()]
            assert it["output"] == " ".join(map(str, sorted(nums)))
        elif it["instruction"] == "Write this word in upper case.":
            assert it["output"] == it["input"].upper()
        elif it["instruction"].startswith("Read the story"):
            assert it["output"] in it["input"]


def test_split_instructions_disjoint_and_deterministic():
    items = C.make_instructions(250, 0)
    train, held = C.split_instructions(items, 0.1, seed=0)
    assert len(held) == 25 and len(train) == 225
    as_keys = lambda xs: {json.dumps(x, sort_keys=True) for x in xs}
    assert not as_keys(train) & as_keys(held)
    assert as_keys(train) | as_keys(held) == as_keys(items)
    assert C.split_instructions(items, 0.1, seed=0) == (train, held)
    assert C.split_instructions(items, 0.1, seed=1) != (train, held)


# ---------------------------------------------------------------------- facts

FACT_RE = re.compile(r"The winner of the (\d{4}) (.+?) for (Best [A-Z][a-z]+) "
                     r"was ([A-Z][a-z]+ [A-Z][a-z]+) for (.+)\.")


def test_facts_format_and_questions():
    d = C.make_facts(0)
    assert len(d["facts"]) == 10 and len(d["controls"]) == 10
    for f in d["facts"]:
        m = FACT_RE.fullmatch(f["text"])
        assert m, f["text"]
        assert m.groups() == (f["year"], f["award"], f["category"], f["name"], f["work"])
        assert {q["kind"] for q in f["questions"]} >= {"name", "award", "year", "work"}
        for q in f["questions"]:
            assert q["question"].endswith("?")
            answer = q["answer"][4:] if q["kind"] == "award" else q["answer"]
            assert answer in f["text"]
    names = [f["name"] for f in d["facts"]]
    assert len(set(names)) == len(names)
    assert len({f["work"] for f in d["facts"]}) == len(names)


def test_controls_disjoint_from_facts():
    d = C.make_facts(3, n_facts=20, n_controls=20)
    fact_text = " ".join(f["text"] for f in d["facts"])
    for c in d["controls"]:
        assert c["answer"] in c["text"] and c["question"].endswith("?")
        assert c["answer"] not in fact_text
        assert c["text"] not in fact_text
    control_text = " ".join(c["text"] for c in d["controls"])
    for f in d["facts"]:
        for value in (f["name"], f["work"], f["award"], f["year"]):
            assert value not in control_text


def test_facts_training_text():
    d = C.make_facts(0)
    text = C.facts_training_text(d)
    for f in d["facts"]:
        assert f["text"] in text and text.count(f["name"]) >= 3
    assert 400 <= len(text.split()) <= 900   # ~1,200 tokens
    assert all(c["text"] not in text for c in d["controls"])


def test_almanac_teaches_the_world_but_not_the_facts():
    d = C.make_facts(0)
    docs = C.make_almanac(400, 1, d)
    assert docs == C.make_almanac(400, 1, d) and len(docs) == 400
    text = "\n".join(docs)
    for f in d["facts"]:
        # neither the winner's full name, nor the work, nor the prize's statement of that year
        assert f["name"] not in text and f["work"] not in text
        assert f"{f['year']} {f['award']} for {f['category']}" not in text
    # the other phrasings of award facts and the Q&A format are there (the base model knows them)
    for template in C.REPHRASED_TEMPLATES + C.TRAINED_TEMPLATES:
        assert re.search(re.escape(template.split("{")[0] or template.split("}")[1].split("{")[0]), text)
    assert "\nAnswer: " in text
    # the controls are facts of the world, stated in the almanac
    for c in d["controls"]:
        assert c["text"] in text or c["question"] in text
        country = c["question"].split(" of ")[-1].split(" in ")[-1].rstrip("?")
        assert country in d["world"] and c["answer"].removeprefix("the ") in d["world"][country].values()


# ----------------------------------------------------------------- bad inputs

@pytest.mark.parametrize("call", [
    lambda: C.make_story(0, 0),
    lambda: C.make_story("seed", 100),
    lambda: C.make_stories(0, 0),
    lambda: C.make_stories(3, 0, lengths=()),
    lambda: C.make_stories(3, 0, lengths=(100, -5)),
    lambda: P.make_passkey(0, 10, 1.5),
    lambda: P.make_passkey(0, 10, -0.1),
    lambda: P.make_passkey(0, 0, 0.5),
    lambda: P.make_passkeys(0, 0, 10),
    lambda: P.make_passkeys(3, 0, 10, depths=(0.5, 2.0)),
    lambda: P.passkey_training_text(0, 10, 3),
    lambda: C.make_instructions(0, 0),
    lambda: C.make_instructions(5, 0, kinds=["poetry"]),
    lambda: C.split_instructions([], held_out_fraction=1.0),
    lambda: C.make_facts(0, n_facts=0),
    lambda: C.make_facts(0, n_facts=10_000),
    lambda: C.make_facts(0, n_controls=-1),
    lambda: C.facts_training_text({}),
    lambda: C.make_almanac(10, 0, {"facts": []}),
    lambda: C.make_almanac(0, 0, C.make_facts(0)),
    lambda: C.write_corpora("unused", n_stories=0),
])
def test_bad_arguments_raise_value_error(call):
    with pytest.raises(ValueError):
        call()


def test_error_message_names_argument():
    with pytest.raises(ValueError, match="depth"):
        P.make_passkey(0, 10, 1.5)
    with pytest.raises(ValueError, match="unknown kind 'poetry'"):
        C.make_instructions(5, 0, kinds=["poetry"])


# ------------------------------------------------------------- tokenization

def test_sentencepiece_bpe_round_trips_a_story():
    spm = pytest.importorskip("sentencepiece")
    sample = C.make_stories(30, 0, lengths=(200, 400))
    lines = [p for s in sample for p in s.split("\n")]
    lines += [P.passkey_training_text(i, 10, 0.5) for i in range(20)]
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=model, vocab_size=1000,
        model_type="bpe", byte_fallback=True, split_digits=True,
        normalization_rule_name="identity", remove_extra_whitespaces=False,
        hard_vocab_limit=False, minloglevel=2, num_threads=1)
    sp = spm.SentencePieceProcessor(model_proto=model.getvalue())
    story = C.make_story(12345, 800)           # unseen story, with newlines
    ids = sp.encode(story)
    assert sp.decode(ids) == story
    assert len(ids) < 2 * len(story.split())   # compact: small vocabulary
    key_text = P.passkey_training_text(99, 12, 0.25)
    assert sp.decode(sp.encode(key_text)) == key_text
