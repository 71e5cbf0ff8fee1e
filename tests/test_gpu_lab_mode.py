"""The notebooks' GPU-lab mode (notebooks/_common.py) on the CPU: 16-bit weights on a GPU, and the rows chosen
by the memory model for the card it finds (given here as a figure); `bench --grid techniques --dtype bf16` past
its first AMP row."""

import gc
import importlib.util
import weakref
from pathlib import Path

import pytest
import torch

import minillama
from minillama.measuring import bench
from minillama.measuring.memory import GiB, effective_amp

REPO = Path(__file__).resolve().parents[1]
NOTEBOOK_03 = [{"mode": "train", "batch": 8, "seq_len": 128, "lora": r, "amp": a}  # notebook 03's table
               for r in (0, 16) for a in ("off", "fp16", "bf16")]


def load_common(monkeypatch, **env):
    """A fresh import of notebooks/_common.py under these MINILLAMA_* variables."""
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    spec = importlib.util.spec_from_file_location("_common_under_test", REPO / "notebooks" / "_common.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gpu_lab_mode_loads_16_bit_weights(monkeypatch):
    assert load_common(monkeypatch, MINILLAMA_DEVICE="cuda").DTYPE == "bf16"  # no CUDA call at import
    assert load_common(monkeypatch, MINILLAMA_DEVICE="cpu").DTYPE == "fp32"  # the laptop: fp32 master weights
    common = load_common(monkeypatch, MINILLAMA_DEVICE="cpu", MINILLAMA_DTYPE="bf16")
    assert {p.dtype for p in common.make_model().parameters()} == {torch.bfloat16}


@pytest.mark.parametrize("card_gib, dtype, kept", [
    (80, "bf16", {(0, "off"), (0, "fp16"), (0, "bf16"), (16, "off"), (16, "fp16"), (16, "bf16")}),
    (40, "bf16", {(16, "off"), (16, "fp16"), (16, "bf16")}),  # bf16 full fine-tuning: 50 GiB
    (80, "fp32", {(16, "off"), (16, "fp16"), (16, "bf16")}),  # fp32 full fine-tuning: 100 GiB
    (24, "fp32", set()),
])
def test_llama2_7b_rows_that_fit_a_card(card_gib, dtype, kept):
    args = minillama.get_preset("llama2-7b")
    fit, skipped = bench.configs_that_fit(NOTEBOOK_03, args, gpu_mem=card_gib * GiB, param_dtype=dtype)
    assert {(c["lora"], c["amp"]) for c in fit} == kept
    assert len(fit) + len(skipped) == len(NOTEBOOK_03)
    for cfg, why in skipped:  # each skipped row says its prediction against the card
        peak = bench.predict_config(args, cfg, param_dtype=dtype, device="cuda").peak_bytes
        assert why == f"predicted peak {peak / GiB:.2f} GiB > {(card_gib - 1) * 0.9:.2f} GiB usable of {card_gib:.2f} GiB"


def test_measure_rows_skips_what_does_not_fit_and_says_why(monkeypatch, capsys):
    # the tiny model, bf16 weights, a made-up card between the LoRA rows' peaks and the full rows' peaks
    common = load_common(monkeypatch, MINILLAMA_DEVICE="cpu", MINILLAMA_DTYPE="bf16", MINILLAMA_BATCH="2",
                         MINILLAMA_SEQ="32")
    args = minillama.get_preset("tiny")
    cfgs = [{"lora": 0}, {"lora": 8}]
    full, lora = (bench.predict_config(args, {"mode": "train", "batch": 2, "seq_len": 32, **c}, param_dtype="bf16",
                                       device="cuda").peak_bytes for c in cfgs)
    assert lora < full
    card = int(GiB + (lora + full) / 2 / 0.9)
    rows = common.measure_rows(cfgs, repeats=1, gpu_mem=card)
    assert [r["lora"] for r in rows] == [8] and rows[0]["dtype"] == "bfloat16"
    assert f"skipped mode=train batch=2 seq_len=32 lora=0: predicted peak {full / GiB:.2f} GiB" in capsys.readouterr().out


@pytest.mark.parametrize("card", ["both", "one", "none"])
def test_time_settings_never_builds_more_models_than_the_card_holds(monkeypatch, capsys, card):
    # notebook 03-05's timings on a made-up card: both models fit together (alternated), only one at a time (each
    # built, timed and freed in turn: Llama-2-7B's full fine-tunes on an 80 GiB card), or neither (skipped)
    common = load_common(monkeypatch, MINILLAMA_DEVICE="cpu", MINILLAMA_DTYPE="bf16", MINILLAMA_BATCH="2",
                         MINILLAMA_SEQ="32")
    args = minillama.get_preset("tiny")
    peak = bench.predict_config(args, {"mode": "train", "batch": 2, "seq_len": 32, "checkpointing": 0},
                                param_dtype="bf16", device="cuda").peak_bytes
    share = {"both": 2.5, "one": 1.5, "none": 0.5}[card]
    alive, built = [], []
    real = common.train_step_fn

    def counting(cfg):  # how many steps (each with its own model) are alive when another one is built
        gc.collect()
        built.append(sum(r() is not None for r in alive))
        step = real(cfg)
        alive.append(weakref.ref(step))
        return step

    monkeypatch.setattr(common, "train_step_fn", counting)
    times = common.time_settings({f"c{c}": {"checkpointing": c} for c in (0, 1)}, rounds=1,
                                 gpu_mem=int(GiB + share * peak / 0.9))
    out = capsys.readouterr().out
    if card == "none":
        assert times == {} and out.count("skipped") == 2
        return
    assert set(times) == {"c0", "c1"} and all(len(v) == 1 and v[0] > 0 for v in times.values())
    assert built == ([0, 1] if card == "both" else [0, 0])
    assert ("each setting timed alone" in out) == (card == "one")


def test_bench_techniques_grid_in_bf16_runs_its_first_amp_row():
    # `minillama bench --grid techniques --dtype bf16` measured its first AMP row (bf16 autocast over bf16
    # weights), then crashed predicting it; the same row on the tiny model: measured and predicted within 10%
    cfg = next(c for c in bench.grid_configs("techniques") if c["amp"] != "off")
    make = lambda: minillama.create_model(minillama.get_preset("tiny"), dtype=torch.bfloat16, seed=0)  # noqa: E731
    row = bench.run_config(make, {**cfg, "batch": 2, "seq_len": 32}, preset="tiny", repeats=1)
    assert row["dtype"] == "bfloat16" and row["amp"] == cfg["amp"]
    assert abs(row["prediction_error"]) < 0.10, row["prediction_error"]
    # over fp32 master weights the same autocast is modelled (weight copies); over its own dtype it changes nothing
    assert effective_amp("bf16", "fp32") == "bf16" and effective_amp("bf16", "bf16") is None
    assert effective_amp("fp16", "bf16") == "fp16" and effective_amp("off", "fp32") is None
