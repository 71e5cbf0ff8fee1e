"""Fine-tuning: the SFT data pipeline, and the trainer's techniques (accumulation, AMP + GradScaler,
checkpointing, LoRA, optimizers, checkpoints, resume) against slow explicit references."""

import errno
import json
from pathlib import Path

import pytest
import torch

import minillama
from minillama import ModelArgs, create_model
from minillama.measuring import bench
from minillama.training import TrainConfig, evaluate_loss, make_optimizer, train, train_step
from minillama.training.settings import resolve_amp
from minillama.training.data import (IGNORE_INDEX, SFTDataset, alpaca_prompt, collate, load_sft, read_alpaca,
                            split_held_out, tokenize_sft)

REPO = Path(__file__).resolve().parent.parent
TINY = REPO / "data" / "tiny"
CORPORA = REPO / "data" / "corpora"
TIMING = ("tokens_per_s", "target_tokens_per_s", "mem_mib")  # the only log fields that may differ between identical runs

ARGS = ModelArgs(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=300, max_seq_len=384, multiple_of=16)


def small_model(seed=0):
    return create_model(ARGS, seed=seed)


@pytest.fixture(scope="module")
def tok(spm_path):
    return minillama.Tokenizer(spm_path)


EXAMPLES = [
    {"instruction": "Say hello.", "input": "", "output": "Hello there."},
    {"instruction": "Add the numbers.", "input": "2 and 3", "output": "The sum is five, as two and three make five."},
    {"instruction": "Name a colour.", "input": "", "output": "Blue."},
    {"instruction": "Repeat the word.", "input": "cat", "output": "cat cat cat cat"},
    {"instruction": "Describe the sky.", "input": "", "output": "The sky is blue and wide and full of light today."},
    {"instruction": "Give an opposite.", "input": "hot", "output": "cold"},
]


def sft_data(tok, n=24, max_len=385):
    examples, _ = tokenize_sft([EXAMPLES[i % len(EXAMPLES)] for i in range(n)], tok, max_len)
    return SFTDataset(examples, pad_id=tok.eos_id)


def strip_timing(records):
    return [{k: v for k, v in r.items() if k not in TIMING} for r in records]


# ---- data ------------------------------------------------------------------------------------------
def test_alpaca_prompt_masking_and_padding(tok, tmp_path):
    assert alpaca_prompt(EXAMPLES[1]).endswith("### Input:\n2 and 3\n\n### Response:\n")
    assert "### Input" not in alpaca_prompt(EXAMPLES[0])
    examples, stats = tokenize_sft(EXAMPLES, tok, max_len=1000)
    assert stats == {"examples": 6, "truncated": 0, "dropped": 0}
    for ex, (ids, labels) in zip(EXAMPLES, examples):
        learned = [t for t, lab in zip(ids, labels) if lab != IGNORE_INDEX]
        assert learned[-1] == tok.eos_id and tok.decode(learned[:-1]) == ex["output"]
        n_prompt = labels.index(next(lab for lab in labels if lab != IGNORE_INDEX))
        assert ids[0] == tok.bos_id and tok.decode(ids[1:n_prompt]) == alpaca_prompt(ex)
        assert all(lab == t for t, lab in zip(ids[n_prompt:], labels[n_prompt:]))
    x, y = collate(examples[:3], pad_id=7)
    longest = max(len(ids) for ids, _ in examples[:3])
    assert x.shape == y.shape == (3, longest - 1)
    for row, (ids, labels) in enumerate(examples[:3]):
        n = len(ids) - 1
        assert x[row, :n].tolist() == ids[:-1] and y[row, :n].tolist() == labels[1:]
        assert (x[row, n:] == 7).all() and (y[row, n:] == IGNORE_INDEX).all()


def test_json_list_and_jsonl_read_the_same(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps(EXAMPLES))
    (tmp_path / "a.jsonl").write_text("".join(json.dumps({k: v for k, v in e.items() if v or k != "input"}) + "\n"
                                              for e in EXAMPLES))
    assert read_alpaca(tmp_path / "a.json") == read_alpaca(tmp_path / "a.jsonl") == EXAMPLES


