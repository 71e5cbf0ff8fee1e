"""Packing, the schedule, and the pre-training loop (few steps, tiny shapes)."""

import json

import pytest
import torch

from minillama import create_model, get_preset, load_model
from minillama.training.data import IGNORE_INDEX, pack_documents, read_jsonl_texts
from minillama.course.recipe import train_tokenizer
from minillama.training import TrainConfig, train
from minillama.training.train import lr_at


def test_packing_keeps_every_token_once_and_masks_padding():
    docs = [list(range(1, n + 1)) for n in (5, 300, 40, 7, 90)]
    x, y = pack_documents(docs, seq_len=64, pad_id=0, seed=0)
    assert x.shape[1] == y.shape[1] == 64
    # every token of every document sits in exactly one row (row = inputs + the last target)
    rows = torch.cat([x, y[:, -1:]], dim=1)
    filled = torch.cat([torch.ones_like(x[:, :1], dtype=torch.bool), y != IGNORE_INDEX], dim=1)
    assert sorted(rows[filled].tolist()) == sorted(t for d in docs for t in d)
    # targets are the next token wherever there is one; padding is never a target
    assert int((y != IGNORE_INDEX).sum()) == int(filled.sum()) - x.shape[0]
    assert torch.equal(x[:, 1:][y[:, :-1] != IGNORE_INDEX], y[:, :-1][y[:, :-1] != IGNORE_INDEX])


def test_packing_is_deterministic():
    docs = [list(range(1, n)) for n in (50, 80, 20, 130)]
    a, b = pack_documents(docs, 32, seed=3), pack_documents(docs, 32, seed=3)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_lr_schedule():
    cfg = TrainConfig(steps=100, lr=1e-3, warmup_steps=10, min_lr_ratio=0.1)
    assert lr_at(0, cfg) == pytest.approx(1e-4)
    assert lr_at(9, cfg) == pytest.approx(1e-3)
    assert lr_at(55, cfg) == pytest.approx(0.55e-3)
    assert lr_at(100, cfg) == pytest.approx(1e-4)


def test_bad_train_config():
    with pytest.raises(ValueError, match="TrainConfig.steps=0"):
        TrainConfig(steps=0)


@pytest.fixture(scope="module")
def small_data(tmp_path_factory):
    from minillama.course import corpora as C
    from minillama.evaluation import passkey as P

    texts = C.make_stories(16, seed=5, lengths=(100, 200)) + [P.passkey_training_text(i, 10, 0.5) for i in range(16)]
    tok = train_tokenizer(texts, tmp_path_factory.mktemp("tok") / "tokenizer.model", vocab_size=400)
    docs = [tok.encode(t, eos=True) for t in texts]
    return tok, pack_documents(docs, 64, seed=0)


def small_model(vocab):
    return create_model(get_preset("tiny").replace(dim=64, n_layers=2, n_heads=4, n_kv_heads=2,
                                                   vocab_size=vocab, max_seq_len=64), seed=0)


def test_a_few_steps_reduce_loss(small_data, tmp_path):
    tok, (x, y) = small_data
    model = small_model(tok.vocab_size)
    cfg = TrainConfig(steps=30, batch_size=8, lr=3e-3, warmup_steps=5, eval_every=30, save_every=30)
    log = train(model, (x, y), {"train": (x, y)}, cfg, tmp_path, tokenizer=tok, progress=False)
    assert log[-1]["val_loss_train"] < 0.7 * log[0]["loss"]
    lines = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == list(range(1, 31))
    assert {"step", "loss", "lr", "tokens", "tokens_per_s"} <= set(lines[0])
    saved = load_model(tmp_path / "checkpoint" / "model")
    assert all(torch.equal(a, b) for a, b in zip(saved.state_dict().values(), model.state_dict().values()))


def test_resume_equals_uninterrupted(small_data, tmp_path, killed_at_batch):
    tok, (x, y) = small_data
    cfg = TrainConfig(steps=8, batch_size=4, warmup_steps=2, eval_every=100, save_every=4)
    full = train(small_model(tok.vocab_size), (x, y), {}, cfg, tmp_path / "full", progress=False)

    killed_at_batch(5)  # the process is "killed" while fetching the 6th batch
    with pytest.raises(KeyboardInterrupt):
        train(small_model(tok.vocab_size), (x, y), {}, cfg, tmp_path / "run", progress=False)
    killed_at_batch.restore()
    resumed = train(small_model(tok.vocab_size), (x, y), {}, cfg, tmp_path / "run", resume=True, progress=False)
    assert [r["step"] for r in resumed] == [5, 6, 7, 8]
    assert [r["loss"] for r in resumed] == [r["loss"] for r in full[4:]]  # exact on CPU in fp32
    with pytest.raises(ValueError, match="lr=0.5 differs from the checkpoint's"):
        train(small_model(tok.vocab_size), (x, y), {}, TrainConfig(**{**cfg.__dict__, "lr": 0.5}), tmp_path / "run",
              resume=True, progress=False)
