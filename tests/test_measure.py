"""The measurement harness: exact storage bytes by category, FLOP counts, device peaks, measure()."""

import json
from pathlib import Path

import pytest
import torch
from torch import nn

import minillama
from minillama import get_preset
from minillama.measuring.measure import (CATEGORIES, MemoryTracker, compute_dtype_name, count_flops,
                               device_peak_flops, measure, mfu, model_flops_per_token, peak_flops_for_name)
from minillama.training import TrainConfig, make_optimizer

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
@pytest.mark.parametrize("name, dtype, peak", [  # dense peaks of NVIDIA's data sheets (sparse figures halved)
    ("NVIDIA H100 80GB HBM3", "bf16", 989.5e12),  # SXM
    ("NVIDIA H100 80GB HBM3", "fp32", 67e12),
    ("NVIDIA H100 80GB HBM3", "tf32", 494.5e12),
    ("NVIDIA H100 PCIe", "bf16", 756e12),
    ("NVIDIA H100 NVL", "bf16", 835.5e12),
    ("NVIDIA H200", "bf16", 989.5e12),
    ("NVIDIA H200 NVL", "bf16", 835.5e12),
    ("NVIDIA A100-SXM4-80GB", "bf16", 312e12),
    ("NVIDIA A100-SXM4-40GB", "bf16", 312e12),
    ("NVIDIA A100 80GB PCIe", "bf16", 312e12),
    ("NVIDIA A100-PCIE-40GB", "fp32", 19.5e12),
    ("NVIDIA A100-PCIE-40GB", "tf32", 156e12),
    ("NVIDIA L4", "bf16", 121e12),
    ("Tesla T4", "fp16", 65e12),
    ("Tesla T4", "bf16", None),  # Turing has no bf16 tensor cores
    ("Tesla T4", "fp32", 8.1e12),
    ("NVIDIA L40S", "bf16", None),
    ("Some Future GPU", "bf16", None),
    # MIG slices: g of the 7 compute slices, or the slice's SMs out of the whole GPU's when known
    ("NVIDIA A100-SXM4-40GB MIG 3g.20gb", "bf16", 312e12 * 3 / 7),
    ("NVIDIA H100 80GB HBM3 MIG 1g.10gb", "bf16", 989.5e12 / 7),
    ("NVIDIA H100 NVL MIG 2g.24gb", "fp32", 60e12 * 2 / 7),
])
def test_peak_flops_for_name(name, dtype, peak):
    assert peak_flops_for_name(name, dtype) == peak


def test_a_mig_slice_is_scaled_by_its_sms():
    assert peak_flops_for_name("NVIDIA A100-SXM4-80GB MIG 1g.10gb", "bf16", sm_count=14) == 312e12 * 14 / 108
    assert peak_flops_for_name("NVIDIA H100 PCIe MIG 3g.40gb", "bf16", sm_count=42) == 756e12 * 42 / 114
    assert peak_flops_for_name("NVIDIA H100 80GB HBM3", "bf16", sm_count=132) == 989.5e12  # not a slice
    with pytest.raises(ValueError, match="dtype='int8'"):
        peak_flops_for_name("NVIDIA H100 80GB HBM3", "int8")


def test_fp32_compares_with_the_fp32_or_tf32_peak():
    assert compute_dtype_name(torch.bfloat16) == "bf16" and compute_dtype_name(torch.float16) == "fp16"
    before = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("highest")
        assert compute_dtype_name(torch.float32) == "fp32"
        torch.set_float32_matmul_precision("high")  # TF32 tensor cores
        assert compute_dtype_name(torch.float32) == "tf32"
    finally:
        torch.set_float32_matmul_precision(before)


def test_mfu_by_hand():
    # tiny: 4 layers, dim 256, 8 heads (4 kv heads), FFN 704, vocab 2048. Model FLOPs per token of full
    # fine-tuning at T = 128: 6 * (matmul weights) + 3 * attention, attention = 4 * T * d * L (q k^T and p v,
    # unmasked, forward)
    args = get_preset("tiny")
    assert (args.n_layers, args.dim, args.n_heads, args.ffn_hidden_dim, args.vocab_size, args.n_kv_heads) == \
        (4, 256, 8, 704, 2048, 4)
    n_mm = 4 * (256 * 256 + 2 * 256 * 128 + 256 * 256 + 3 * 256 * 704) + 2048 * 256  # wq wk wv wo, w1 w2 w3, head
    per_token = 6 * n_mm + 3 * 4 * 128 * 256 * 4
    assert model_flops_per_token(args, 128, "full") == per_token
    # 4 x 128 tokens in 0.5 s on a 1 TFLOP/s device
    assert mfu(per_token, 512, 0.5, 1e12) == pytest.approx(per_token * 512 / 0.5 / 1e12, rel=1e-12)
    assert mfu(per_token, 512, 0.5, None) is None