def test_long_examples_are_truncated_and_counted_or_refused(tok):
    long = {"instruction": "Tell a story.", "input": "", "output": "word " * 200}
    prompt_len = 1 + len(tok.encode(alpaca_prompt(long), bos=False))
    short = {"instruction": "Tell a story.", "input": "", "output": "No."}
    assert len(tok.encode("No.", bos=False)) + 1 <= 5
    examples, stats = tokenize_sft([long, short], tok, max_len=prompt_len + 5)
    assert stats["truncated"] == 1 and len(examples[0][0]) == prompt_len + 5 and len(examples) == 2
    assert sum(lab != IGNORE_INDEX for lab in examples[0][1]) == 5  # the response is cut, EOS with it
    wordy = {"instruction": "Tell a story. " + "Please do. " * 40, "input": "", "output": "No."}
    examples, stats = tokenize_sft([long, short, wordy], tok, max_len=prompt_len + 5)
    assert stats == {"examples": 3, "truncated": 1, "dropped": 1} and len(examples) == 2  # wordy: no response left
    with pytest.raises(ValueError, match="No example is left to train on"):
        tokenize_sft([wordy], tok, max_len=prompt_len + 5)
    with pytest.raises(ValueError, match="Example 1 has .* tokens, more than max_len"):
        tokenize_sft([long], tok, max_len=64, on_long="error")


@pytest.mark.parametrize("content, match", [
    ('[{"instruction": "x", "output": "y"}, {"instruction": "x"}]', r"row 2: field 'output' is missing"),
    ('[{"instruction": "  ", "output": "y"}]', r"row 1: field 'instruction' is missing or empty"),
    ('[{"instruction": "x", "input": 3, "output": "y"}]', r"row 1: field 'input' must be a string"),
    ('["just text"]', r"row 1: expected an object"),
    ('{"instruction": "x", "output": "y"}\n{"instruction": "x", "output": ', r"line 2: not valid JSON"),
    ("[]", r"holds no examples"),
    ('[{"instruction": "x", "output": "y"', r"not a valid JSON list"),
])
def test_malformed_rows_name_the_row_and_field(tmp_path, content, match):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(ValueError, match=match):
        read_alpaca(path)


# ---- the trainer's techniques against explicit references -------------------------------------------
def _one_sgd_step(model, micro, cfg):
    """The change of every parameter after one SGD step with lr 1: minus the gradient."""
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    out = train_step(model, opt, torch.amp.GradScaler("cpu", enabled=False), micro, cfg)
    return {n: before[n] - p.detach() for n, p in model.named_parameters()}, out


def test_accumulated_gradient_equals_big_batch_with_ragged_padding(tok):
    data = sft_data(tok, n=4)
    lengths = [len(ids) for ids, _ in data.examples]
    assert len(set(lengths)) == 4  # ragged: every micro-batch pads differently
    cfg = TrainConfig(grad_clip=0.0)
    big, out_big = _one_sgd_step(small_model(), [data.batch([0, 1, 2, 3])], cfg)
    acc, out_acc = _one_sgd_step(small_model(), [data.batch([i]) for i in range(4)], cfg)
    assert out_big["tokens"] == out_acc["tokens"] == data.target_tokens()
    assert out_acc["loss"] == pytest.approx(out_big["loss"], rel=1e-6)
    for n in big:
        torch.testing.assert_close(acc[n], big[n], rtol=1e-5, atol=1e-7)
    # The per-micro-batch mean (the bug HF fixed in 2024) gives a different gradient here.
    model = small_model()
    for x, y in [data.batch([i]) for i in range(4)]:
        (model(x, y) / 4).backward()
    naive = model.output.weight.grad
    assert not torch.allclose(naive, big["output.weight"], rtol=1e-3, atol=1e-6)


def test_gradscaler_skips_steps_whose_gradients_overflow(tok):
    data = sft_data(tok, n=4)
    model = small_model()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 100)  # fp16 gradients overflow at this scale
    out = train_step(model, opt, scaler, [data.batch([0, 1])], TrainConfig(amp="fp16"), "fp16")
    assert out["skipped"] and scaler.get_scale() == 2.0 ** 99
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())  # nothing was applied
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 8)
    out = train_step(model, opt, scaler, [data.batch([0, 1])], TrainConfig(amp="fp16"), "fp16")
    assert not out["skipped"] and not torch.equal(before["output.weight"], model.output.weight)


