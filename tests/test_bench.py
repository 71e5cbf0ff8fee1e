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
