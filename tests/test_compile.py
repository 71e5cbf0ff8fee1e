"""torch.compile of the blocks (training.techniques.compile_blocks, TrainConfig.compile, train --compile, bench --compare
hf --compile): the same values and gradients as the eager model and as HF, the same checkpoints, the blocks plain
again after training, and the comparison's timed steps still compiled after its tracked ones.

Compiling needs a C++ compiler on the CPU; without one the tests that compile are skipped (the refusal is tested)."""

import dataclasses
import math

import pytest
import torch

from minillama import ModelArgs, create_model
from minillama.cli.main import main
from minillama.measuring import compare
from minillama.rope import apply_rope, rope_cos_sin
from minillama.training import TrainConfig, compile_blocks, techniques, train
from minillama.training.techniques import compile_problem

needs_compiler = pytest.mark.skipif(compile_problem("cpu") is not None, reason=str(compile_problem("cpu")))
SMALL = compare.Settings(batch=2, seq_len=32, repeats=1, warmup=1)


def test_rope_real_form_equals_the_pair_formula_and_the_complex_form(monkeypatch):
    """The real-valued RoPE taken under torch.compile, against the rotation written pair by pair."""
    torch.manual_seed(0)
    x = torch.randn(2, 5, 3, 8)
    cos, sin = rope_cos_sin(torch.arange(5), 8, 10000.0)
    ref = torch.empty_like(x)
    for j in range(4):  # pair j of each head: (x[2j], x[2j+1]) rotated by angle j of each position
        a, b, c, s = x[..., 2 * j], x[..., 2 * j + 1], cos[:, None, j], sin[:, None, j]
        ref[..., 2 * j], ref[..., 2 * j + 1] = a * c - b * s, a * s + b * c
    complex_form = apply_rope(x, cos, sin)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    real_form = apply_rope(x, cos, sin)
    torch.testing.assert_close(real_form, ref, rtol=0, atol=1e-6)
    torch.testing.assert_close(complex_form, ref, rtol=0, atol=1e-6)


@needs_compiler
@pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")
def test_compiled_blocks_equal_eager_and_hf_in_value_and_gradients():
    ours, hf, args = compare.build_pair(compare.ROWS["lora-qv-compiled"], SMALL)
    eager, _, _ = compare.build_pair(compare.ROWS["lora-qv"], SMALL)
    assert all("forward" in vars(b) for b in ours.layers) and not any("forward" in vars(b) for b in eager.layers)
    assert list(ours.state_dict()) == list(eager.state_dict())  # checkpoints and adapters see the same names
    inputs, targets = compare.make_batch(args.vocab_size, 2, 32, 0, "cpu")
    losses = {}
    for name, model in (("compiled", ours), ("eager", eager)):
        loss = model(inputs, targets)
        loss.backward()
        losses[name] = float(loss)
    hf_loss = float(hf(input_ids=inputs, labels=targets, shift_labels=targets, use_cache=False).loss)
    # fp32: the two differ only in the order of additions inside fused kernels
    assert math.isclose(losses["compiled"], losses["eager"], rel_tol=1e-5)
    assert math.isclose(losses["compiled"], hf_loss, rel_tol=1e-5)
    grads = {n: p.grad for n, p in eager.named_parameters() if p.requires_grad}
    for n, p in ours.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, grads[n], rtol=1e-4, atol=1e-6, msg=n)
    compile_blocks(ours, enable=False)
    assert not any("forward" in vars(b) for b in ours.layers)


@needs_compiler
@pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")
def test_compared_steps_stay_compiled_after_the_tracked_and_counted_ones():
    """The tracker and the FLOP counter are dispatch modes: a compiled step run under one falls back to eager for
    good. measure_pair runs those two eagerly on purpose; the timed steps after them must still be compiled."""
    s = SMALL
    ours, hf, args = compare.build_pair(compare.ROWS["lora-qv-compiled"], s)
    inputs, targets = compare.make_batch(args.vocab_size, 2, 32, 0, "cpu")
    steps = compare._train_steps(ours, hf, inputs, targets, s, {})
    res = compare.measure_pair(steps, torch.device("cpu"), warmup=1, repeats=1)
    assert res["minillama"]["flops_per_step"] == res["hf"]["flops_per_step"]  # the eager steps: the same matmuls
    with torch.profiler.profile() as prof:
        steps["minillama"][2]()
    names = {e.name for e in prof.events()}
    assert any("Compiled" in n for n in names), sorted(names)[:20]


