"""`minillama plan`: the planner's predictions against measured `minillama bench` rows (CPU, tiny model),
its ranking rules, and its bad inputs."""

import pytest
import torch

import minillama
from minillama.cli.main import main
from minillama.config import get_preset
from minillama.course.paths import tiny_model_dir
from minillama.measuring import bench
from minillama.measuring.memory import MiB
from minillama.measuring.plan import best_per_method, compute_per_token, format_plan, parse_size, plan

SEQ, BATCH = 64, 4


@pytest.fixture(scope="module")
def tiny_args():
    return minillama.load_model(tiny_model_dir()).args


def _printed_rows(rows, top):
    """The rows format_plan prints: the best of each method, then the next fitting ones up to `top`."""
    best = best_per_method(rows)
    return best + [r for r in rows if r.fits and r not in best][: top - len(best)]


def test_every_printed_prediction_matches_a_measured_bench_row(tiny_args):
    """Each configuration the planner prints for the tiny model on a CPU 'device' of 48 MiB is measured by
    bench.run_config (the trainer's own step, MemoryTracker's live bytes): within 10%."""
    rows = plan(tiny_args, gpu_mem=48 * MiB, seq_len=SEQ, batch=BATCH, device="cpu", lora_r=8)
    printed = _printed_rows(rows, top=8)
    assert {r.method for r in printed} == {"full", "lora", "qlora"}
    for r in printed:
        dtype = "bf16" if r.weights == "bf16" else "fp32"
        torch.manual_seed(0)
        row = bench.run_config(lambda: minillama.load_model(tiny_model_dir(), dtype=dtype), r.bench_config(SEQ),
                               preset="tiny", repeats=1, warmup=1)
        measured = row["peak_memory_bytes"]
        assert abs(r.peak_bytes / measured - 1) <= 0.10, (r.label(), r.peak_bytes / MiB, measured / MiB)


def test_ranking_prefers_less_compute_then_fewer_micro_steps(tiny_args):
    rows = plan(tiny_args, gpu_mem=4 * 1024 * MiB, seq_len=SEQ, batch=BATCH, device="cpu")
    fitting = [r for r in rows if r.fits]
    assert len(fitting) == len(rows)  # 4 GiB holds every configuration of a 4M-parameter model
    keys = [(r.compute_per_token, r.accum) for r in fitting]
    assert keys == sorted(keys)
    assert fitting[0].compute_per_token == 4 and not fitting[0].checkpointing and fitting[0].accum == 1


def test_compute_per_token_counts_the_passes():
    # forward 2N; backward 4N with weight gradients, 2N without; checkpointing recomputes the forward: +2N
    assert compute_per_token("full", False) == 6
    assert compute_per_token("lora", False) == 4
    assert compute_per_token("qlora", True) == 6


def test_fit_uses_reserve_and_headroom():
    args = get_preset("llama2-7b")
    rows = plan(args, gpu_mem=24 * 1024 * MiB, seq_len=512, batch=1, methods=("lora",))
    usable = (24 * 1024 - 1024) * MiB * 0.9
    for r in rows:
        assert r.fits == (r.peak_bytes <= usable)


def test_full_finetuning_of_7b_does_not_fit_24gib_but_qlora_does():
    """7B full fine-tuning holds 16 bytes/parameter of weights, gradients and AdamW state in fp32 (~100 GiB),
    2+2+4 in bf16 with 8-bit AdamW's 2 (~50 GiB): neither fits 24 GiB; the 4-bit base (~3.5 GiB) does."""
    rows = plan(get_preset("llama2-7b"), gpu_mem=24 * 1024 * MiB, seq_len=512, batch=1)
    fits = {r.method for r in rows if r.fits}
    assert "full" not in fits and "qlora" in fits


def test_fsdp_shards_full_finetuning_across_gpus():
    args = get_preset("llama2-7b")
    one = min(r.peak_bytes for r in plan(args, gpu_mem=80 * 1024 * MiB, seq_len=512, batch=8, methods=("full",)))
    eight = min(r.peak_bytes for r in plan(args, gpu_mem=80 * 1024 * MiB, seq_len=512, batch=8, gpus=8,
                                              methods=("full",)))
    assert eight < one / 3


def test_nothing_fits_says_so(tiny_args):
    rows = plan(tiny_args, gpu_mem=1 * MiB, seq_len=SEQ, batch=BATCH, device="cpu")
    text = format_plan(rows, gpu_mem=1 * MiB)
    assert text.startswith("Nothing fits in 1.00 MiB: the smallest predicted peak is")


@pytest.mark.parametrize("text, expected", [("24GiB", 24 * 1024**3), ("80GB", 80 * 10**9), ("512MiB", 512 * MiB),
                                            ("16", 16 * 1024**3)])
def test_parse_size(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("argv, message", [
    (["--gpu-mem", "lots"], "--gpu-mem 'lots' is invalid: expected a size like 24GiB"),
    (["--gpu-mem", "24GiB", "--batch", "3", "--gpus", "2"], "batch=3 is not divisible by gpus=2"),
    (["--gpu-mem", "24GiB", "--methods", "full,dora"], "unknown method(s) ['dora']"),
    (["--gpu-mem", "24GiB", "--seq-len", "8192"], "seq_len=8192 is longer than the model's max_seq_len=4096"),
    (["--gpu-mem", "24GiB", "--seq-len", "0"], "seq_len=0 is invalid: expected a positive integer"),
])
def test_plan_cli_bad_input(argv, message, capsys):
    assert main(["plan", "--preset", "llama2-7b", *argv]) == 2
    assert message in capsys.readouterr().err


def test_plan_cli_answers_for_7b(capsys):
    assert main(["plan", "--preset", "llama2-7b", "--gpu-mem", "24GiB", "--seq-len", "512"]) == 0
    out = capsys.readouterr().out
    assert "best per method:" in out and "qlora r=16" in out


def test_plan_cli_reads_a_checkpoint_config(capsys):
    assert main(["plan", "--model", str(tiny_model_dir()), "--gpu-mem", "1GiB", "--seq-len", "128",
                 "--device", "cpu"]) == 0
    assert "best per method:" in capsys.readouterr().out
