"""Long-context evaluators (minillama.evaluation.longctx) on hand-made cases: an oracle whose generate reads the
answer out of the prompt (always right), one that never answers, and one that only finds answers planted at a
given place, so each accuracy is known in advance."""

import json
import re

import pytest
import torch

import minillama.evaluation.evaluate as evaluate
import minillama.evaluation.longctx as lc
from minillama import ModelArgs, create_model, load_tokenizer, save_model
from minillama.cli.main import main
from minillama.course.paths import tiny_model_dir
from minillama.measuring.memory import kv_cache_bytes
from minillama.rope import scaling_from_spec

ARGS = ModelArgs(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=2048, multiple_of=16, max_seq_len=512)


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(tiny_model_dir())


@pytest.fixture(scope="module")
def model():
    return create_model(ARGS, seed=0)


def oracle(tok, secret: str, where=lambda text, line: True, calls=None):
    """A stand-in for generate(): answers with the secret named in the prompt (regex `secret`) when `where`
    accepts the prompt (text, the secret's sentence), else with a word that is never an answer."""
    def fake_generate(model, prompts, max_new_tokens, **kw):
        outs = []
        for p in prompts:
            text = tok.decode(p)
            m = re.search(secret, text)
            if calls is not None:
                calls.append(text)
            right = m and where(text, m.group(0))
            outs.append(tok.encode(" " + m.group(1) + "." if right else " nothing."))
        return outs
    return fake_generate


PHRASE = r"The secret phrase is ([a-z]+ [a-z]+)\. Remember it\. \1 is the secret phrase\."
KEY = r"The pass key is (\d{5})\. Remember it\. \1 is the pass key\."


def test_phrases_always_right_and_always_wrong(model, tok, monkeypatch):
    monkeypatch.setattr(lc, "generate", oracle(tok, PHRASE))
    assert lc.phrases_accuracy(model, tok, 256, trials=4, seed=0) == {"start": 1.0, "middle": 1.0, "end": 1.0}
    monkeypatch.setattr(lc, "generate", oracle(tok, PHRASE, where=lambda text, line: False))
    assert lc.phrases_accuracy(model, tok, 256, trials=4, seed=0) == {"start": 0.0, "middle": 0.0, "end": 0.0}


def test_phrases_are_planted_where_they_say(model, tok, monkeypatch):
    # an oracle that only finds a phrase right after the intro / right before the question
    after_intro = lambda text, line: text.startswith(lc.PHRASE_INTRO + " " + line)  # noqa: E731
    before_question = lambda text, line: text.endswith(line + " " + lc.PHRASE_QUESTION)  # noqa: E731
    monkeypatch.setattr(lc, "generate", oracle(tok, PHRASE, after_intro))
    assert lc.phrases_accuracy(model, tok, 200, trials=3, seed=1) == {"start": 1.0, "middle": 0.0, "end": 0.0}
    monkeypatch.setattr(lc, "generate", oracle(tok, PHRASE, before_question))
    assert lc.phrases_accuracy(model, tok, 200, trials=3, seed=1) == {"start": 0.0, "middle": 0.0, "end": 1.0}


def test_phrases_fill_the_context_and_follow_the_seed(model, tok, monkeypatch):
    runs = []
    for seed in (5, 5, 6):
        calls = []
        monkeypatch.setattr(lc, "generate", oracle(tok, PHRASE, calls=calls))
        lc.phrases_accuracy(model, tok, 300, trials=4, seed=seed, positions=("middle",))
        runs.append(calls)
    assert runs[0] == runs[1] and runs[0] != runs[2]
    lengths = [len(tok.encode(t, bos=True)) for t in runs[0]]
    assert all(250 < n <= 300 - 8 for n in lengths), lengths  # the filler fills the window, the answer fits
    assert len({re.search(PHRASE, t).group(1) for t in runs[0]}) > 1


def test_phrase_training_text_ends_with_its_answer():
    import random

    text = lc.phrase_training_text(random.Random(3), 4, "end")
    phrase = re.search(PHRASE, text).group(1)
    assert text.endswith(lc.PHRASE_QUESTION + " " + phrase + ".") and text.count(phrase) == 3


def test_passkey_grid_counts_trials_per_depth(model, tok, monkeypatch):
    calls = []
    after_intro = lambda text, line: text.startswith("There is a pass key hidden in this text. Find it and " # noqa: E731
                                                     "remember it. " + line)
    monkeypatch.setattr(evaluate, "generate", oracle(tok, KEY, after_intro, calls))
    grid = lc.passkey_grid(model, tok, [128, 256], [0.0, 0.5, 1.0], trials=2, seed=0)
    assert grid == {128: {0.0: 1.0, 0.5: 0.0, 1.0: 0.0}, 256: {0.0: 1.0, 0.5: 0.0, 1.0: 0.0}}
    assert len(calls) == 2 * 3 * 2  # contexts x depths x trials
    monkeypatch.setattr(evaluate, "generate", oracle(tok, KEY))
    assert lc.passkey_grid(model, tok, [128], [0.25, 0.75], trials=3, seed=0) == {128: {0.25: 1.0, 0.75: 1.0}}


