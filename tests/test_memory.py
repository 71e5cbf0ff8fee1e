"""The analytic memory model (minillama.measuring.memory, .activations): parameter counts, the published
budgets (minillama.measuring.budgets: the QLoRA report's Llama-3-8B table),
bytes per parameter, bad input, and predictions against MemoryTracker's exact count on CPU."""

import pytest
import torch
from torch import nn

import minillama
from minillama import get_preset
from minillama.kernels import enable_kernels
from minillama.lora import TARGETS
from minillama.measuring.budgets import llama3_8b_budget, qlora_budget_table
from minillama.measuring.measure import CATEGORIES, MemoryTracker
from minillama.measuring.memory import estimate_memory, format_bytes, parameter_count
from minillama.training import TrainConfig, make_optimizer

GiB = 1024**3


# ---- parameter counts: the formulas against real modules ------------------------------------------
def meta_model(preset):
    with torch.device("meta"):
        return minillama.Transformer(get_preset(preset))


def lora_numel_of_real_modules(model, r, targets):
    """Build LoRA A [r, in] and B [out, r] (meta device) for every targeted nn.Linear of the model."""
    total = 0
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear) and name.split(".")[-1] in targets and name.startswith("layers."):
            with torch.device("meta"):
                a, b = nn.Linear(m.in_features, r, bias=False), nn.Linear(r, m.out_features, bias=False)
            total += a.weight.numel() + b.weight.numel()
    return total


@pytest.mark.parametrize("targets, r, expected", [
    (("wq", "wv"), 8, 4_194_304),  # docs/references.md: PEFT's default on Llama-2-7B
    ("all", 8, 19_988_480),  # all seven linears of every block
])
def test_parameter_counts_equal_real_modules(targets, r, expected):
    model = meta_model("llama2-7b")
    n_model = sum(p.numel() for p in model.parameters())
    counts = parameter_count(get_preset("llama2-7b"), lora={"r": r, "targets": targets})
    assert counts["base"] == n_model == 6_738_415_616
    names = TARGETS if targets == "all" else targets
    assert counts["lora"] == lora_numel_of_real_modules(model, r, names) == expected
    assert counts["total"] == n_model + expected and counts["trainable"] == expected
    assert parameter_count(get_preset("llama2-7b")) == {"total": n_model, "trainable": n_model, "lora": 0,
                                                        "base": n_model}


def test_llama3_8b_counts_match_the_module():
    model = meta_model("llama3-8b")
    assert parameter_count(get_preset("llama3-8b"))["total"] == sum(p.numel() for p in model.parameters())
    assert lora_numel_of_real_modules(model, 64, TARGETS) == parameter_count(
        get_preset("llama3-8b"), lora={"r": 64, "targets": "all"})["lora"] == 167_772_160


# ---- bytes per parameter ----------------------------------------------------------------------------
def test_static_bytes_per_parameter():
    args = get_preset("llama2-7b")
    n = parameter_count(args)["total"]
    # fp32 weights + fp32 grads + two fp32 AdamW moments = 16 B/param, + the 291 `step` counters (one fp32
    # scalar per parameter tensor), which the trainer's fused AdamW keeps on the parameters' device
    steps = 4 * (2 + 9 * args.n_layers + 1)
    full = estimate_memory(args, batch=1, seq_len=16, device="cuda")
    assert full.static_bytes == 16 * n + steps
    assert full.by_category["parameters"] == full.by_category["gradients"] == 4 * n
    # a non-fused AdamW on CUDA keeps its counters on the CPU: not device memory
    assert estimate_memory(args, batch=1, seq_len=16, device="cuda", fused=False).static_bytes == 16 * n
    # on CPU the counters are optimizer state whatever the implementation
    for fused in (True, False):
        assert estimate_memory(args, batch=1, seq_len=16, fused=fused).static_bytes == 16 * n + steps
    # bf16 weights and grads + fp32 moments = 12 B/param; torch's AdamW keeps moments in the param dtype: 8 B/param
    assert estimate_memory(args, batch=1, seq_len=16, param_dtype="bf16", optimizer_state_dtype="fp32",
                           device="cuda").static_bytes == 12 * n + steps
    assert estimate_memory(args, batch=1, seq_len=16, param_dtype="bf16", device="cuda").static_bytes == 8 * n + steps
    # autocast keeps fp32 master weights: the static bytes are those of fp32 training
    assert estimate_memory(args, batch=1, seq_len=16, amp="bf16", device="cuda").static_bytes == 16 * n + steps
    # LoRA: frozen base in bf16, adapters + grads + moments in fp32, + a counter per adapter (A and B of 2 x 32)
    lo = estimate_memory(args, batch=1, seq_len=16, param_dtype="bf16", device="cuda",
                         lora={"r": 8, "targets": ("wq", "wv"), "dtype": "fp32"})
    assert lo.static_bytes == 2 * n + 16 * 4_194_304 + 4 * 2 * 2 * args.n_layers


