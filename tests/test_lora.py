"""LoRA: exact at init, gradients only in A and B, PEFT's init and scaling, exact merge/unmerge,
PEFT interop both ways (q/k included: B rows permuted), adapter switching and stacking checked
against weights merged by hand, and one clear error per bad input.

Tolerances: fp32 logits 1e-5 (as in test_checkpoint); merged/unmerged base weights 1e-6."""

import copy
import json
import math

import pytest
import torch
from conftest import make_hf_model
from safetensors.torch import load_file, save_file
from torch import nn

from minillama import create_model, get_preset, load_model
from minillama.lora import (TARGETS, LoRALinear, adapter_names, apply_lora, call_with_adapter, load_adapter, lora_parameter_count,
                            merge_lora, save_adapter, set_adapter, trainable_parameters, use_adapter)

ATOL = 1e-5
# PEFT 0.21 calls a transformers 5 method that is deprecated; not ours to fix
pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")
HF_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PARENT = {"wq": "attention", "wk": "attention", "wv": "attention", "wo": "attention",
          "w1": "feed_forward", "w2": "feed_forward", "w3": "feed_forward"}


def tiny_model(seed=0):
    args = get_preset("tiny").replace(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=128, max_seq_len=64)
    return create_model(args, seed=seed)


def tokens_for(vocab, b=2, t=16, seed=0):
    return torch.randint(0, vocab, (b, t), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def randomise_lora(model, seed, names=None):
    """Give every LoRA A and B random values (B = 0 would hide every mistake)."""
    g = torch.Generator().manual_seed(seed)
    for n, p in model.named_parameters():
        if ("lora_A" in n or "lora_B" in n) and (names is None or any(f".{a}." in n for a in names)):
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def linear(model, i, t):
    return getattr(getattr(model.layers[i], PARENT[t]), t)


# ---- init, gradients, scaling ---------------------------------------------------------------------
def test_output_unchanged_at_init():
    model = tiny_model()
    x = tokens_for(128)
    with torch.no_grad():
        ref = model(x)
        apply_lora(model, r=4, alpha=8, targets="all")
        out = model(x)
    assert all(isinstance(linear(model, i, t), LoRALinear) for i in range(2) for t in TARGETS)
    assert torch.equal(out, ref)  # B = 0: the LoRA path adds exact zeros


def test_gradients_reach_only_lora_parameters():
    torch.manual_seed(0)
    model = apply_lora(tiny_model(), r=4, alpha=8, targets=("wq", "wk", "w2"))
    randomise_lora(model, 1)  # so that A gets a gradient too (with B = 0 it would be zero)
    x = tokens_for(128)
    model(x[:, :-1], x[:, 1:]).backward()
    lora = {n for n, _ in model.named_parameters() if ".lora_A." in n or ".lora_B." in n}
    assert len(lora) == 2 * 3 * 2  # A and B of 3 targets in 2 layers
    for n, p in model.named_parameters():
        if n in lora:
            assert p.requires_grad and p.grad is not None and p.grad.abs().sum() > 0, n
        else:
            assert not p.requires_grad and p.grad is None, n
    counts = trainable_parameters(model)
    expected = 2 * 4 * ((64 + 64) + (64 + 32) + (model.args.ffn_hidden_dim + 64))
    assert counts["trainable"] == expected
    assert counts["total"] == sum(p.numel() for p in model.parameters())
    assert counts["percent"] == pytest.approx(100 * expected / counts["total"])


def test_a_init_has_peft_bound_and_b_is_zero():
    # kaiming_uniform(a=sqrt(5)): gain sqrt(2 / (1 + 5)), bound = sqrt(3) * gain / sqrt(fan_in) = 1 / sqrt(in)
    torch.manual_seed(0)
    lin = LoRALinear(nn.Linear(256, 96, bias=False), r=16, alpha=32)
    A, B = lin.lora_A["default"].weight, lin.lora_B["default"].weight
    bound = 1 / math.sqrt(256)
    assert A.shape == (16, 256) and B.shape == (96, 16)
    assert A.abs().max() <= bound and A.abs().max() > 0.95 * bound
    assert A.var().item() == pytest.approx(bound ** 2 / 3, rel=0.1)  # variance of U(-b, b)
    assert torch.count_nonzero(B) == 0


def test_a_init_equals_peft_for_the_same_seed():
    peft = pytest.importorskip("peft")
    base = nn.Sequential()
    base.proj = nn.Linear(48, 40, bias=False)
    torch.manual_seed(123)
    ours = LoRALinear(copy.deepcopy(base.proj), r=8, alpha=16)
    torch.manual_seed(123)
    ref = peft.get_peft_model(base, peft.LoraConfig(r=8, lora_alpha=16, target_modules=["proj"]))
    ref_A = ref.base_model.model.proj.lora_A["default"].weight
    torch.testing.assert_close(ours.lora_A["default"].weight, ref_A, atol=0, rtol=0)


@pytest.mark.parametrize("rslora", [False, True])
def test_scaling_and_delta_weight(rslora):
    torch.manual_seed(0)
    lin = LoRALinear(nn.Linear(32, 24, bias=False), r=4, alpha=8, use_rslora=rslora)
    randomise_lora(lin, 2)
    scale = 8 / math.sqrt(4) if rslora else 8 / 4
    assert lin.scaling["default"] == scale
    A, B = lin.lora_A["default"].weight, lin.lora_B["default"].weight
    torch.testing.assert_close(lin.delta_weight("default"), scale * B @ A)
    x = torch.randn(3, 32)
    with torch.no_grad():
        torch.testing.assert_close(lin(x), x @ lin.base.weight.T + scale * (x @ A.T) @ B.T, atol=1e-6, rtol=0)


def test_lora_parameter_count_llama2_7b():
    args = get_preset("llama2-7b")
    assert lora_parameter_count(args, 8, ("wq", "wv")) == 4_194_304
    assert lora_parameter_count(args, 8, "all") == 19_988_480


def test_parameter_count_matches_model():
    model = tiny_model()
    apply_lora(model, r=3, targets=("wk", "wo", "w1"))
    assert trainable_parameters(model)["trainable"] == lora_parameter_count(model.args, 3, ("wk", "wo", "w1"))


# ---- merge ----------------------------------------------------------------------------------------
def test_merge_unmerge_exact():
    model = apply_lora(tiny_model(), r=4, alpha=8, targets="all")
    randomise_lora(model, 3)
    x = tokens_for(128)
    base_weights = {(i, t): linear(model, i, t).base.weight.detach().clone() for i in range(2) for t in TARGETS}
    with torch.no_grad():
        ref = model(x)
        for i in range(2):
            for t in TARGETS:
                linear(model, i, t).merge()
        merged = model(x)
        assert (linear(model, 0, "wq").base.weight - base_weights[(0, "wq")]).abs().max() > 1e-3
        for i in range(2):
            for t in TARGETS:
                linear(model, i, t).unmerge()
        again = model(x)
    torch.testing.assert_close(merged, ref, atol=ATOL, rtol=0)
    torch.testing.assert_close(again, ref, atol=ATOL, rtol=0)
    for (i, t), w in base_weights.items():
        torch.testing.assert_close(linear(model, i, t).base.weight, w, atol=1e-6, rtol=0)


def test_merge_lora_gives_plain_linears_and_same_logits():
    model = apply_lora(tiny_model(), r=4, alpha=8, targets="all")
    randomise_lora(model, 4)
    x = tokens_for(128)
    with torch.no_grad():
        ref = model(x)
        out = merge_lora(model)(x)
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    assert all(type(linear(model, i, t)) is nn.Linear for i in range(2) for t in TARGETS)
    assert set(model.state_dict()) == set(tiny_model().state_dict())
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=0)


