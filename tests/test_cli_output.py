"""What the command line prints: doctor's CPU facts, aligned tables, labelled training logs, progress on stderr only."""

import io
import json
import logging
import platform
import re

import pytest
import torch
from conftest import bnb_cpu_has_bf16_kernel

from minillama import create_model, get_preset
from minillama import progress as P
from minillama.cli import main
from minillama.cli.doctor import (BNB_KERNELS_LOGGER, bnb_cpu_4bit_path, cpu_bf16_support, ipykernel_note,
                                  read_cpuinfo, silence_bitsandbytes_kernels_warning)
from minillama.course.paths import corpora_dir, tiny_model_dir
from minillama.measuring import bench
from minillama.training.settings import resolve_amp
from minillama.training.train import progress_text

TINY = tiny_model_dir()
needs_tiny = pytest.mark.skipif(not (TINY / "model.safetensors").exists(), reason="the shipped tiny model is missing")

# Excerpts in the layout of Linux's /proc/cpuinfo (x86: "flags", Arm: "Features").
SAPPHIRE_RAPIDS = "processor\t: 0\nmodel name\t: Intel Xeon\nflags\t\t: fpu sse2 avx2 avx512f avx512_bf16 amx_bf16 amx_tile\n"
COOPER_LAKE = "processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512_bf16\n"
SKYLAKE = "processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512bw\n"
GRAVITON3 = "processor\t: 0\nFeatures\t: fp asimd sve bf16 i8mm\nCPU implementer\t: 0x41\n"
GRAVITON2 = "processor\t: 0\nFeatures\t: fp asimd atomics\n"


@pytest.mark.parametrize("text, expected", [
    (SAPPHIRE_RAPIDS, "native (avx512_bf16, amx_bf16)"), (COOPER_LAKE, "native (avx512_bf16)"),
    (SKYLAKE, "emulated, slow"), (GRAVITON3, "native (bf16)"), (GRAVITON2, "emulated, slow"),
    (None, "unknown"), ("processor\t: 0\n", "unknown"),
])
def test_doctor_reads_bf16_support_from_cpu_flags(text, expected):
    assert cpu_bf16_support(text).startswith(expected)


@pytest.mark.parametrize("text, expected", [
    (SAPPHIRE_RAPIDS, "fused bf16 kernel"), (COOPER_LAKE, "fused bf16 kernel"), (SKYLAKE, "fp32"),
    (GRAVITON3, "fp32"), (None, "unknown"), ("processor\t: 0\n", "unknown"),
])
def test_doctor_says_which_path_bitsandbytes_takes(text, expected):
    assert bnb_cpu_4bit_path(text).startswith(expected)


def test_doctor_agrees_with_bitsandbytes_own_check_on_this_cpu():
    pytest.importorskip("bitsandbytes")
    cpuinfo = read_cpuinfo()
    if cpuinfo is None or platform.machine() not in ("x86_64", "AMD64"):
        pytest.skip("no /proc/cpuinfo, or not an x86 CPU: bitsandbytes' bf16 kernel is x86 only")
    assert bnb_cpu_4bit_path(cpuinfo).startswith("fused bf16") == bnb_cpu_has_bf16_kernel()


@pytest.mark.parametrize("version, warns", [("7.4.0", True), ("7.0.0a1", True), ("6.31.0", False),
                                              ("not installed", False)])
def test_doctor_warns_about_ipykernel_7(version, warns):
    assert ipykernel_note(version).startswith(version) and ("issue 1554" in ipykernel_note(version)) == warns


def test_bitsandbytes_kernels_warning_is_hidden_and_counted():
    logger = logging.getLogger(BNB_KERNELS_LOGGER)
    seen = io.StringIO()
    handler = logging.StreamHandler(seen)
    logger.addHandler(handler)
    try:
        flt = silence_bitsandbytes_kernels_warning()
        assert silence_bitsandbytes_kernels_warning() is flt  # installed once
        before = flt.seen
        # bitsandbytes 0.50's message, verbatim up to the exception text
        logger.warning("Failed to load CPU gemm_4bit_forward from kernels-community: %s. Please make sure you "
                       "already `pip install kernels` and the kernels >= 0.11.1", "No module named 'kernels'")
        logger.warning("another warning")
    finally:
        logger.removeHandler(handler)
    assert flt.seen == before + 1
    assert seen.getvalue() == "another warning\n"