# ---- the QLoRA report's Llama-3-8B budget -----------------------------------------------------------
# The report prints GiB and calls them "GB" (15.1 = 8.1e9 * 2 / 1024**3 = 15.09; in 1e9-byte GB it would be
# 16.2, and the exact 8,030,261,248 params give 14.96 GiB / 16.06 GB). Its numbers have 2-3 significant
# digits: half a unit of the last printed digit is 1.2% of 0.41 and of 4.3, 0.9% of 5.5; we allow 1.5%.
RULE_TOL = 0.015


def test_report_rules_reproduce_the_report():
    rows = {r["component"].split(" (")[0].split(",")[0]: r for r in llama3_8b_budget()}
    assert set(rows) >= {"bf16 weights", "full fine-tuning static", "NF4 + double quant base", "LoRA r=64",
                         "LoRA gradients", "paged 8-bit AdamW state", "QLoRA static total", "activations"}
    for name, row in rows.items():
        if row["report_rule_bytes"] is None:  # the activation row: no rule found, explained in its note
            assert "no rule found" in row["note"]
            continue
        got = row["report_rule_bytes"] / GiB
        assert abs(got / row["report"] - 1) < RULE_TOL, (name, got, row["report"])


def test_exact_counts_against_the_report():
    rows = {r["component"].split(" (")[0].split(",")[0]: r for r in llama3_8b_budget()}
    n = 8_030_261_248
    # weights and full fine-tuning: the same rule with the exact count, 0.87% below the report's 8.1e9
    assert rows["bf16 weights"]["ours_bytes"] == 2 * n
    steps = 4 * (2 + 9 * 32 + 1)  # fused AdamW's fp32 `step` counter per parameter tensor, on the GPU
    assert rows["full fine-tuning static"]["ours_bytes"] == 12 * n + steps
    for name in ("bf16 weights", "full fine-tuning static"):
        assert abs(rows[name]["ours_bytes"] / GiB / rows[name]["report"] - 1) < RULE_TOL, name
    # the QLoRA rows differ by more than rounding, for reasons that the notes give
    lora = 167_772_160  # r*(in+out) over the 224 linears, not the report's linear weights * 2r/dim
    assert rows["LoRA r=64"]["ours_bytes"] == rows["LoRA gradients"]["ours_bytes"] == 2 * lora
    assert "2r/dim" in rows["LoRA r=64"]["note"]
    assert 2 * lora < rows["paged 8-bit AdamW state"]["ours_bytes"] < 2.04 * lora  # + fp32 absmax per 256
    base4 = rows["NF4 + double quant base"]
    assert "output head" in base4["note"]
    # ours - report's rule = the bf16 output head (V x dim), which the report leaves out
    assert base4["ours_bytes"] - base4["report_rule_bytes"] == 128256 * 4096 * 2 + 65 * 4096 * 2  # + norms
    assert abs(base4["ours_bytes"] / GiB - 5.31) < 0.01
    total = rows["QLoRA static total"]["ours_bytes"]
    assert total == base4["ours_bytes"] + 2 * 2 * lora + rows["paged 8-bit AdamW state"]["ours_bytes"]