def test_kv_cache_generation_with_lora_on_k():
    model = apply_lora(tiny_model(), r=4, alpha=8, targets="all")
    randomise_lora(model, 10)
    x = tokens_for(128, b=1, t=12)
    with torch.no_grad():
        full = model(x)
        model.setup_cache(1)  # reads layers[0].attention.wk.weight
        steps = [model(x[:, :6], start_pos=0)] + [model(x[:, i:i + 1], start_pos=i) for i in range(6, 12)]
        model.clear_cache()
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=ATOL, rtol=0)


def test_bf16_base_keeps_fp32_lora_weights():
    model = tiny_model().to(torch.bfloat16)
    apply_lora(model, r=4, alpha=8, targets=("wq", "w2"))
    lin = linear(model, 0, "wq")
    assert lin.base.weight.dtype == torch.bfloat16 and lin.lora_A["default"].weight.dtype == torch.float32
    x = tokens_for(128)
    loss = model(x[:, :-1], x[:, 1:])
    loss.backward()
    assert model(x).dtype == torch.bfloat16 and lin.lora_B["default"].weight.grad.dtype == torch.float32


# ---- switching and stacking -----------------------------------------------------------------------
def merged_by_hand(base, lora_model, weights, r_alpha):
    """A copy of the plain `base` model with W += sum weight * (alpha / r) * B @ A written out here."""
    ref = copy.deepcopy(base)
    with torch.no_grad():
        for i in range(len(ref.layers)):
            for t in TARGETS:
                lin = linear(lora_model, i, t)
                for name, c in weights.items():
                    if isinstance(lin, LoRALinear) and name in lin.lora_A:
                        r, alpha = r_alpha[name]
                        A, B = lin.lora_A[name].weight, lin.lora_B[name].weight
                        linear(ref, i, t).weight += c * (alpha / r) * torch.einsum("or,ri->oi", B, A)
    return ref


