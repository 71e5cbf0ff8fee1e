"""The measurement harness: exact storage bytes by category, FLOP counts, device peaks, measure()."""

import json

import pytest
import torch
from torch import nn

import minillama
from minillama.measuring.measure import (CATEGORIES, MemoryTracker, count_flops, device_peak_flops, measure,
                               peak_flops_for_name)
from minillama.training.train import TrainConfig, make_optimizer

ARGS = minillama.get_preset("tiny").replace(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=128,
                                            max_seq_len=64)
B, T = 2, 32
STEP_BYTES = 4  # torch 2.13 AdamW (not fused/capturable) keeps `step` as a 0-dim float32 tensor per parameter


def nbytes(params):
    return sum(p.numel() * p.element_size() for p in params)


def make(dtype=None, seed=0):
    model = minillama.create_model(ARGS, dtype=dtype, seed=seed)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randint(0, ARGS.vocab_size, (B, T), generator=gen)
    y = torch.randint(0, ARGS.vocab_size, (B, T), generator=gen)
    return model, x, y


def train_step_fn(model, optimizer, x, y):
    def step():
        model(x, y).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return step


def tracked(model, fn, optimizer=None):
    tracker = MemoryTracker(model, optimizer)
    with tracker:
        fn()
    return tracker


# ---- the tracker's mechanics on plain tensors ------------------------------------------------
def test_views_and_inplace_ops_are_not_counted_twice_and_frees_are_subtracted():
    model = nn.Linear(8, 4, bias=False)  # 32 floats = 128 bytes
    tracker = MemoryTracker(model)
    with tracker:
        a = torch.zeros(1000)  # 4000 bytes
        b, c = a.view(10, 100), a[5:]
        a.add_(1)
        b.mul_(2)
        del a, b, c  # freed: the next allocation reuses nothing of the peak
        d = torch.ones(500)  # 2000 bytes
        e = torch.tensor([1.0, 2.0, 3.0])  # 12 bytes, made by torch.tensor (aten.lift_fresh)
    assert tracker.peak_bytes == 128 + 4000
    assert tracker.by_category() == {"parameters": 128, "gradients": 0, "optimizer_state": 0, "activations": 0,
                                     "temporary": 4000}
    assert tracker.by_category("end")["temporary"] == 2000 + 12
    del d, e


def test_out_variant_that_grows_a_storage():
    model = nn.Linear(8, 4, bias=False)
    tracker = MemoryTracker(model)
    with tracker:
        out = torch.zeros(10)  # 40 bytes
        torch.randn(100, out=out)  # resized to 400 bytes: the new buffer exists before the old one is freed
    assert tracker.peak_bytes == 128 + 400 + 40
    assert tracker.by_category("end")["temporary"] == 400
    del out


def test_tensors_made_before_entering_are_not_counted():
    model = nn.Linear(8, 4, bias=False)
    batch = torch.zeros(1000)
    tracker = MemoryTracker(model)
    with tracker:
        batch.add_(1)  # in place on a storage that existed before: no new allocation
        view = batch[:10]
    assert tracker.peak_bytes == 128
    del view


# ---- parameters, gradients, optimizer state --------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_parameter_and_gradient_bytes(dtype):
    model, x, y = make(dtype)
    tracker = tracked(model, lambda: model(x, y).backward())  # backward, no zero_grad: grads stay
    params = list(model.parameters())
    assert all(p.dtype == dtype for p in params)
    end = tracker.by_category("end")
    assert end["parameters"] == nbytes(params) == ARGS.num_params() * torch.finfo(dtype).bits // 8
    assert end["gradients"] == nbytes(params)
    assert end["activations"] == 0  # backward released everything it had saved
    assert tracker.by_category()["parameters"] == nbytes(params)


def test_adamw_optimizer_state_is_two_fp32_moments_plus_step_counters():
    model, x, y = make()
    optimizer = make_optimizer(model, TrainConfig())
    step = train_step_fn(model, optimizer, x, y)
    step()  # warm-up: AdamW creates its state on the first step
    state = optimizer.state[model.output.weight]
    assert state["step"].dtype == torch.float32 and state["step"].dim() == 0  # what STEP_BYTES assumes
    params = list(model.parameters())
    expected = 2 * sum(p.numel() * 4 for p in params) + STEP_BYTES * len(params)
    tracker = tracked(model, step, optimizer)
    assert tracker.by_category()["optimizer_state"] == expected
    assert tracker.by_category("end")["optimizer_state"] == expected
    assert tracker.by_category("end")["gradients"] == 0  # zero_grad(set_to_none=True)


def test_optimizer_state_created_inside_the_tracked_step_is_categorised():
    model, x, y = make()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    tracker = tracked(model, train_step_fn(model, optimizer, x, y), optimizer)  # no warm-up
    params = list(model.parameters())
    assert tracker.by_category("end")["optimizer_state"] == 2 * nbytes(params) + STEP_BYTES * len(params)
    assert tracker.by_category("end")["temporary"] == 0


def test_frozen_parameters_lora_style():
    model, x, y = make()
    for p in model.parameters():
        p.requires_grad_(False)
    trainable = model.layers[0].attention.wq.weight
    trainable.requires_grad_(True)
    optimizer = make_optimizer(model, TrainConfig())
    step = train_step_fn(model, optimizer, x, y)
    step()
    w_bytes = trainable.numel() * 4
    tracker = tracked(model, step, optimizer)  # does not raise on frozen parameters
    peak = tracker.by_category()
    assert peak["parameters"] == nbytes(model.parameters())
    assert peak["optimizer_state"] == 2 * w_bytes + STEP_BYTES
    assert peak["gradients"] <= w_bytes  # zero if the peak came before its gradient
    grads = tracked(model, lambda: model(x, y).backward(), optimizer).by_category("end")["gradients"]
    assert grads == w_bytes
    model.zero_grad(set_to_none=True)


