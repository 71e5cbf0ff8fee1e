"""The shipped tiny model (data/tiny), its tokenizer, the checked-in corpora and the eval commands."""

import json
import shutil
from pathlib import Path

import pytest
import torch

import minillama
from minillama.course import corpora as C
from minillama.cli import main
from minillama.training.data import read_jsonl_texts
from minillama.evaluation.evaluate import passkey_accuracy, perplexity

REPO = Path(__file__).resolve().parent.parent
TINY = REPO / "data" / "tiny"
CORPORA = REPO / "data" / "corpora"


@pytest.fixture(scope="module")
def tiny():
    return minillama.load_model(TINY)


@pytest.fixture(scope="module")
def tok(tiny):
    return minillama.load_tokenizer(TINY, vocab_size=tiny.args.vocab_size)


def test_shipped_files_and_size():
    files = {p.name: p.stat().st_size for p in TINY.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.model", "MODEL_CARD.md"} <= set(files)
    assert sum(files.values()) <= 30 * 1024**2


def test_shipped_model_shape(tiny, tok):
    assert tiny.args.max_seq_len == 256 and 2000 <= tiny.args.vocab_size <= 8192
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (1, 2, -1)


def test_checked_in_corpora_are_what_the_command_regenerates(tmp_path):
    C.write_corpora(str(tmp_path), seed=0)
    checked_in = sorted(p.name for p in CORPORA.iterdir() if p.is_file())
    assert "alpaca_data_200.json" in checked_in and "facts.json" in checked_in
    for name in checked_in:
        assert (CORPORA / name).read_bytes() == (tmp_path / name).read_bytes(), name


@pytest.mark.parametrize("name", ["stories_val.jsonl", "passkey_val.jsonl"])
def test_tokenizer_round_trips_the_corpora(tok, name):
    rows = [json.loads(line) for line in (CORPORA / name).read_text().splitlines()]
    texts = [r.get("text") or r["prompt"] for r in rows]
    for t in texts:
        ids = tok.encode(t, bos=False)
        assert tok.decode(ids) == t
    assert 0 not in tok.encode(" ".join(texts[:5]))  # byte fallback: never <unk>


def test_tokenizer_round_trips_instructions_and_facts(tok):
    items = json.loads((CORPORA / "alpaca_data_200.json").read_text())
    texts = [it[k] for it in items for k in ("instruction", "input", "output") if it[k]]
    texts.append(C.facts_training_text(json.loads((CORPORA / "facts.json").read_text())))
    assert all(tok.decode(tok.encode(t, bos=False)) == t for t in texts)


def test_passkey_accuracy_at_256_is_at_least_90_percent(tiny, tok):
    r = passkey_accuracy(tiny, tok, context=256, trials=30, seed=99)
    assert r["prompt_tokens"] <= 256 and r["accuracy"] >= 0.9, r


def test_longer_context_lowers_perplexity_within_the_trained_length(tiny, tok):
    docs = [tok.encode(t) for t in read_jsonl_texts(CORPORA / "stories_val.jsonl")][:24]
    ppl = [perplexity(tiny, docs, c, scored_tokens=256)["ppl"] for c in (64, 256)]
    assert ppl[1] < ppl[0]


def test_eval_commands_produce_rows(capsys):
    assert main(["eval", "ppl", "--model", str(TINY), "--context", "64,128,512", "--max-docs", "12",
                 "--device", "cpu", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["context"] for r in rows] == [64, 128, 512]
    assert [r["beyond_trained_context"] for r in rows] == [False, False, True]
    assert len({r["tokens"] for r in rows}) == 1  # the same tokens scored at every length
    assert main(["eval", "passkey", "--model", str(TINY), "--context", "128", "--trials", "5", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "overall" in out and "depth 0.5" in out


# ---- bad input ------------------------------------------------------------------------------
@pytest.fixture
def tiny_copy(tmp_path):
    d = tmp_path / "tiny"
    shutil.copytree(TINY, d)
    return d


def test_truncated_weights(tiny_copy):
    f = tiny_copy / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(ValueError, match="model.safetensors is not a readable safetensors file"):
        minillama.load_model(tiny_copy)


def test_config_not_matching_weights(tiny_copy):
    cfg = json.loads((tiny_copy / "config.json").read_text())
    cfg["n_kv_heads"] = cfg["n_heads"]
    (tiny_copy / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"'layers.0.attention.wk.weight' has shape \[\d+, \d+\] but config.json"):
        minillama.load_model(tiny_copy)


def test_tokenizer_of_another_model(tiny, spm_path):
    with pytest.raises(ValueError, match="vocab_size is"):
        minillama.load_tokenizer(spm_path, vocab_size=tiny.args.vocab_size)


def test_eval_context_beyond_memory_is_refused_before_allocating(tiny, tok, monkeypatch):
    import minillama.evaluation.evaluate as E

    monkeypatch.setattr(E, "available_memory_bytes", lambda device: 1024**2)
    docs = [tok.encode(t) for t in read_jsonl_texts(CORPORA / "stories_val.jsonl")][:12]
    with pytest.raises(ValueError, match="more than the 0.0 GiB available"):
        perplexity(tiny, docs, 256, scored_tokens=256)


def test_eval_memory_check_predicts_what_perplexity_allocates(tiny):
    # forward_bytes (the memory model's eval peak less the weights) against MemoryTracker's exact count of
    # perplexity's own forward (the model's chunked loss); tolerance 10% as in test_memory.py
    from minillama.evaluation.evaluate import forward_bytes
    from minillama.measuring.measure import MemoryTracker

    t = torch.randint(0, tiny.args.vocab_size, (4, 129), generator=torch.Generator().manual_seed(0))
    tracker = MemoryTracker(tiny)
    with torch.no_grad(), tracker:
        tiny(t[:, :-1], t[:, 1:], reduction="sum")
    measured = tracker.peak_bytes - tracker.by_category()["parameters"]
    assert abs(forward_bytes(tiny, 4, 128, "eval") / measured - 1) < 0.10, (forward_bytes(tiny, 4, 128), measured)


def test_passkey_memory_check_counts_the_kv_cache(tiny):
    # kv_cache_bytes against the buffers Transformer.setup_cache really allocates
    from minillama.evaluation.evaluate import forward_bytes
    from minillama.measuring.memory import kv_cache_bytes

    model = minillama.create_model(tiny.args.replace(n_kv_heads=2), seed=0)
    model.setup_cache(3, 100)
    cache = sum(b.nbytes for name, b in model.named_buffers() if ".cache." in name)
    assert cache == kv_cache_bytes(model.args, batch=3, length=100) > 0
    assert forward_bytes(model, 3, 64, "inference", kv_cache=100) == forward_bytes(model, 3, 64, "inference") + cache


def test_unknown_corpus_name(capsys):
    assert main(["eval", "ppl", "--model", str(TINY), "--data", "novels", "--device", "cpu"]) == 2
    assert "Unknown corpus 'novels'" in capsys.readouterr().err