def test_ppl_by_context_equals_perplexity_per_length(model):
    g = torch.Generator().manual_seed(0)
    docs = [[1] + torch.randint(3, ARGS.vocab_size, (300,), generator=g).tolist() for _ in range(3)]
    got = lc.ppl_by_context(model, docs, [32, 64, 256], scored_tokens=256)
    for c in (32, 64, 256):
        assert got[c] == pytest.approx(evaluate.perplexity(model, docs, c, scored_tokens=256)["ppl"], rel=1e-6)


@pytest.mark.parametrize("dtype,nbytes", [(torch.float32, 4), (torch.bfloat16, 2)])
def test_kv_cache_profile_measures_the_formula(dtype, nbytes):
    m = create_model(ARGS.replace(max_seq_len=96), seed=0, dtype=dtype)
    rows = lc.kv_cache_profile(m, [32, 96], batch=3, decode_tokens=2)
    for r, length in zip(rows, (32, 96)):
        expected = 2 * ARGS.n_layers * 3 * ARGS.n_kv_heads * length * ARGS.head_dim * nbytes  # k and v, per layer
        assert r["measured_bytes"] == r["predicted_bytes"] == expected
        assert r["predicted_bytes"] == kv_cache_bytes(m.args, batch=3, length=length, param_dtype=dtype)
        assert r["decode_tokens_per_s"] > 0
    assert all(layer.attention.cache is None for layer in m.layers)  # the cache is released


def test_kv_cache_profile_refuses_a_cache_that_cannot_fit(monkeypatch):
    m = create_model(ARGS, seed=0)
    monkeypatch.setattr(evaluate, "available_memory_bytes", lambda device: 1024)
    with pytest.raises(ValueError, match="KV cache at context 512: a forward pass .* needs about"):
        lc.kv_cache_profile(m, [512], batch=1)
    assert all(layer.attention.cache is None for layer in m.layers)  # refused before setup_cache


def test_variant_specs_are_read_by_rope_scaling_from_spec():
    """`eval --variants` specs go through the one TYPE:FACTOR parser (rope.scaling_from_spec), named "variant"."""
    assert scaling_from_spec("base", 256, flag="variant") is None
    assert scaling_from_spec(" YaRN:4 ", 256, flag="variant") == {"rope_type": "yarn", "factor": 4.0,
                                                                  "original_max_position_embeddings": 256}
    with pytest.raises(ValueError, match=r"variant 'longrope:4': unknown type 'longrope': expected TYPE:FACTOR "
                                         r"with TYPE one of \('linear', 'ntk'"):
        scaling_from_spec("longrope:4", 256, flag="variant")
    with pytest.raises(ValueError, match="variant 'ntk:0.5': the factor must be above 1"):
        scaling_from_spec("ntk:0.5", 256, flag="variant")


def test_a_scaling_that_contradicts_the_checkpoint_is_refused():
    own = {"rope_type": "linear", "factor": 2.0}
    lc.check_scaling_agrees("ckpt", own, None)  # nothing asked: the checkpoint's own scaling is used
    lc.check_scaling_agrees("ckpt", {"type": "linear", "factor": 2.0}, {**own, "original_max_position_embeddings": 64})
    lc.check_scaling_agrees("ckpt", None, own)  # a checkpoint without scaling takes any
    with pytest.raises(ValueError, match="ckpt: its config already has rope_scaling .* contradicts the requested"):
        lc.check_scaling_agrees("ckpt", own, {"rope_type": "linear", "factor": 4.0})


def test_eval_cli_writes_json_csv_and_figures(tmp_path, capsys, model, tok):
    ckpt, data = tmp_path / "ckpt", tmp_path / "docs.jsonl"
    save_model(model, ckpt, tokenizer=tok)
    data.write_text("".join(json.dumps({"text": "Lily saw a red ball near the river. " * 30}) + "\n" for _ in range(2)))
    out = tmp_path / "kv"
    assert main(["eval", "kvcache", "--model", str(ckpt), "--context", "32,64", "--device", "cpu",
                 "--out", str(out)]) == 0
    assert "measured MiB | predicted MiB" in capsys.readouterr().out
    assert {p.name for p in out.iterdir()} == {"results.json", "results.csv", "kvcache.png"}
    assert main(["eval", "ppl", "--model", str(ckpt), "--data", str(data), "--context", "32,64", "--variants",
                 "base,linear:2,ntk:2", "--device", "cpu", "--out", str(tmp_path / "ppl")]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [ln.split("|")[0].strip() for ln in lines[2:5]] == ["base", "linear:2", "ntk:2"]
    rows = json.loads((tmp_path / "ppl" / "results.json").read_text())["rows"]
    assert [(r["variant"], r["context"]) for r in rows][:3] == [("base", 32), ("base", 64), ("linear:2", 32)]
    assert (tmp_path / "ppl" / "ppl.png").stat().st_size > 0