@needs_compiler
@pytest.mark.filterwarnings("ignore::UserWarning")
def test_training_with_compile_logs_the_eager_losses_and_leaves_plain_blocks(tmp_path):
    args = ModelArgs(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=300, max_seq_len=64, multiple_of=16)
    gen = torch.Generator().manual_seed(0)
    rows = torch.randint(0, 300, (8, 17), generator=gen)
    data = (rows[:, :-1], rows[:, 1:])
    cfg = TrainConfig(steps=3, batch_size=4, lr=1e-2, warmup_steps=1, lora_r=4, lora_alpha=8, save_every=3,
                      eval_every=3)
    logs = {}
    for compiled in (False, True):
        model = create_model(args, seed=0)
        logs[compiled] = train(model, data, {"val": data}, dataclasses.replace(cfg, compile=compiled),
                               tmp_path / str(compiled), progress=False)
        assert not any("forward" in vars(b) for b in model.layers)  # generation afterwards runs the plain blocks
    for a, b in zip(logs[False], logs[True]):
        assert math.isclose(a["loss"], b["loss"], rel_tol=1e-5)
    assert math.isclose(logs[False][-1]["val_loss"], logs[True][-1]["val_loss"], rel_tol=1e-5)


def test_compile_bad_input(tmp_path, capsys, monkeypatch):
    with pytest.raises(ValueError, match="compile"):
        TrainConfig(compile="yes")
    assert main(["bench", "--compile-hf", "--out", str(tmp_path / "grid")]) == 2
    assert "--compile-hf is for --compare hf" in capsys.readouterr().err
    monkeypatch.setattr(techniques.shutil, "which", lambda name: None)  # no C++ compiler on this machine
    assert "needs a C++ compiler" in compile_problem("cpu")
    row = compare.compare_row(compare.ROWS["full-compiled"], SMALL)  # skipped, saying why; nothing is built
    assert "needs a C++ compiler" in row["skipped"] and row["compiled"] == "minillama"
    assert main(["train", "--compile", "--model", str(tmp_path / "m"), "--data", str(tmp_path / "d.jsonl"), "--steps", "1",
                 "--out", str(tmp_path / "cmp")]) == 2
    assert "--compile: torch.compile needs a C++ compiler" in capsys.readouterr().err
    model = create_model(ModelArgs(dim=32, n_layers=1, n_heads=4, vocab_size=64, multiple_of=16), seed=0)
    with pytest.raises(RuntimeError, match="needs a C\\+\\+ compiler"):
        compile_blocks(model)
    with pytest.raises(RuntimeError, match="needs a C\\+\\+ compiler"):
        train(model, (torch.zeros(2, 8, dtype=torch.long),) * 2, {}, TrainConfig(steps=1, batch_size=2, compile=True),
              tmp_path / "run", progress=False)
    assert not (tmp_path / "grid").exists() and not (tmp_path / "cmp").exists() and not (tmp_path / "run").exists()
    assert not any("forward" in vars(b) for b in model.layers)


def test_a_compile_failure_costs_its_row_only(monkeypatch):
    """A GPU slot is short: a compiler error (Triton, C++) is recorded in its row and the next row still runs;
    the same error in an eager row is a bug and is raised."""
    monkeypatch.setattr(techniques, "compile_problem", lambda device: None)

    def fails(row, s):
        raise RuntimeError("CppCompileError: C++ compile error\n(the compiler's log)")

    monkeypatch.setattr(compare, "run_row", fails)
    row = compare.compare_row(compare.ROWS["lora-qv-compiled"], SMALL)
    assert row["error"] == "torch.compile failed: RuntimeError: CppCompileError: C++ compile error"
    with pytest.raises(RuntimeError, match="CppCompileError"):
        compare.compare_row(compare.ROWS["lora-qv"], SMALL)


def test_doctor_says_whether_compile_is_usable(monkeypatch):
    from minillama.cli.doctor import compile_support

    monkeypatch.setattr(techniques.shutil, "which", lambda name: "/usr/bin/g++")
    assert compile_support("cpu").startswith("usable on cpu (train --compile")
    monkeypatch.setattr(techniques.shutil, "which", lambda name: None)
    assert compile_support("cpu").startswith("torch.compile needs a C++ compiler for the CPU")