def test_bench_mfu_counts_no_recomputation_and_matches_the_dtype(monkeypatch):
    # a made-up 1 TFLOP/s peak for the CPU: bench's MFU times step time times peak gives back the model FLOPs by
    # formula, also with checkpointing (whose counted FLOPs include the recomputed forward), and the peak is
    # asked for the dtype the matmuls run in (fp32 weights; bf16 under autocast)
    from minillama.measuring import bench, measure as measure_module

    seen = []
    monkeypatch.setattr(measure_module, "device_peak_flops", lambda device, dtype: seen.append(dtype) or 1e12)
    args = get_preset("tiny")
    make_model = lambda: minillama.create_model(args, seed=0)  # noqa: E731
    row = bench.run_config(make_model, {"mode": "train", "batch": 1, "seq_len": 32, "checkpointing": 1},
                           preset="tiny", repeats=1)
    formula = model_flops_per_token(args, 32, "full") * 32
    assert row["mfu"] * row["step_time_s"] * 1e12 == pytest.approx(formula, rel=1e-9)
    assert row["flops_per_step"] > 1.2 * formula  # counted: the recomputed forward (2N of 6N) is extra
    lora = bench.run_config(make_model, {"mode": "train", "batch": 1, "seq_len": 32, "lora": 4, "amp": "bf16"},
                            preset="tiny", repeats=1)
    assert lora["mfu"] * lora["step_time_s"] * 1e12 == pytest.approx(model_flops_per_token(args, 32, "lora") * 32)
    assert seen == [torch.float32, torch.bfloat16]


def test_mem_mib_is_each_steps_own_peak():
    # the peak resident set is reset at each step's start (Linux: /proc/self/clear_refs), not the process maximum
    from minillama.training.train import memory_mib, reset_peak_memory

    cpu = torch.device("cpu")
    big = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched
    before = memory_mib(cpu)
    del big
    reset_peak_memory(cpu)
    after = memory_mib(cpu)
    if not Path("/proc/self/clear_refs").exists():
        pytest.skip("no /proc/self/clear_refs here: the CPU figure stays the process maximum")
    assert after < before - 32


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


# ---- the one alternating timer ----------------------------------------------------------------------
def test_alternate_times_synchronises_around_every_timed_call(monkeypatch):
    # on CUDA a step only queues kernels: each timed call must start and end with a synchronisation, or it
    # absorbs the previous call's unfinished kernels. Recorded on the CPU, where _sync itself is a no-op.
    import sys

    from minillama.measuring import compare, measure as measure_module

    events = []
    monkeypatch.setattr(measure_module, "_sync", lambda device: events.append(("sync", torch.device(device).type)))
    fns = {name: (lambda name=name: events.append(("call", name))) for name in ("a", "b", "c")}
    times = measure_module.alternate_times(fns, "cuda", 2, warmup=1)
    assert events[:3] == [("call", "a"), ("call", "b"), ("call", "c")]  # the warm-up, untimed
    timed = events[3:]
    assert [e[1] for e in timed if e[0] == "call"] == ["a", "b", "c", "c", "b", "a"]  # alternating order
    assert timed == [x for name in ["a", "b", "c", "c", "b", "a"]
                     for x in (("sync", "cuda"), ("call", name), ("sync", "cuda"))]
    assert {k: len(v) for k, v in times.items()} == {"a": 2, "b": 2, "c": 2}
    # one owner: bench --compare and the notebooks' timer are this function
    assert compare.alternate_times is measure_module.alternate_times
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "notebooks"))
    try:
        import _common
    finally:
        sys.path.pop(0)
    events.clear()
    _common.time_alternating({"a": fns["a"]}, rounds=1, warmup=0)
    kind = torch.device(_common.DEVICE).type
    assert events == [("sync", kind), ("call", "a"), ("sync", kind)]
