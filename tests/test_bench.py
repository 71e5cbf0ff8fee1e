"""`minillama bench`: grids, rows, files, and technique registration (timings are printed, never asserted)."""

import csv
import json

import pytest
import torch

from minillama import create_model, get_preset
from minillama.measuring import bench
from minillama.cli import main

ROW_KEYS = {"name", "peak_memory_bytes", "memory_by_category", "predicted_peak_memory_bytes", "step_time_s",
            "tokens_per_s", "flops_per_step", "device_name", "torch", "dtype", "preset", "batch", "seq_len", "mode"}


def small():
    return create_model(get_preset("tiny").replace(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=128,
                                                   max_seq_len=64), seed=0)


def test_default_grid_has_train_and_inference_and_sweeps():
    cfgs = bench.grid_configs("default")
    assert {c["mode"] for c in cfgs} == {"train", "inference"}
    assert len({c["batch"] for c in cfgs}) > 1 and len({c["seq_len"] for c in cfgs}) > 1
    with pytest.raises(ValueError, match="Unknown grid 'nope'"):
        bench.grid_configs("nope")


def test_rows_have_every_field_and_files_are_written(tmp_path, monkeypatch):
    monkeypatch.setitem(bench.GRIDS, "t", {"base": {"batch": 2, "seq_len": 32}, "sweep": {"mode": ("train", "inference")}})
    rows = bench.run_grid(small, "t", preset="test", out_dir=tmp_path, repeats=1, progress=False)
    assert [r["mode"] for r in rows] == ["train", "inference"]
    for r in rows:
        assert ROW_KEYS <= set(r), ROW_KEYS - set(r)
        assert sum(r["memory_by_category"].values()) == r["peak_memory_bytes"]
    train, infer = rows
    assert train["memory_by_category"]["gradients"] > 0 and infer["memory_by_category"]["gradients"] == 0
    assert train["flops_per_step"] > 2.5 * infer["flops_per_step"]  # backward ~ 2x forward
    for f in ("results.json", "results.csv", "table.md", "memory.png", "runtime.png", "flops.png"):
        assert (tmp_path / f).stat().st_size > 0, f
    assert json.loads((tmp_path / "results.json").read_text())[0]["name"] == "mode=train batch=2 seq_len=32"
    with open(tmp_path / "results.csv") as f:
        header = next(csv.reader(f))
    assert "peak_memory_bytes" in header and "memory_gradients_bytes" in header
    md = (tmp_path / "table.md").read_text()
    assert "MiB = 1024**2 bytes" in md and "device:" in md and "torch" in md


def test_a_registered_dimension_changes_the_run(monkeypatch):
    monkeypatch.setitem(bench.DIMENSIONS, "half", bench.Dimension("half", (False, True),
                        lambda v, ctx: ctx["model"].to(torch.bfloat16) if v else None))
    monkeypatch.setitem(bench.GRIDS, "t", {"base": {"mode": "inference", "batch": 1, "seq_len": 16},
                                            "sweep": {"half": (False, True)}})
    fp32, bf16 = bench.run_grid(small, "t", preset="test", repeats=1, progress=False)
    assert bf16["memory_by_category"]["parameters"] * 2 == fp32["memory_by_category"]["parameters"]


def test_unregistered_dimension_and_bad_table_format(monkeypatch):
    monkeypatch.setitem(bench.GRIDS, "t", {"base": {}, "sweep": {"qlora": (False, True)}})
    with pytest.raises(ValueError, match="sweeps .qlora., which no technique has registered"):
        bench.grid_configs("t")
    with pytest.raises(ValueError, match="Table format 'latex'"):
        bench.format_table([], "latex")


def test_cli_bench_on_the_shipped_tiny_model(tmp_path, capsys):
    assert main(["bench", "--preset", "tiny", "--grid", "mode", "--out", str(tmp_path), "--repeats", "1",
                 "--device", "cpu"]) == 0
    rows = json.loads((tmp_path / "results.json").read_text())
    assert len(rows) == 2 and all(abs(r["prediction_error"]) < 0.10 for r in rows)
    assert "predicted MiB" in capsys.readouterr().out