def _columns(line: str) -> list[int]:
    return [i for i, c in enumerate(line) if c == "|"]


@needs_tiny
def test_eval_tables_line_up_with_their_header(capsys):
    assert main(["--no-progress", "eval", "passkey", "--context", "128,160", "--trials", "5", "--device", "cpu"]) == 0
    lines = capsys.readouterr().out.splitlines()[1:]
    assert lines[0].split("|")[0].strip() == "variant" and lines[0].split("|")[1].strip() == "context"
    assert len(lines) == 3
    assert all(_columns(line) == _columns(lines[0]) for line in lines), "\n".join(lines)
    assert main(["--no-progress", "eval", "ppl", "--context", "32,300", "--scored-tokens", "300", "--max-docs", "3",
                 "--device", "cpu"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert "trained context 256" in out[0]
    lines = out[1:]
    assert [c.strip() for c in lines[0].split("|")] == ["variant", "32", "300"] and len(lines) == 2
    assert all(_columns(line) == _columns(lines[0]) for line in lines), "\n".join(lines)


@needs_tiny
def test_train_log_and_bar_name_what_they_count(tmp_path, capsys):
    args = ["--no-progress", "train", "--model", str(TINY), "--data", str(corpora_dir() / "alpaca_data_200.json"),
            "--steps", "2", "--batch-size", "2", "--max-len", "128", "--lora-r", "2", "--val-fraction", "0.05",
            "--device", "cpu", "--out", str(tmp_path)]
    assert main(args) == 0
    rec = [json.loads(x) for x in (tmp_path / "log.jsonl").read_text().splitlines()][-1]
    assert "val_loss" in rec and "val_val" not in rec
    assert "val_loss" in capsys.readouterr().out  # the final summary line
    # every position of the padded batch is processed; only the response's positions are targets
    assert rec["target_tokens"] < rec["tokens"]
    assert rec["tokens_per_s"] > rec["target_tokens_per_s"] > 0
    text = progress_text(rec)
    assert f"{rec['tokens_per_s']:,.0f} tok/s ({rec['target_tokens_per_s']:,.0f} target)" in text
    assert re.search(r"peak [\d,]+ MiB", text)
    assert f"val_loss {rec['val_loss']:.3f}" in text


def test_fp16_autocast_on_cpu_warns_with_the_alternative():
    with pytest.warns(UserWarning, match="fp16 autocast on the CPU runs.*--amp bf16.*--amp off"):
        assert resolve_amp("fp16", torch.device("cpu")) == "fp16"


def test_bench_counts_its_rows(monkeypatch, capsys):
    monkeypatch.setitem(bench.GRIDS, "t", {"base": {"batch": 2, "seq_len": 16}, "sweep": {"mode": ("train", "inference")}})
    small = lambda: create_model(get_preset("tiny").replace(dim=32, n_layers=1, n_heads=2, n_kv_heads=1,  # noqa: E731
                                                            vocab_size=64, max_seq_len=16), seed=0)
    bench.run_grid(small, "t", preset="test", repeats=1, warmup=0)
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("grid 't': 2 rows")
    assert out[1].startswith("row 1/2: ") and out[2].startswith("row 2/2: ")
    assert "peak MiB " in out[1] and "step ms " in out[1]


def test_progress_goes_to_a_terminal_only(monkeypatch):
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    P.set_progress(True)  # as `minillama` without --no-progress
    monkeypatch.setattr("sys.stderr", io.StringIO())
    assert not P.progress_wanted()  # a file or a pipe (CI logs, pytest): no bar
    monkeypatch.setattr("sys.stderr", Terminal())
    monkeypatch.delenv("MINILLAMA_PROGRESS", raising=False)
    try:
        assert P.progress_wanted() and not P.progress_wanted(False)
        P.set_progress(False)  # `minillama --no-progress`
        assert not P.progress_wanted()
        P.set_progress(True)
        monkeypatch.setenv("MINILLAMA_PROGRESS", "0")
        assert not P.progress_wanted()
        monkeypatch.delenv("MINILLAMA_PROGRESS")
        list(P.progress_bar(range(3), desc="demo"))
        assert "demo" in __import__("sys").stderr.getvalue()
    finally:
        P.set_progress(True)