def test_categories_sum_to_the_peak_and_cover_the_static_state():
    model, x, y = make()
    optimizer = make_optimizer(model, TrainConfig())
    step = train_step_fn(model, optimizer, x, y)
    step()
    tracker = tracked(model, step, optimizer)
    cats = tracker.by_category()
    assert tuple(cats) == CATEGORIES
    assert sum(cats.values()) == tracker.peak_bytes
    p_bytes = nbytes(model.parameters())
    static = p_bytes + p_bytes + (2 * p_bytes + STEP_BYTES * len(list(model.parameters())))
    assert tracker.peak_bytes >= static
    assert cats["activations"] > 0


@pytest.mark.parametrize("context", [torch.no_grad, torch.inference_mode])
def test_no_activations_without_autograd(context):
    model, x, _ = make()

    def forward():
        with context():
            model(x)
    tracker = tracked(model, forward)
    cats = tracker.by_category()
    assert cats["activations"] == 0 and cats["gradients"] == 0 and cats["optimizer_state"] == 0
    assert cats["temporary"] >= B * T * ARGS.vocab_size * 4  # at least the fp32 logits
    assert sum(cats.values()) == tracker.peak_bytes


def test_deterministic_bytes():
    model, x, y = make()
    optimizer = make_optimizer(model, TrainConfig())
    step = train_step_fn(model, optimizer, x, y)
    step()
    first, second = tracked(model, step, optimizer), tracked(model, step, optimizer)
    assert first.peak_bytes == second.peak_bytes
    assert first.by_category() == second.by_category()
    assert first.by_category("end") == second.by_category("end")


# ---- FLOPs ------------------------------------------------------------------------------------
def test_linear_flops():
    m, k, n = 8, 16, 12
    lin = nn.Linear(k, n, bias=False)
    x = torch.randn(m, k, requires_grad=True)
    forward = 2 * m * n * k
    assert count_flops(lambda: lin(x)) == forward
    # backward: grad of the input ([m, n] @ [n, k]) and of the weight ([n, m] @ [m, k]), each 2*m*n*k
    assert count_flops(lambda: lin(x).sum().backward()) == forward + 2 * forward


@pytest.mark.parametrize("impl", ["sdpa", "math"])
def test_model_forward_flops_match_the_formula(impl):
    model, x, _ = make()
    model.set_attn_impl(impl)
    d, hd, kv, h = ARGS.dim, ARGS.head_dim, ARGS.n_kv_heads, ARGS.ffn_hidden_dim
    matmul_params = ARGS.n_layers * (2 * d * d + 2 * d * kv * hd + 3 * d * h) + d * ARGS.vocab_size
    attention = ARGS.n_layers * 2 * (2 * B * ARGS.n_heads * T * T * hd)  # q k^T and p v, unmasked
    assert count_flops(lambda: model(x)) == 2 * B * T * matmul_params + attention


# ---- device peaks -----------------------------------------------------------------------------
@pytest.mark.parametrize("name, peak", [
    ("NVIDIA H100 80GB HBM3", 989e12),
    ("NVIDIA H100 PCIe", 756e12),
    ("NVIDIA A100-SXM4-80GB", 312e12),
    ("NVIDIA A100-PCIE-40GB", 312e12),
    ("NVIDIA H200", 989e12),
    ("NVIDIA L4", 121e12),
    ("Tesla T4", 65e12),
    ("NVIDIA L40S", None),
    ("Some Future GPU", None),
])
def test_peak_flops_for_name(name, peak):
    assert peak_flops_for_name(name) == peak


def test_cpu_peak_is_unknown():
    assert device_peak_flops("cpu") is None
    assert device_peak_flops(torch.device("cpu")) is None


# ---- measure() --------------------------------------------------------------------------------
def test_measure_row():
    model, x, y = make()
    optimizer = make_optimizer(model, TrainConfig())
    m = measure(train_step_fn(model, optimizer, x, y), model=model, optimizer=optimizer, tokens_per_step=B * T,
                name="full", repeats=2, meta={"preset": "test", "batch": B, "seq_len": T})
    row = m.to_row()
    for key in ["name", "peak_memory_bytes", "memory_by_category", "step_time_s", "tokens_per_s",
                "flops_per_step", "mfu", "cuda_max_allocated_bytes", "cuda_max_reserved_bytes",
                "device", "device_name", "torch", "dtype", "preset", "batch", "seq_len"]:
        assert key in row, key
    assert row["name"] == "full" and row["device"] == "cpu" and row["dtype"] == "float32"
    assert row["device_name"].startswith("cpu (") and row["torch"] == torch.__version__
    assert row["tokens_per_s"] == B * T / row["step_time_s"]
    assert row["mfu"] is None and row["cuda_max_allocated_bytes"] is None and row["cuda_max_reserved_bytes"] is None
    assert sum(row["memory_by_category"].values()) == row["peak_memory_bytes"]
    assert row["flops_per_step"] > 0
    json.dumps(row)
    # the same step tracked directly gives the same bytes
    again = tracked(model, train_step_fn(model, optimizer, x, y), optimizer)
    assert again.peak_bytes == m.peak_memory_bytes and again.by_category() == m.memory_by_category