# ---- predictions against MemoryTracker on CPU -----------------------------------------------------
def measured_peak(args, batch, seq_len, mode, checkpointing=False, train_py_order=False, kernels=True):
    """MemoryTracker's peak for one step as minillama.measuring.bench runs it: train = forward with loss, backward,
    AdamW step, zero_grad(set_to_none=True), after one warm-up step; inference = a no-grad forward.
    train_py_order: as minillama.training.train.train does it (forward, zero_grad, backward, clip, step).
    kernels: the hand-written backward passes (minillama.kernels, as train and bench run by default), or the
    plain autograd model."""
    model = minillama.create_model(args, seed=0)
    if checkpointing:  # torch.utils.checkpoint around every block (use_reentrant=False)
        for layer in model.layers:
            layer.forward = (lambda f: lambda *a, **k: torch.utils.checkpoint.checkpoint(
                f, *a, use_reentrant=False, **k))(layer.forward)
    if kernels:
        enable_kernels(model)
    x = torch.randint(0, args.vocab_size, (batch, seq_len + 1), generator=torch.Generator().manual_seed(0))
    inputs, targets = x[:, :-1], x[:, 1:]
    optimizer = None
    if mode == "train":
        optimizer = make_optimizer(model, TrainConfig())

        def step():
            if train_py_order:
                loss = model(inputs, targets)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                optimizer.step()
            else:
                model(inputs, targets).backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)

        step()  # the optimizer state exists from the first step on
    else:
        model.eval()

        @torch.no_grad()
        def step():
            model(inputs)
    tracker = MemoryTracker(model, optimizer)
    with tracker:
        step()
    return tracker.peak_bytes


@pytest.fixture(autouse=True)
def one_thread():
    """Bytes do not depend on the thread count; one thread keeps these steps fast on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("mode, batch, seq_len, variant", [
    ("train", 1, 64, {}),  # peak: the optimizer step (parameters + grads + moments + AdamW temporaries)
    ("train", 4, 128, {}),  # peak: start of backward (activations + two fp32 [N, vocab] gradients)
    ("train", 8, 256, {}),
    ("train", 4, 128, {"n_kv_heads": 2}),  # a GQA variant
    ("train", 4, 128, {"n_kv_heads": 8}),  # plain multi-head attention
    ("train", 4, 128, {"attn_impl": "math"}),  # the explicit softmax keeps [B, H, T, T] probabilities
    ("inference", 1, 64, {}),
    ("inference", 8, 256, {}),
    ("inference", 4, 128, {"n_kv_heads": 2}),
])
def test_estimate_within_10_percent_of_measured_peak(mode, batch, seq_len, variant):
    args = get_preset("tiny").replace(**variant)
    est = estimate_memory(args, batch=batch, seq_len=seq_len, mode=mode)
    peak = measured_peak(args, batch, seq_len, mode)
    assert abs(est.peak_bytes / peak - 1) < 0.10, (est.peak_bytes, peak, est.peak_moment)


@pytest.mark.parametrize("batch, seq_len, checkpointing, variant", [
    (4, 128, False, {}),  # peak: the start of the backward (every chunk's fp32 logits are kept)
    (4, 128, True, {}),  # checkpointing: the blocks' terms are held only while a block is recomputed
    (4, 128, False, {"n_kv_heads": 8}),
])
def test_plain_autograd_and_the_kernels_are_two_rows_within_10_percent(batch, seq_len, checkpointing, variant):
    """kernels=False predicts the plain autograd model of model.py (no minillama.kernels): more activations
    (the norms' fp32 x and x_hat, silu(w1 x), w2's input, every position's fp32 logits) than kernels=True
    (the rows above), each measured by MemoryTracker within the grid's 10%."""
    args = get_preset("tiny").replace(**variant)
    rows = {}
    for kernels in (True, False):
        est = estimate_memory(args, batch=batch, seq_len=seq_len, checkpointing=checkpointing, kernels=kernels)
        peak = measured_peak(args, batch, seq_len, "train", checkpointing, kernels=kernels)
        assert abs(est.peak_bytes / peak - 1) < 0.10, (kernels, est.peak_bytes, peak, est.peak_moment)
        rows[kernels] = est, peak
    assert rows[False][0].by_category["activations"] > rows[True][0].by_category["activations"]
    assert rows[False][1] > rows[True][1]  # measured: the kernels save memory
    with pytest.raises(ValueError, match="kernels='yes': expected True or False"):
        estimate_memory(args, batch=1, seq_len=8, kernels="yes")


def test_checkpointing_predicts_fewer_activations_and_matches():
    args = get_preset("tiny")
    plain = estimate_memory(args, batch=4, seq_len=128)
    ckpt = estimate_memory(args, batch=4, seq_len=128, checkpointing=True)
    assert ckpt.by_category["activations"] < plain.by_category["activations"] / 2
    assert ckpt.peak_bytes < plain.peak_bytes
    # with checkpointing the peak moves to the backward of the first block: all the other gradients exist
    # and block 0 is recomputed
    assert ckpt.peak_moment == "backward of the first block"
    peak = measured_peak(args, 4, 128, "train", checkpointing=True)
    assert abs(ckpt.peak_bytes / peak - 1) < 0.10, (ckpt.peak_bytes, peak)


def test_train_py_order_keeps_last_steps_gradients_in_the_forward():
    # train.py zeroes the gradients between forward and backward: the previous step's gradients live
    # through the forward, and at this size the end of the forward becomes the peak
    args = get_preset("tiny")
    est = estimate_memory(args, batch=4, seq_len=128, grads_in_forward=True)
    assert est.peak_moment == "cross-entropy forward (end of forward)"
    assert est.peak_bytes > estimate_memory(args, batch=4, seq_len=128).peak_bytes
    peak = measured_peak(args, 4, 128, "train", train_py_order=True)
    assert abs(est.peak_bytes / peak - 1) < 0.10, (est.peak_bytes, peak)


def _adamw_step_peak(model, **impl):
    """MemoryTracker's peak and categories of one AdamW step (make_optimizer's groups, lr and betas; `impl`
    picks torch's implementation: fused=True or foreach=True/False), after a warm-up step made the state."""
    groups = [{"params": g["params"], "weight_decay": g["weight_decay"]}
              for g in make_optimizer(model, TrainConfig()).param_groups]
    optimizer = torch.optim.AdamW(groups, lr=1e-3, **impl)
    gen = torch.Generator().manual_seed(0)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=gen)
    optimizer.step()
    tracker = MemoryTracker(model, optimizer)
    with tracker:
        optimizer.step()
    return tracker.peak_bytes, tracker.by_category(), optimizer


