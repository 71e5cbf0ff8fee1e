"""benchmarks/gpu_lab.py on the CPU with the tiny model: every finished row reaches rows.jsonl at once, a later
row's error is recorded without losing the earlier rows, the memory a failed row held is freed, a started row is
stopped at the budget, and a SIGTERM (Slurm's time limit) still leaves the tables of the finished rows."""

import gc
import importlib.util
import json
import os
import signal
import time
import weakref
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def lab():
    spec = importlib.util.spec_from_file_location("gpu_lab_under_test", REPO / "benchmarks" / "gpu_lab.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run(lab, out, rows, budget_s=600.0):
    argv = ["--out", str(out), "--device", "cpu", "--preset", "tiny", "--rows", rows, "--repeats", "1", "--batch", "1",
            "--seq-len", "16",
            "--budget-s", str(budget_s)]
    assert lab.main(argv) == 0
    return [json.loads(line) for line in (out / "rows.jsonl").read_text().splitlines()]


@pytest.mark.filterwarnings("ignore::FutureWarning")  # transformers' own deprecation inside PEFT
def test_a_failing_later_row_keeps_the_finished_rows_and_frees_its_memory(lab, tmp_path, monkeypatch):
    pytest.importorskip("peft")
    real, out, held = lab.compare_row, tmp_path / "lab", []

    def compare_row(row, s):
        if row.name == "lora-qv":  # measured for real: the tiny model beside HF + PEFT
            return real(row, s)
        if row.name == "full":  # a row after the failure, stood in for (the lab must reach it)
            return {**lab.row_header(row, s), "status": "ok"}
        # the first row is on disk before this one starts
        assert [json.loads(x)["name"] for x in (out / "rows.jsonl").read_text().splitlines()] == ["lora-qv"]
        big = [torch.zeros(1 << 20)]
        big.append(big)  # a reference cycle: only the garbage collector frees it
        held.append(weakref.ref(big[0]))
        raise OSError("libbitsandbytes_cuda121.so: cannot open shared object file")

    monkeypatch.setattr(lab, "compare_row", compare_row)
    enabled = gc.isenabled()
    gc.disable()  # only gpu_lab's own clean-up may free the cycle
    try:
        rows = run(lab, out, "lora-qv,lora-all,full")
    finally:
        if enabled:
            gc.enable()
    assert [r["name"] for r in rows] == ["lora-qv", "lora-all", "full"]  # the lab went on after the error
    assert rows[0]["status"] == "ok" and rows[2]["status"] == "ok"
    assert rows[1]["error"] == "OSError: libbitsandbytes_cuda121.so: cannot open shared object file"
    assert held[0]() is None  # freed after the failure
    doc = json.loads((out / "results.json").read_text())
    assert [r["name"] for r in doc["rows"]] == ["lora-qv", "lora-all", "full"]
    assert "| lora-all |" in (out / "table.md").read_text()


def test_the_budget_stops_a_started_row(lab, tmp_path, monkeypatch):
    def compare_row(row, s):
        time.sleep(60)  # a row far longer than the budget

    monkeypatch.setattr(lab, "compare_row", compare_row)
    monkeypatch.setattr(lab, "FIRST_ROW_GUESS_S", {"cpu": 0.0, "cuda": 0.0})  # the first row may start
    t0 = time.monotonic()
    rows = run(lab, tmp_path / "lab", "lora-qv,full", budget_s=time.monotonic() - lab.START + 2)
    assert time.monotonic() - t0 < 30
    assert rows[0]["error"] == "OverBudget: stopped at the time budget" and rows[0]["row_seconds"] < 10
    assert "would not fit in the time left" in rows[1]["skipped"]


def test_sigterm_keeps_the_finished_rows_and_writes_the_tables(lab, tmp_path, monkeypatch):
    def compare_row(row, s):
        if row.name == "lora-qv":
            return {**lab.row_header(row, s), "status": "ok"}
        os.kill(os.getpid(), signal.SIGTERM)  # Slurm's time limit
        time.sleep(60)

    monkeypatch.setattr(lab, "compare_row", compare_row)
    before = signal.getsignal(signal.SIGTERM)
    rows = run(lab, tmp_path / "lab", "lora-qv,lora-all,full")
    assert [r["name"] for r in rows] == ["lora-qv", "lora-all"]  # stopped: "full" never started
    assert rows[1]["error"].startswith("Killed: killed by SIGTERM")
    assert signal.getsignal(signal.SIGTERM) == before
    assert [r["name"] for r in json.loads((tmp_path / "lab" / "results.json").read_text())["rows"]] == \
        ["lora-qv", "lora-all"]