def test_switching_and_stacking_adapters():
    base = tiny_model()
    model = copy.deepcopy(base)
    apply_lora(model, r=4, alpha=8, targets="all", name="a")
    apply_lora(model, r=2, alpha=6, targets=("wq", "wv", "w2"), name="b")
    randomise_lora(model, 5)
    r_alpha = {"a": (4, 8), "b": (2, 6)}
    assert adapter_names(model) == ["a", "b"]
    x = tokens_for(128)
    ptrs = {n: p.data_ptr() for n, p in model.named_parameters()}
    values = {n: p.detach().clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        ref_base = base(x)
        ref_a = merged_by_hand(base, model, {"a": 1.0}, r_alpha)(x)
        ref_b = merged_by_hand(base, model, {"b": 1.0}, r_alpha)(x)
        ref_ab = merged_by_hand(base, model, {"a": 1.0, "b": 0.5}, r_alpha)(x)
        assert (ref_a - ref_base).abs().max() > 1e-2 and (ref_b - ref_base).abs().max() > 1e-2
        torch.testing.assert_close(model(x), ref_a, atol=ATOL, rtol=0)  # the first adapter is active
        torch.testing.assert_close(call_with_adapter(model, "b", x), ref_b, atol=ATOL, rtol=0)
        torch.testing.assert_close(call_with_adapter(model, {"a": 1.0, "b": 0.5}, x), ref_ab, atol=ATOL, rtol=0)
        torch.testing.assert_close(call_with_adapter(model, {}, x), ref_base, atol=ATOL, rtol=0)
        with use_adapter(model, None):
            torch.testing.assert_close(model(x), ref_base, atol=ATOL, rtol=0)
        with use_adapter(model, "b"):
            torch.testing.assert_close(model(x), ref_b, atol=ATOL, rtol=0)
        assert linear(model, 0, "wq").active == [("a", 1.0)]  # restored
        set_adapter(model, {"a": 1.0, "b": 0.5})
        torch.testing.assert_close(model(x), ref_ab, atol=ATOL, rtol=0)
        assert linear(model, 1, "w1").active == [("a", 1.0)]  # b is not on w1
        # merged layers still give the same output whatever is switched on
        for _, m in [(n, m) for n, m in model.named_modules() if isinstance(m, LoRALinear)]:
            m.merge()
        torch.testing.assert_close(model(x), ref_ab, atol=ATOL, rtol=0)
        torch.testing.assert_close(call_with_adapter(model, "b", x), ref_b, atol=ATOL, rtol=0)
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.unmerge()
    # no weight was copied or replaced by switching
    assert {n: p.data_ptr() for n, p in model.named_parameters()} == ptrs
    for n, p in model.named_parameters():
        torch.testing.assert_close(p, values[n], atol=1e-6, rtol=0)


def test_merge_lora_of_a_named_adapter():
    base = tiny_model()
    model = copy.deepcopy(base)
    apply_lora(model, r=4, alpha=8, targets="all", name="a")
    apply_lora(model, r=2, alpha=6, targets=("wq", "wv"), name="b")
    randomise_lora(model, 6)
    x = tokens_for(128)
    with torch.no_grad():
        ref = merged_by_hand(base, model, {"b": 1.0}, {"a": (4, 8), "b": (2, 6)})(x)
        torch.testing.assert_close(merge_lora(model, "b")(x), ref, atol=ATOL, rtol=0)


def test_new_layers_follow_the_active_adapters():
    model = apply_lora(tiny_model(), r=4, targets=("wq",), name="a")
    apply_lora(model, r=4, targets=("w1",), name="b")
    assert linear(model, 0, "wq").active == [("a", 1.0)] and linear(model, 0, "w1").active == []
    set_adapter(model, "b")
    assert linear(model, 0, "wq").active == [] and linear(model, 0, "w1").active == [("b", 1.0)]


# ---- PEFT interop ---------------------------------------------------------------------------------
def hf_pair(tmp_path, seed=0):
    hf = make_hf_model("gqa", seed=seed)
    hf.save_pretrained(tmp_path / "hf")
    return hf, load_model(tmp_path / "hf")


@pytest.mark.parametrize("rslora", [False, True])
def test_minillama_adapter_loads_in_peft(tmp_path, rslora):
    peft = pytest.importorskip("peft")
    hf, model = hf_pair(tmp_path)
    apply_lora(model, r=4, alpha=8, targets="all", use_rslora=rslora)
    randomise_lora(model, 7)
    save_adapter(model, tmp_path / "adapter")
    cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["task_type"] == "CAUSAL_LM" and cfg["bias"] == "none"
    assert (cfg["r"], cfg["lora_alpha"], cfg["use_rslora"]) == (4, 8, rslora)
    assert sorted(cfg["target_modules"]) == sorted(HF_TARGETS)
    sd = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    assert len(sd) == 3 * 7 * 2
    assert sd["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"].shape == (4, 96)
    assert sd["base_model.model.model.layers.0.self_attn.k_proj.lora_B.weight"].shape == (32, 4)
    # the q/k permutation is applied to B (written out here from docs/references.md), not to A
    B = linear(model, 0, "wk").lora_B["default"].weight.detach()
    expect = B.view(2, 16 // 2, 2, 4).transpose(1, 2).reshape(32, 4)
    assert torch.equal(sd["base_model.model.model.layers.0.self_attn.k_proj.lora_B.weight"], expect)

    x = tokens_for(300)
    with torch.no_grad():
        base_logits = hf(x).logits
        ours = model(x)
        ref = peft.PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()(x).logits
    assert (ref - base_logits).abs().max() > 1e-2  # the adapter really changes the output
    torch.testing.assert_close(ours, ref, atol=ATOL, rtol=0)


@pytest.mark.parametrize("rslora", [False, True])
def test_peft_adapter_loads_in_minillama(tmp_path, rslora):
    peft = pytest.importorskip("peft")
    hf, model = hf_pair(tmp_path)
    torch.manual_seed(0)
    pm = peft.get_peft_model(hf, peft.LoraConfig(r=4, lora_alpha=8, target_modules=HF_TARGETS,
                                                 use_rslora=rslora, task_type="CAUSAL_LM"))
    randomise_lora(pm, 8)
    pm.save_pretrained(tmp_path / "peft")
    x = tokens_for(300)
    with torch.no_grad():
        ref = pm.eval()(x).logits
        base = model(x)
        assert load_adapter(model, tmp_path / "peft") == "default"
        out = model(x)
    assert (ref - base).abs().max() > 1e-2
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=0)
    assert linear(model, 2, "wk").scaling["default"] == (8 / 2 if rslora else 8 / 4)


def test_save_and_load_round_trip_in_minillama(tmp_path):
    model = apply_lora(tiny_model(), r=4, alpha=8, dropout=0.1, targets=("wq", "wk", "w3"))
    randomise_lora(model, 9)
    save_adapter(model, tmp_path / "ad")
    fresh = tiny_model()
    assert load_adapter(fresh, tmp_path / "ad", name="x") == "x"
    for i in range(2):
        for t in ("wq", "wk", "w3"):
            a, b = linear(model, i, t), linear(fresh, i, t)
            assert torch.equal(a.lora_A["default"].weight, b.lora_A["x"].weight)
            assert torch.equal(a.lora_B["default"].weight, b.lora_B["x"].weight)
            assert b.lora_dropout["x"].p == 0.1
    assert type(linear(fresh, 0, "wv")) is nn.Linear
    assert trainable_parameters(fresh)["trainable"] == trainable_parameters(model)["trainable"]


def test_save_replaces_directory_and_leaves_nothing_on_error(tmp_path):
    model = apply_lora(tiny_model(), r=2)
    save_adapter(model, tmp_path / "ad")
    save_adapter(model, tmp_path / "ad")  # replaced in place
    with pytest.raises(ValueError, match="no adapter 'nope'"):
        save_adapter(model, tmp_path / "other", name="nope")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ad"]


# ---- bad input ------------------------------------------------------------------------------------
def test_unknown_target_lists_valid_ones():
    model = tiny_model()
    with pytest.raises(ValueError, match=r"'q_proj' is unknown.*'wq', 'wk', 'wv', 'wo', 'w1', 'w2', 'w3'"):
        apply_lora(model, targets=("wq", "q_proj"))
    assert not any(isinstance(m, LoRALinear) for m in model.modules())  # nothing half-applied
    with pytest.raises(ValueError, match="unknown"):
        lora_parameter_count(model.args, 8, ("wx",))


@pytest.mark.parametrize("r", [0, -2, 1.5])
def test_bad_rank(r):
    with pytest.raises(ValueError, match=f"r={r!r} is invalid"):
        apply_lora(tiny_model(), r=r)


def test_applying_lora_twice_to_the_same_layer():
    model = apply_lora(tiny_model(), r=4, targets=("wv",))
    with pytest.raises(ValueError, match="applying LoRA twice to the same layer"):
        apply_lora(model, r=4, targets=("wq", "wv"))
    assert type(linear(model, 0, "wq")) is nn.Linear  # checked before changing anything
    apply_lora(model, r=4, targets=("wq", "wv"), name="second")  # another name is fine
    assert adapter_names(model) == ["default", "second"]


def test_unknown_adapter_name():
    model = apply_lora(tiny_model(), r=4)
    with pytest.raises(ValueError, match=r"'b' is unknown.*\['default'\]"):
        call_with_adapter(model, "b", tokens_for(128))
    with pytest.raises(ValueError, match="unknown"):
        merge_lora(model, "b")


@pytest.fixture
def adapter_dir(tmp_path):
    model = apply_lora(tiny_model(), r=4, alpha=8, targets=("wq", "wk"))
    return save_adapter(model, tmp_path / "ad")


def test_shape_mismatch_names_key_and_shapes(adapter_dir, tmp_path):
    wf = adapter_dir / "adapter_model.safetensors"
    sd = load_file(wf)
    key = "base_model.model.model.layers.1.self_attn.k_proj.lora_B.weight"
    sd[key] = torch.zeros(48, 4)
    save_file(sd, wf)
    model = tiny_model()
    expected = rf"{key.replace('.', '[.]')}' has shape \[48, 4\] but the model expects \[32, 4\]"
    with pytest.raises(ValueError, match=expected):
        load_adapter(model, adapter_dir)
    assert not any(isinstance(m, LoRALinear) for m in model.modules())


def test_adapter_of_a_wider_model_is_refused(adapter_dir):
    args = get_preset("tiny").replace(dim=128, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=128, max_seq_len=64)
    with pytest.raises(ValueError, match=r"layers[.]0[.]self_attn[.]k_proj[.]lora_A[.]weight' has shape \[4, 64\] "
                                         r"but the model expects \[4, 128\]"):
        load_adapter(create_model(args), adapter_dir)


@pytest.mark.parametrize("missing", ["adapter_config.json", "adapter_model.safetensors"])
def test_missing_file(adapter_dir, missing):
    (adapter_dir / missing).unlink()
    with pytest.raises(FileNotFoundError, match=missing):
        load_adapter(tiny_model(), adapter_dir)


def test_missing_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_adapter(tiny_model(), tmp_path / "nowhere")


def test_peft_type_not_lora(adapter_dir):
    cfg = json.loads((adapter_dir / "adapter_config.json").read_text())
    cfg["peft_type"] = "IA3"
    (adapter_dir / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="peft_type 'IA3'.*only 'LORA'"):
        load_adapter(tiny_model(), adapter_dir)


def test_key_for_a_layer_the_model_lacks(adapter_dir):
    wf = adapter_dir / "adapter_model.safetensors"
    sd = load_file(wf)
    for part in "AB":
        sd[f"base_model.model.model.layers.7.self_attn.q_proj.lora_{part}.weight"] = \
            sd[f"base_model.model.model.layers.0.self_attn.q_proj.lora_{part}.weight"].clone()
    save_file(sd, wf)
    with pytest.raises(ValueError, match="layers[.]7.*is for layer 7 but the model has 2 layers"):
        load_adapter(tiny_model(), adapter_dir)


def test_key_that_is_not_lora(adapter_dir):
    wf = adapter_dir / "adapter_model.safetensors"
    sd = load_file(wf)
    sd["base_model.model.lm_head.weight"] = torch.zeros(128, 64)
    save_file(sd, wf)
    with pytest.raises(ValueError, match="'base_model.model.lm_head.weight' is not a LoRA weight"):
        load_adapter(tiny_model(), adapter_dir)


def test_loading_the_same_name_twice(adapter_dir):
    model = tiny_model()
    load_adapter(model, adapter_dir)
    with pytest.raises(ValueError, match="applying LoRA twice"):
        load_adapter(model, adapter_dir)
    assert load_adapter(model, adapter_dir, name="again") == "again"


def test_missing_half_of_a_pair(adapter_dir):
    wf = adapter_dir / "adapter_model.safetensors"
    sd = load_file(wf)
    key = "base_model.model.model.layers.1.self_attn.q_proj.lora_B.weight"
    del sd[key]
    save_file(sd, wf)
    with pytest.raises(ValueError, match=f"{key.replace('.', '[.]')}' is missing"):
        load_adapter(tiny_model(), adapter_dir)


def test_use_adapter_restores_after_an_error():
    model = apply_lora(tiny_model(), r=4, name="a")
    apply_lora(model, r=4, name="b")
    with pytest.raises(RuntimeError):
        with use_adapter(model, {"a": 0.5, "b": 2.0}):
            assert linear(model, 0, "wq").active == [("a", 0.5), ("b", 2.0)]
            raise RuntimeError("boom")
    assert linear(model, 0, "wq").active == [("a", 1.0)]
    with pytest.raises(ValueError, match="adapter=3 is invalid"):
        set_adapter(model, 3)