@pytest.mark.parametrize("impl, fused", [({"fused": True}, True), ({"foreach": True}, False),
                                          ({"foreach": False}, False)])
def test_adamw_fused_and_foreach_measured_against_the_model(impl, fused):
    # the trainer's AdamW is fused (make_optimizer): no temporary, and each tensor's fp32 `step` counter on the
    # parameters' device, counted as optimizer state; foreach/single-tensor add their sqrt/div temporaries
    args = get_preset("tiny")
    model = minillama.create_model(args, seed=0)
    peak, cats, optimizer = _adamw_step_peak(model, **impl)
    assert make_optimizer(model, TrainConfig()).defaults["fused"] is True  # the trainer's AdamW
    assert bool(optimizer.defaults["fused"]) == fused
    est = estimate_memory(args, batch=1, seq_len=64, fused=fused, foreach=impl.get("foreach"))
    step = est.moments["optimizer step"]
    n_tensors = len(list(model.parameters()))
    assert all(s["step"].device == p.device and s["step"].dtype == torch.float32
               for p, s in optimizer.state.items())
    assert cats["optimizer_state"] == est.by_category["optimizer_state"] == 2 * 4 * args.num_params() + 4 * n_tensors
    assert (cats["temporary"] == 0) == fused
    assert abs(step / peak - 1) < 0.10, (step, peak, impl)  # the grid's tolerance
    assert abs(est.at_peak["temporary"] - cats["temporary"]) <= 0.10 * peak


