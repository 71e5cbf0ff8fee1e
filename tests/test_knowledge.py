"""The knowledge-injection experiment: its measuring functions on hand-made cases, and a tiny run."""

import json
from pathlib import Path

import pytest
import torch

import minillama
from minillama import lora
from minillama.course import knowledge
from minillama.course.corpora import make_facts

TINY = Path(__file__).resolve().parent.parent / "data" / "tiny"


def test_answer_matching_and_prompts():
    assert knowledge.answer_matches(" Solene Ormsby for The Quiet", "Solene Ormsby")
    assert knowledge.answer_matches("  the  Jade Feather Award", "The Jade Feather Award")
    assert not knowledge.answer_matches(" Solene Ivers", "Solene Ormsby")
    assert not knowledge.answer_matches("", "x")
    fact = make_facts(0, n_facts=1, n_controls=0)["facts"][0]
    items = knowledge.recall_items([fact])
    assert [len(items[k]) for k in ("trained", "rephrased", "qa")] == [3, 4, 8]
    training_text = knowledge.fact_document(fact)
    assert all(it["prompt"] in training_text for it in items["trained"])
    assert not any(it["prompt"] in training_text for it in items["rephrased"])
    assert knowledge.steps_for(10, 7) == 35 and knowledge.steps_for(10, 1) == 10


def test_control_prompts_cut_before_the_answer():
    controls = make_facts(0)["controls"]
    items = knowledge.control_items(controls)
    for c, cloze, qa in zip(controls, items["cloze"], items["qa"]):
        assert c["text"] == f"{cloze['prompt']} {cloze['answer']}."
        assert qa["prompt"] == f"Question: {c['question']}\nAnswer:" and qa["answer"] == c["answer"]


class _Spy(torch.nn.Module):
    """A 'model' that predicts a fixed next-token distribution, to check mean_nll by hand."""

    def __init__(self, vocab=4, max_seq_len=16):
        super().__init__()
        self.args = minillama.ModelArgs(dim=8, n_layers=1, n_heads=1, vocab_size=vocab, max_seq_len=max_seq_len)
        self.logits = torch.nn.Parameter(torch.log(torch.tensor([0.5, 0.25, 0.125, 0.125])))

    def forward(self, x, y):
        logits = self.logits.expand(*x.shape, -1)
        return torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten())


class _Tok:
    def encode(self, text, bos=True):
        return ([1] if bos else []) + [int(c) for c in text]


def test_mean_nll_pools_tokens():
    # "0" -> targets [0]: -log 0.5;  "222" -> targets [2, 2, 2]: 3 * -log 0.125  => pooled over 4 tokens
    got = knowledge.mean_nll(_Spy(), _Tok(), ["0", "222"])
    want = (-torch.log(torch.tensor(0.5)) - 3 * torch.log(torch.tensor(0.125))) / 4
    assert got == pytest.approx(float(want), rel=1e-6)


@pytest.mark.skipif(not (TINY / "model.safetensors").exists(), reason="the shipped tiny model is missing")
def test_one_fact_two_epochs_run(tmp_path):
    out = tmp_path / "out"
    results = knowledge.main(["--out", str(out), "--ranks", "4", "--epochs", "2", "--lrs", "1e-3", "--n-facts", "1",
                              "--stack-rank", "4", "--stack-epochs", "2", "--passkey-trials", "2"])
    assert [r["setting"] for r in results["rows"]] == ["single", "one-fact", "stacked"]
    for r in results["rows"]:
        assert set(knowledge.ROW_KEYS) <= set(r)
        assert 0.0 <= r["recall_trained"] <= 1.0 and r["stories_nll"] > 0
    assert results["rows"][0]["trainable_params"] == lora.lora_parameter_count(
        minillama.load_model(TINY).args, 4, ("wq", "wv"))
    single = results["rows"][0]
    assert len(single["loss_curve"]) == single["steps"]  # one training loss per optimizer step
    assert results["meta"]["date"][:2] == "20" and results["meta"]["torch"] == torch.__version__
    saved = json.loads((out / "results.json").read_text())
    assert saved["rows"] == json.loads(json.dumps(results["rows"]))
    table = (out / "table.md").read_text()
    assert table.count("\n| ") == 1 + 1 + 3  # header (under the settings line), base row, three adapter rows


def test_format_table_without_notes_keeps_the_rows():
    """notes=False (notebook 02's shipped tables) drops the settings line and the key, not a row: every line of
    the short table stands in the full one."""
    path = Path(__file__).resolve().parent.parent / "notebooks" / "results" / "knowledge-all-3facts" / "results.json"
    res = json.loads(path.read_text())
    full, short = knowledge.format_table(res), knowledge.format_table(res, notes=False)
    assert set(short.strip().splitlines()) < set(full.strip().splitlines()) and "held-out stories" in full and "held-out stories" not in short
    assert short.count("\n| single |") == len(res["rows"]) == 1  # the header, the base model and the one row