def test_checkpointing_same_gradients_fewer_activation_bytes_more_flops():
    torch.manual_seed(0)
    x = torch.randint(0, ARGS.vocab_size, (2, 33))
    grads = []
    for every in (0, 1):
        model = small_model()
        model.set_checkpointing(every)
        model(x[:, :-1], x[:, 1:]).backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], rtol=0, atol=0)  # same ops, same order
    rows = {c: bench.run_config(small_model, {"mode": "train", "batch": 4, "seq_len": 64, "checkpointing": c},
                                preset="custom", warmup=0, repeats=1) for c in (0, 1)}
    act = {c: r["memory_by_category"]["activations"] for c, r in rows.items()}
    assert act[1] < 0.7 * act[0]
    assert rows[1]["flops_per_step"] > 1.15 * rows[0]["flops_per_step"]  # one more forward of every block


def test_lora_training_changes_only_adapter_weights(tok, tmp_path):
    model = small_model()
    before = {n: p.detach().clone() for n, p in model.state_dict().items()}
    cfg = TrainConfig(steps=4, batch_size=2, lr=1e-2, warmup_steps=1, lora_r=4, lora_alpha=8, save_every=4)
    train(model, sft_data(tok), {}, cfg, tmp_path, progress=False)
    after = model.state_dict()
    lora_keys = [k for k in after if ".lora_" in k]
    assert lora_keys and all(k.endswith(("lora_A.default.weight", "lora_B.default.weight")) for k in lora_keys)
    assert any(not torch.equal(after[k], torch.zeros_like(after[k])) for k in lora_keys if "lora_B" in k)
    for k, v in after.items():
        if ".lora_" not in k:
            base_key = k.replace(".base.", ".")
            assert torch.equal(v, before[base_key]), k
    ckpt = tmp_path / "checkpoint"
    assert (ckpt / "adapter" / "adapter_model.safetensors").exists() and not (ckpt / "model").exists()


@pytest.mark.parametrize("amp", ["off", "fp16", "bf16"])
def test_resume_equals_uninterrupted_with_lora_dropout_and_accumulation(tok, tmp_path, killed_at_batch, amp):
    cfg = TrainConfig(steps=6, batch_size=2, grad_accum=2, lr=5e-3, warmup_steps=2, lora_r=4, lora_alpha=8,
                      lora_dropout=0.1, amp=amp, eval_every=3, save_every=2)
    data, val = sft_data(tok), {"val": sft_data(tok, n=4)}
    full = train(small_model(), data, val, cfg, tmp_path / "full", progress=False)

    killed_at_batch(8)  # "killed" while fetching micro-batch 9 (step 5): the last save was step 4
    with pytest.raises(KeyboardInterrupt):
        train(small_model(), data, val, cfg, tmp_path / "run", progress=False)
    killed_at_batch.restore()
    resumed = train(small_model(), data, val, cfg, tmp_path / "run", resume=True, progress=False)
    assert [r["step"] for r in resumed] == [5, 6]
    assert strip_timing(resumed) == strip_timing(full[4:])  # exact on CPU
    for line in (tmp_path / "full" / "log.jsonl").read_text().splitlines():  # strict JSON (no NaN/Infinity)
        json.loads(line, parse_constant=lambda c: pytest.fail(f"non-JSON constant {c} in log.jsonl"))
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert strip_timing(log) == strip_timing(full)


def test_resume_with_a_different_config_names_the_field(tok, tmp_path):
    cfg = TrainConfig(steps=2, batch_size=2, warmup_steps=1, save_every=2)
    train(small_model(), sft_data(tok), {}, cfg, tmp_path, progress=False)
    with pytest.raises(ValueError, match="grad_accum=2 differs from the checkpoint's 1"):
        train(small_model(), sft_data(tok), {}, TrainConfig(**{**cfg.__dict__, "grad_accum": 2}), tmp_path,
              resume=True, progress=False)