def test_fused_adamw_on_cuda_keeps_step_counters_and_no_temporary():
    # the 7B figure of `minillama plan`: full bf16 fine-tuning with AdamW on CUDA. The trainer's fused AdamW has
    # no foreach temporary (the largest group, 12.55 GiB) and its 291 step counters live on the GPU
    args = get_preset("llama2-7b")
    kw = dict(batch=4, seq_len=512, param_dtype="bf16", device="cuda")
    fused, foreach = estimate_memory(args, **kw), estimate_memory(args, **kw, fused=False)
    n_tensors = 2 + 9 * args.n_layers + 1
    decay = args.num_params() - args.dim * (2 * args.n_layers + 1)
    assert fused.by_category["optimizer_state"] - foreach.by_category["optimizer_state"] == 4 * n_tensors
    assert foreach.moments["optimizer step"] - fused.moments["optimizer step"] == 2 * decay - 4 * n_tensors
    assert abs((foreach.peak_bytes - fused.peak_bytes) / GiB - 12.55) < 0.01


def test_estimate_structure_and_units():
    est = estimate_memory(get_preset("tiny"), batch=4, seq_len=128)
    assert set(est.by_category) == set(CATEGORIES) == set(est.at_peak)
    assert est.static_bytes == sum(est.by_category[c] for c in ("parameters", "gradients", "optimizer_state"))
    assert sum(est.at_peak.values()) == est.peak_bytes == max(est.moments.values())
    assert est.peak_bytes < sum(est.by_category.values())  # gradients are None at the start of backward
    assert est.notes and all(isinstance(line, str) for line in est.notes)
    assert any("linear_cross_entropy" in line for line in est.notes)  # the loss keeps its gradients only
    assert format_bytes(512) == "512 B" and format_bytes(3 * 1024**2 // 2) == "1.50 MiB"
    assert format_bytes(int(1.23 * GiB)) == "1.23 GiB"
    inf = estimate_memory(get_preset("tiny"), batch=4, seq_len=128, mode="inference")
    assert inf.by_category["gradients"] == inf.by_category["optimizer_state"] == inf.by_category["activations"] == 0


@pytest.mark.parametrize("kwargs, match", [
    (dict(optimizer="adam9000"), "optimizer='adam9000' is unknown"),
    (dict(amp="fp8"), "amp='fp8' is unknown"),
    (dict(mode="serve"), "mode='serve' is unknown"),
    (dict(lora={"r": 0}), "lora r=0 is invalid"),
    (dict(lora={"r": -4, "targets": "all"}), "lora r=-4 is invalid"),
    (dict(lora={"r": 8, "targets": ("wz",)}), "lora targets"),
    (dict(batch=0), "batch=0 is invalid"),
    (dict(seq_len=-1), "seq_len=-1 is invalid"),
    (dict(param_dtype="fp8"), "param_dtype='fp8' is unknown"),
    (dict(amp="bf16", param_dtype="bf16"), "needs param_dtype='fp32'"),
    (dict(quant4={"blocksize": 64}), "needs lora"),
    (dict(grad_accum=0), "grad_accum=0 is invalid"),
])
def test_bad_input_raises_one_clear_sentence(kwargs, match):
    full = dict(batch=2, seq_len=16)
    full.update(kwargs)
    with pytest.raises(ValueError, match=match) as err:
        estimate_memory(get_preset("tiny"), **full)
    msg = str(err.value)
    assert msg.endswith(".") and msg.count(". ") == 0, msg


# ---- the 7B / 8B budget table (qlora_budget_table) ---------------------------------------------------
def test_budget_constants_follow_the_qlora_papers_formulas():
    """Bits per weight of the 4-bit constants, against the QLoRA paper's formulas computed here: an fp32 absmax per
    64 weights = 32/64 = 0.5; double quantisation: an 8-bit absmax per 64 weights plus an fp32 second-level
    absmax per 256 of those = 8/64 + 32/(64*256) = 0.127. Ours also stores, once per tensor, the 16 fp32 levels
    (64 bytes) and with double quantisation the 256-level fp32 map and the fp32 offset (1,028 bytes): together
    at most 1,092 * 8 bits over the smallest linear of the model."""
    plain, nested = 32 / 64, 8 / 64 + 32 / (64 * 256)
    assert plain == 0.5 and round(nested, 3) == 0.127
    rows = qlora_budget_table()
    assert {r["preset"] for r in rows} == {"llama2-7b", "llama3-8b"}
    for r in rows:
        if r["const_bits"] is None:
            assert "QLoRA" not in r["method"]
            continue
        smallest = min(i * o for i, o in get_preset(r["preset"]).linear_shapes().values())
        dq = "double quant" in r["method"]
        paper, per_tensor = (nested, 64 + 256 * 4 + 4) if dq else (plain, 64)
        assert paper <= r["const_bits"] <= paper + 8 * per_tensor / smallest, r


def test_qlora_paper_7b_base_reconstruction():
    # LLaMA-7B from its paper's table: dim 4096, 32 layers, FFN 11008, vocabulary 32000 (= llama2-7b's shapes)
    linear = 32 * (4 * 4096 * 4096 + 3 * 4096 * 11008)
    rest = 2 * 32000 * 4096 + (2 * 32 + 1) * 4096  # embeddings, head, norms
    assert linear + rest == 6_738_415_616
    mb = 1e6
    ours = linear * (4 + 8 / 64 + 32 / (64 * 256)) / 8 + 2 * rest  # NF4 + double quant, the rest in bf16
    candidates = {"all weights at 4 bits": (linear + rest) / 2, "NF4 + DQ, rest bf16": ours,
                  "NF4 fp32 absmax, rest bf16": linear * 4.5 / 8 + 2 * rest,
                  "NF4 + DQ, rest fp32": ours + 2 * rest, "NF4 fp32 absmax, rest fp32": linear * 4.5 / 8 + 4 * rest}
    most = max(candidates.values())
    assert most == candidates["NF4 fp32 absmax, rest fp32"] < 5048 * mb  # no count of tensors reaches the figure
    assert round(most / mb) == 4692 and round((5048 * mb - most) / mb) == 356
    row = next(r for r in qlora_budget_table() if r["preset"] == "llama2-7b" and "double quant" in r["method"])
    bits = f"{5048 * mb * 8 / (linear + rest):.2f} bits/param"
    for text in ("5,048 MB", bits, "4,692 MB", "356 MB short"):
        assert text in row["published"], text
    assert f"ours {ours / mb:,.0f} MB" in row["why"] and "4,692 MB, 356 MB short" in row["why"]


def test_budget_table_orders_the_methods_and_cites_the_figures():
    rows = {(r["preset"], r["method"].split(" (")[0].split(" r=")[0]): r for r in qlora_budget_table()}
    for preset in ("llama2-7b", "llama3-8b"):
        args = get_preset(preset)
        n, linear = args.num_params(), args.n_layers * sum(i * o for i, o in args.linear_shapes().values())
        full, lora = rows[preset, "bf16 full fine-tuning"], rows[preset, "bf16 LoRA"]
        q, dq = rows[preset, "QLoRA NF4"], rows[preset, "QLoRA NF4 + double quant"]
        steps = 4 * (2 + 9 * args.n_layers + 1)  # fused AdamW's `step` counters
        assert full["static"] == 2 * n + 2 * n + 8 * n + steps  # bf16 weights and grads, two fp32 moments
        # double quantisation saves (0.5 - 0.127) bits on every 4-bit weight, up to the per-tensor maps
        saved = (q["parameters"] - dq["parameters"]) * 8 / linear
        assert abs(saved - (0.5 - (8 / 64 + 32 / (64 * 256)))) < 2e-3
        # the 4-bit base: half a byte per linear weight + constants, the rest in bf16
        assert lora["parameters"] - q["parameters"] == pytest.approx(linear * (2 - 0.5 - 0.5 / 8), rel=1e-3)
        assert full["static"] > lora["static"] > q["static"] > dq["static"]
        assert q["gradients"] == lora["gradients"] and q["optimizer_state"] == lora["optimizer_state"]
    assert "5,048 MB" in rows["llama2-7b", "QLoRA NF4 + double quant"]["published"]
    assert "5.5 GB" in rows["llama3-8b", "QLoRA NF4 + double quant"]["published"]
    assert "90.7 GB" in rows["llama3-8b", "bf16 full fine-tuning"]["published"]
    assert all(r["why"] for r in rows.values() if r["published"])