def test_cli_bench_needs_weights_for_big_presets(tmp_path, capsys):
    assert main(["bench", "--preset", "llama2-7b", "--out", str(tmp_path)]) == 2
    assert "--random-weights" in capsys.readouterr().err


def test_lora_dimension_collapses_optimizer_state_and_is_predicted(monkeypatch):
    monkeypatch.setitem(bench.GRIDS, "t", {"base": {"mode": "train", "batch": 2, "seq_len": 32},
                                            "sweep": {"lora": (0, 4)}})
    full, lora = bench.run_grid(small, "t", preset="test", repeats=1, progress=False)
    assert lora["memory_by_category"]["optimizer_state"] < 0.1 * full["memory_by_category"]["optimizer_state"]
    assert abs(lora["prediction_error"]) < 0.10 and abs(full["prediction_error"]) < 0.10


# ---- the effects table, on synthetic rows (no model: fast, and the expected values are explicit; test_report uses them) ----
def fake_row(times=(0.10, 0.11, 0.12), **cfg):
    cfg = {"mode": "train", "batch": 8, "seq_len": 128, **cfg}
    mib = lambda x: int(x * 1024**2)  # noqa: E731
    cats = {"parameters": mib(16), "gradients": mib(0 if cfg.get("lora") else 16),
            "optimizer_state": mib(0.5 if cfg.get("lora") else 32),
            "activations": mib(cfg.pop("act", 40)), "temporary": mib(4)}
    return {"name": bench.config_name(cfg), **cfg, "memory_by_category": cats, "peak_memory_bytes": sum(cats.values()),
            "predicted_peak_memory_bytes": sum(cats.values()), "flops_per_step": 1e9, "step_time_s": sorted(times)[1],
            "step_times_s": list(times), "device_name": "cpu (test)", "torch": "test", "dtype": "float32",
            "preset": "test"}


def test_effects_are_true_of_every_pair_or_say_depends():
    # AMP halves activations without checkpointing, and adds 2 MiB of weight copies with it: the pairs disagree.
    rows = [fake_row(amp="off", checkpointing=0, act=40), fake_row(amp="bf16", checkpointing=0, act=20),
            fake_row(amp="off", checkpointing=1, act=2), fake_row(amp="bf16", checkpointing=1, act=4)]
    amp = {e["technique"]: e for e in bench.technique_effects(rows)}["bf16 AMP"]
    assert amp["activations"]["effect"] == "depends"
    assert (amp["activations"]["min"], amp["activations"]["max"]) == (0.5, 2.0)
    assert amp["parameters"]["effect"] == "same"
    assert "depends: 1 raises, 1 reduces (x0.50 to x2.00)" in bench.format_effects([amp])


def test_a_step_time_difference_inside_the_repeats_spread_is_within_noise():
    overlap = [fake_row(times=(1.0, 1.2, 1.5), checkpointing=0), fake_row(times=(1.3, 1.4, 1.6), checkpointing=1)]
    apart = [fake_row(times=(1.0, 1.1, 1.2), checkpointing=0), fake_row(times=(1.5, 1.6, 1.7), checkpointing=1)]
    noisy, clear = (bench.technique_effects(r)[0]["step time"] for r in (overlap, apart))
    assert noisy["effect"] == "same" and "within noise" in bench._effect_cell(noisy, "step time")
    assert clear["effect"] == "raises" and abs(clear["ratio"] - 1.6 / 1.1) < 1e-9


def test_rows_printed_one_at_a_time_line_up():
    a, b = fake_row(lora=0), fake_row(lora=16, accum=4)
    width = max(len(a["name"]), len(b["name"]))
    lines = [bench.format_table([r], "text", header=False, name_width=width) for r in (a, b)]
    for line, r in zip(lines, (a, b)):  # the first column padded to the widest name: the next starts at one place
        assert line[:width] == r["name"].ljust(width) and line[width:width + 2] == "  "
