"""`minillama bench --compare hf`, the GPU lab script, and the kernels (minillama.kernels) that win its memory."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from minillama.cli.main import main
from minillama.config import get_preset
from minillama.measuring import compare
from minillama.measuring.compare import ROWS, Settings, compare_row, run_compare
from minillama.measuring.measure import model_flops_per_token
from minillama.kernels import linear_cross_entropy

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("chunk", [None, 3, 7])
def test_linear_cross_entropy_equals_f_cross_entropy(reduction, chunk):
    gen = torch.Generator().manual_seed(0)
    h = torch.randn(2 * 9, 16, generator=gen, requires_grad=True)
    w = (0.5 * torch.randn(50, 16, generator=gen)).requires_grad_()
    t = torch.randint(0, 50, (18,), generator=gen)
    t[[0, 5, 6, 17]] = -100
    ref = F.cross_entropy(F.linear(h, w).float(), t, ignore_index=-100, reduction=reduction)
    ref_gh, ref_gw = torch.autograd.grad(3 * ref, (h, w))
    got = linear_cross_entropy(h, w, t, reduction, chunk)
    gh, gw = torch.autograd.grad(3 * got, (h, w))
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(gh, ref_gh, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gw, ref_gw, rtol=1e-5, atol=1e-6)


def test_linear_cross_entropy_frozen_head_and_no_grad():
    gen = torch.Generator().manual_seed(1)
    h, w = torch.randn(8, 16, generator=gen, requires_grad=True), torch.randn(40, 16, generator=gen)
    t = torch.randint(0, 40, (8,), generator=gen)
    ref = F.cross_entropy(F.linear(h, w), t)
    torch.testing.assert_close(torch.autograd.grad(linear_cross_entropy(h, w, t), h)[0],
                               torch.autograd.grad(ref, h)[0], rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        torch.testing.assert_close(linear_cross_entropy(h, w, t, chunk=3), ref.detach(), rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="reduction='none'"):
        linear_cross_entropy(h, w, t, "none")


def test_model_flops_formula_llama2_7b():
    args = get_preset("llama2-7b")
    n = 32 * (4 * 4096 * 4096 + 3 * 4096 * 11008) + 32000 * 4096  # the matrix-product parameters
    attention = 32 * 4 * 512 * 4096
    assert model_flops_per_token(args, 512, "full") == 6 * n + 3 * attention
    assert model_flops_per_token(args, 512, "lora") == 4 * n + 3 * attention
    assert model_flops_per_token(args, 512, "inference") == 2 * n + attention


SMALL = dict(batch=1, seq_len=16, long_seq_len=24, new_tokens=4, repeats=1, warmup=0)
FIELDS = ["tokens_per_s_ratio", "peak_memory_ratio", "minillama_loss", "hf_loss", "losses_agree",
          "model_flops_per_step", "predicted_peak_memory_bytes", "device_name", "dtype"]
PER_IMPL = ["tokens_per_s", "step_time_s", "peak_memory_bytes", "memory_by_category", "flops_per_step", "mfu",
            "cuda_peak_bytes", "loss"]


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_compare_tiny_grid_every_field_and_losses_agree(tmp_path):
    pytest.importorskip("transformers")
    pytest.importorskip("peft")
    names = ["lora-qv", "lora-all-ckpt", "full", "inference", "lora-qv-long"]
    rows = run_compare(Settings.defaults("tiny", "cpu", **SMALL), names, out_dir=tmp_path, progress=lambda s: None)
    assert [r["name"] for r in rows] == [n for n in ROWS if n in names]  # in ROWS' order
    rows = {r["name"]: r for r in rows}
    for r in rows.values():
        assert r["status"] == "ok", r
        for key in FIELDS + [f"{impl}_{k}" for impl in ("minillama", "hf") for k in PER_IMPL]:
            assert key in r, (r["name"], key)
        assert r["losses_agree"], (r["name"], r["minillama_loss"], r["hf_loss"])
        assert abs(r["minillama_loss"] / r["hf_loss"] - 1) < 1e-4
        assert r["minillama_tokens_per_s"] > 0 and r["hf_tokens_per_s"] > 0
        assert sum(r["minillama_memory_by_category"].values()) == r["minillama_peak_memory_bytes"]
        assert r["minillama_flops_per_step"] > 0 and r["hf_flops_per_step"] > 0
    inference = rows["inference"]
    assert inference["prefill_tokens_per_s_ratio"] > 0 and inference["generated_tokens_agree"] == 1.0
    assert rows["lora-qv-long"]["seq_len"] == 24 and rows["lora-qv-long"]["batch"] == 1
    assert rows["full"]["trainable_params"] == rows["full"]["params"]  # full fine-tuning
    doc = json.loads((tmp_path / "results.json").read_text())
    assert {r["name"] for r in doc["rows"]} == set(names) and doc["settings"]["seq_len"] == 16
    for f in ("results.csv", "table.md", "speed.png", "memory.png"):
        assert (tmp_path / f).stat().st_size > 0
    assert "minillama_activations_bytes" in (tmp_path / "results.csv").read_text().splitlines()[0]


def test_missing_package_skips_only_its_rows(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "peft" else real(name, *a))
    s = Settings.defaults("tiny", "cpu", **SMALL)
    row = compare_row(ROWS["lora-qv"], s)
    assert "needs peft, which is not installed" in row["skipped"] and "tokens_per_s_ratio" not in row
    assert "peft" not in ROWS["full"].needs and "peft" not in ROWS["inference"].needs


def test_out_of_memory_row_is_recorded_and_the_next_runs(monkeypatch):
    def fake_run_row(row, s):
        if row.name == "lora-qv":
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return {"tokens_per_s_ratio": 1.0}

    monkeypatch.setattr(compare, "run_row", fake_run_row)
    rows = run_compare(Settings.defaults("tiny", "cpu", **SMALL), "lora-qv,full", progress=lambda s: None)
    assert rows[0]["error"].startswith("out of memory: CUDA out of memory")
    assert rows[0]["predicted_peak_memory_bytes"] > 0
    assert rows[1]["status"] == "ok"


def test_other_errors_are_not_swallowed(monkeypatch):
    monkeypatch.setattr(compare, "run_row", lambda row, s: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        compare_row(ROWS["full"], Settings())


def test_cli_compare_bad_input(tmp_path, capsys):
    assert main(["bench", "--compare", "hf", "--rows", "lora-qv,nope", "--out", str(tmp_path / "a")]) == 2
    assert "unknown row(s) ['nope']" in capsys.readouterr().err
    assert main(["bench", "--compare", "hf", "--model", "x", "--out", str(tmp_path / "b")]) == 2
    assert main(["bench", "--compare", "hf", "--batch", "0", "--out", str(tmp_path / "c")]) == 2
    assert "--batch 0 is invalid" in capsys.readouterr().err
    assert not (tmp_path / "a").exists()


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_cli_compare_one_row(tmp_path, capsys):
    pytest.importorskip("peft")
    out = tmp_path / "cmp"
    assert main(["bench", "--compare", "hf", "--preset", "tiny", "--device", "cpu", "--rows", "lora-qv",
                 "--batch", "1", "--seq-len", "16", "--repeats", "1", "--out", str(out)]) == 0
    assert "| lora-qv |" in capsys.readouterr().out
    assert json.loads((out / "results.json").read_text())["rows"][0]["losses_agree"]


def test_gpu_lab_skips_what_does_not_fit_in_the_budget(tmp_path):
    out = tmp_path / "lab"
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_lab.py"), "--out", str(out),
                           "--device", "cpu", "--preset", "tiny", "--budget-s", "1"],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    doc = json.loads((out / "results.json").read_text())
    assert [r["name"] for r in doc["rows"]] == list(ROWS)
    for r in doc["rows"]:
        assert "would not fit in the time left" in r["skipped"] and r["predicted_peak_memory_bytes"] > 0
    assert doc["environment"]["torch"] == torch.__version__
    assert "date_utc" in (out / "table.md").read_text()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_silu_mul_equals_silu_times(dtype):
    from minillama.kernels import silu_mul

    gen = torch.Generator().manual_seed(2)
    a = (3 * torch.randn(6, 10, generator=gen)).to(dtype).requires_grad_()
    b = torch.randn(6, 10, generator=gen).to(dtype).requires_grad_()
    g = torch.randn(6, 10, generator=gen).to(dtype)
    ref = F.silu(a) * b
    ref_grads = torch.autograd.grad(ref, (a, b), g)
    got = silu_mul(a, b)
    grads = torch.autograd.grad(got, (a, b), g)
    tol = {} if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(got, ref, **tol)
    for x, y in zip(grads, ref_grads):
        torch.testing.assert_close(x, y, **tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rmsnorm_function_equals_autograd_of_the_formula(dtype):
    """RMSNormFunction (keeps x and 1/rms only) against autograd through the plain formula, weight trainable."""
    from minillama.kernels import RMSNormFunction

    gen = torch.Generator().manual_seed(3)
    x = (2 * torch.randn(3, 5, 16, generator=gen)).to(dtype).requires_grad_()
    w = (1 + 0.3 * torch.randn(16, generator=gen)).to(dtype).requires_grad_()
    g = torch.randn(3, 5, 16, generator=gen).to(dtype)
    xf = x.float()
    ref = w * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-5)).type_as(x)
    got = RMSNormFunction.apply(x, w, 1e-5)
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(got, ref, **tol)
    for a, b in zip(torch.autograd.grad(got, (x, w), g), torch.autograd.grad(ref, (x, w), g)):
        torch.testing.assert_close(a, b, **tol)


@pytest.mark.parametrize("weight_trains", [True, False])
def test_silu_mul_linear_equals_linear_of_silu_times(weight_trains):
    """SiLUMulLinear (recomputes p = silu(a) * b in backward) against F.linear(F.silu(a) * b, w) by autograd."""
    from minillama.kernels import SiLUMulLinear

    gen = torch.Generator().manual_seed(4)
    a = (3 * torch.randn(2, 6, 10, generator=gen)).requires_grad_()
    b = torch.randn(2, 6, 10, generator=gen).requires_grad_()
    w = torch.randn(7, 10, generator=gen).requires_grad_(weight_trains)
    g = torch.randn(2, 6, 7, generator=gen)
    ref = F.linear(F.silu(a) * b, w)
    got = SiLUMulLinear.apply(a, b, w)
    inputs = (a, b, w) if weight_trains else (a, b)
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-6)
    for x, y in zip(torch.autograd.grad(got, inputs, g), torch.autograd.grad(ref, inputs, g)):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5)


def test_model_keeps_fewer_tensors_for_backward_than_autograd_would():
    """Full fine-tuning of a small fp32 model, the plain model (autograd) against enable_kernels, counted with
    saved_tensors_hooks (each storage once, parameters excluded). Per block the kernels keep 2 [tokens, dim]
    tensors (the norms' x_hat) and 2 [tokens, hidden] (silu(w1 x) and w2's input p) less; at the head, the
    final norm's x_hat, and the loss keeps its two gradients instead of norm(h), every chunk's logits and
    logsumexp, the gather indices, the target mask and the count."""
    from minillama.config import ModelArgs
    from minillama.kernels import disable_kernels, enable_kernels
    from minillama.model import create_model

    args = ModelArgs(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=64, multiple_of=16, max_seq_len=16)
    model = create_model(args, seed=0)
    tokens = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}

    def saved_bytes():
        seen = {}

        def pack(t):
            if t.untyped_storage().data_ptr() not in params:
                seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(tokens, tokens)
        return sum(seen.values())

    plain = saved_bytes()
    enable_kernels(model)
    ours = saved_bytes()
    disable_kernels(model)
    assert saved_bytes() == plain  # back to the plain model
    N, d, hid, V = 2 * 8, args.dim, args.ffn_hidden_dim, args.vocab_size
    per_block = 2 * N * d * 4 + 2 * N * hid * 4
    plain_loss = N * d * 4 + N * V * 4 + N * 4 + N * 8 + N + 8  # norm(h), logits, lse, indices, mask, count
    kernel_loss = N * d * 4 + V * d * 4 + 4  # d loss / d norm(h), d loss / d weight (fp32), 1 / count
    assert plain - ours == args.n_layers * per_block + N * d * 4 + plain_loss - kernel_loss


def test_checkpointing_recomputes_the_blocks_forward_up_to_w2():
    """Full fine-tuning with every block checkpointed costs the blocks' forward FLOPs once more, less w2's
    product (non-reentrant checkpointing stops recomputing once the last tensor to keep is back: w2's input).
    With the kernels on, SiLUMulLinear would keep its tensors only after its matrix product: enable_kernels
    leaves it out of checkpointed blocks."""
    from minillama.config import ModelArgs
    from minillama.kernels import enable_kernels
    from minillama.measuring.measure import count_flops
    from minillama.model import create_model

    args = ModelArgs(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=64, multiple_of=16, max_seq_len=16)
    model = create_model(args, seed=0)
    tokens = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))

    def step_flops(every, recompute_product=None):
        model.set_checkpointing(every)
        enable_kernels(model)  # again after set_checkpointing: it reads it
        for layer in model.layers:
            if recompute_product is not None:
                layer.feed_forward.kernel_recompute_product = recompute_product
        return count_flops(lambda: model(tokens, tokens).backward())

    plain, ckpt = step_flops(0), step_flops(1)
    with torch.no_grad():
        forward = count_flops(lambda: model(tokens))
    head = 2 * tokens.numel() * args.dim * args.vocab_size
    w2 = 2 * tokens.numel() * args.ffn_hidden_dim * args.dim
    assert ckpt - plain == forward - head - args.n_layers * w2
    assert step_flops(1, recompute_product=True) - ckpt == args.n_layers * w2  # what FeedForward avoids