def test_a_save_killed_midway_or_a_full_disk_leaves_the_previous_checkpoint(tok, tmp_path, monkeypatch):
    cfg = TrainConfig(steps=4, batch_size=2, warmup_steps=1, save_every=2)
    real_save = torch.save

    def killed(obj, path, *a, **k):  # dies while writing the second checkpoint's train_state.pt
        if obj.get("step") == 4:
            raise KeyboardInterrupt
        return real_save(obj, path, *a, **k)

    monkeypatch.setattr(torch, "save", killed)
    with pytest.raises(KeyboardInterrupt):
        train(small_model(), sft_data(tok), {}, cfg, tmp_path, progress=False)
    state = torch.load(tmp_path / "checkpoint" / "train_state.pt", weights_only=False)
    assert state["step"] == 2
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no half-written leftovers

    def full_disk(obj, path, *a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(OSError, match="Cannot write the checkpoint .* at step 4: the disk is full"):
        train(small_model(), sft_data(tok), {}, cfg, tmp_path, resume=True, progress=False)
    monkeypatch.setattr(torch, "save", real_save)
    assert torch.load(tmp_path / "checkpoint" / "train_state.pt", weights_only=False)["step"] == 2
    log = train(small_model(), sft_data(tok), {}, cfg, tmp_path, resume=True, progress=False)
    assert [r["step"] for r in log] == [3, 4]


def test_a_non_finite_loss_stops_with_the_step_and_saves_nothing(tok, tmp_path, monkeypatch):
    model = small_model()
    real_forward = type(model).forward
    calls = {"n": 0}

    def forward(self, *a, **k):
        out = real_forward(self, *a, **k)
        calls["n"] += 1
        return out * float("nan") if calls["n"] == 3 else out

    monkeypatch.setattr(type(model), "forward", forward)
    cfg = TrainConfig(steps=5, batch_size=2, warmup_steps=1, save_every=1)
    with pytest.raises(FloatingPointError, match="Stopped at step 3: the loss is nan"):
        train(model, sft_data(tok), {}, cfg, tmp_path, progress=False)
    assert torch.load(tmp_path / "checkpoint" / "train_state.pt", weights_only=False)["step"] == 2
    assert len((tmp_path / "log.jsonl").read_text().splitlines()) == 2


def test_amp_where_unsupported_warns_or_refuses(monkeypatch):
    monkeypatch.setattr(torch.amp, "is_autocast_available", lambda device_type: False)
    with pytest.warns(UserWarning, match="fp16 autocast is not available on device type 'cpu'"):
        assert resolve_amp("fp16", torch.device("cpu")) == "off"
    with pytest.raises(ValueError, match="fp16 autocast is not available"):
        resolve_amp("fp16", torch.device("cpu"), strict=True)
    with pytest.raises(ValueError, match="amp='fp8' is invalid"):
        TrainConfig(amp="fp8")


def test_fp16_weights_and_an_unwritable_output_are_refused_before_training(tok, tmp_path):
    model = small_model().half()
    with pytest.raises(ValueError, match="is fp16: pure fp16 training is not supported"):
        train(model, sft_data(tok), {}, TrainConfig(steps=1, batch_size=2), tmp_path / "a", progress=False)
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(OSError, match="Cannot write to the output directory"):
        train(small_model(), sft_data(tok), {}, TrainConfig(steps=1, batch_size=2), blocker / "out", progress=False)


@pytest.mark.parametrize("name", ["sgd", "adamw8bit", "paged_adamw8bit"])
def test_other_optimizers_train(tok, tmp_path, name):
    if name != "sgd":
        pytest.importorskip("bitsandbytes")
    cfg = TrainConfig(steps=3, batch_size=2, lr=1e-3 if name != "sgd" else 0.5, warmup_steps=1, optimizer=name,
                      lora_r=4, save_every=3)
    model = small_model()
    log = train(model, sft_data(tok), {}, cfg, tmp_path, progress=False)
    assert len(log) == 3 and all(torch.isfinite(torch.tensor(r["loss"])) for r in log)


def test_an_8bit_optimizer_without_bitsandbytes_says_how_to_install(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_bnb(name, *a, **k):
        if name == "bitsandbytes":
            raise ImportError("No module named 'bitsandbytes'")
        return real_import(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_bnb)
    with pytest.raises(ImportError, match="needs bitsandbytes, which is not installed"):
        make_optimizer(small_model(), TrainConfig(optimizer="adamw8bit"))


# ---- the CLI and the shipped model -------------------------------------------------------------------
needs_tiny = pytest.mark.skipif(not (TINY / "model.safetensors").exists(), reason="the shipped tiny model is missing")


@needs_tiny
def test_cli_train_runs_are_identical_and_resume(tmp_path):
    from minillama.cli import main

    common = ["train", "--model", str(TINY), "--data", str(CORPORA / "alpaca_data_200.json"), "--steps", "4",
              "--batch-size", "2", "--grad-accum", "2", "--lr", "1e-3", "--seed", "3", "--save-every", "2",
              "--max-len", "128", "--lora-r", "4", "--lora-dropout", "0.05", "--device", "cpu", "--quiet"]
    for run in ("a", "b"):
        assert main(common + ["--out", str(tmp_path / run)]) == 0
    logs = [[json.loads(x) for x in (tmp_path / run / "log.jsonl").read_text().splitlines()] for run in "ab"]
    assert len(logs[0]) == 4 and {"step", "loss", "lr", "tokens", "tokens_per_s"} <= set(logs[0][0])
    assert strip_timing(logs[0]) == strip_timing(logs[1])
    assert (tmp_path / "a" / "checkpoint" / "adapter" / "adapter_config.json").exists()
    assert main(common + ["--out", str(tmp_path / "a"), "--resume", "--lr", "2e-3"]) == 2  # config differs


@needs_tiny
def test_cli_bad_inputs_give_one_line_errors(tmp_path, capsys):
    from minillama.cli import main

    bad = tmp_path / "bad.json"
    bad.write_text('[{"instruction": "x", "output": "y"}, {"instruction": "x", "output": ""}]')
    base = ["train", "--model", str(TINY), "--steps", "1", "--out", str(tmp_path / "o"), "--device", "cpu", "--quiet"]
    assert main(base + ["--data", str(bad)]) == 2
    assert "row 2: field 'output' is missing or empty" in capsys.readouterr().err
    assert main(base + ["--data", str(CORPORA / "alpaca_data_200.json"), "--max-len", "64", "--on-long", "error"]) == 2
    assert "more than max_len=64" in capsys.readouterr().err
    assert main(base + ["--data", str(CORPORA / "alpaca_data_200.json"), "--max-len", "4096"]) == 2
    assert "longer than the model's context" in capsys.readouterr().err
    assert not (tmp_path / "o" / "checkpoint").exists()


@needs_tiny
def test_sft_of_the_tiny_model_lowers_validation_loss(tmp_path):
    tiny = minillama.load_model(TINY)
    tok = minillama.load_tokenizer(TINY, vocab_size=tiny.args.vocab_size)
    data, _ = load_sft(CORPORA / "alpaca_data_200.json", tok, 256, pad_id=tok.eos_id)
    val, _ = load_sft(CORPORA / "instructions_val.json", tok, 256, pad_id=tok.eos_id)
    cfg = TrainConfig(steps=40, batch_size=8, lr=3e-3, warmup_steps=4, lora_r=16, lora_alpha=32,
                      lora_dropout=0.05, eval_every=40, save_every=40)
    before = evaluate_loss(tiny, val, batch_size=16)
    log = train(tiny, data, {"val": val}, cfg, tmp_path, progress=False)
    assert log[-1]["val_loss"] < 0.6 * before


def test_held_out_split_is_disjoint(tok):
    data = sft_data(tok, n=10)
    a, b = split_held_out(data, 0.2, seed=1)
    assert len(a) == 8 and len(b) == 2
    with pytest.raises(ValueError, match="leaves no training or no held-out item"):
        split_held_out(data, 0.0)


def test_techniques_grid_and_the_effects_it_derives():
    cfgs = bench.grid_configs("techniques")
    assert len(cfgs) == 24 and len({bench.config_name(c) for c in cfgs}) == 24
    bench.GRIDS["_small"] = {"base": {"mode": "train", "batch": 4, "seq_len": 64},
                            "sweep": {"lora": (0, 4), "accum": (1, 4), "checkpointing": (0, 1)}}
    try:
        rows = bench.run_grid(small_model, "_small", preset="custom", warmup=1, repeats=1, progress=False)
    finally:
        del bench.GRIDS["_small"]
    eff = {e["technique"]: e for e in bench.technique_effects(rows)}
    assert eff["LoRA"]["optimizer state"]["effect"] == eff["LoRA"]["FLOPs per step"]["effect"] == "reduces"
    assert eff["gradient checkpointing"]["activations"]["effect"] == "reduces"
    assert eff["gradient checkpointing"]["FLOPs per step"]["effect"] == "raises"
    assert eff["gradient accumulation"]["activations"]["effect"] == "reduces"
    assert eff["gradient accumulation"]["peak memory"]["effect"] == "reduces"
    # full fine-tuning: accumulated gradients are alive in the next micro-batch's forward (the peak); without
    # accumulation the peak holds at most the gradients the backward has made so far
    full = [e for e in bench.technique_effects([r for r in rows if r["lora"] == 0])
            if e["technique"] == "gradient accumulation"][0]
    assert full["gradients"]["ratio"] > 1 and full["gradients"]["effect"] == "raises"
    assert "| LoRA | 4 |" in bench.format_effects(list(eff.values()))
