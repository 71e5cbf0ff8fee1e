"""RoPE scaling (rope.py): every method gives HF LlamaForCausalLM's logits beyond the trained window.

The references are transformers' own rope code (through LlamaForCausalLM built from a LlamaConfig the test
writes, or from our exported config.json) and, for `ntk`, which HF has no type for, HF's plain RoPE with
rope_theta set to the base written out here: theta * s ** (d / (d - 2)). fp32, atol 1e-4.
"""

import json
import warnings

import pytest
import torch

from minillama import ModelArgs, create_model, generate, load_model, save_model

transformers = pytest.importorskip("transformers")

ATOL = 1e-4
WINDOW, FACTOR, LENGTH = 32, 4.0, 100  # trained window, scale, test length (beyond the window)
# Random tiny configs: grouped-query attention (head_dim 16) and multi-head (head_dim 32, Llama-3's theta).
CONFIGS = {
    "gqa": dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=128, multiple_of=16),
    "mha": dict(dim=96, n_layers=2, n_heads=3, vocab_size=128, multiple_of=16, rope_theta=500000.0),
}
SCALINGS = {  # in HF's format, written by hand
    "linear": {"rope_type": "linear", "factor": FACTOR},
    "dynamic": {"rope_type": "dynamic", "factor": FACTOR, "original_max_position_embeddings": WINDOW},
    "yarn": {"rope_type": "yarn", "factor": FACTOR, "original_max_position_embeddings": WINDOW},
    "llama3": {"rope_type": "llama3", "factor": FACTOR, "original_max_position_embeddings": WINDOW,
               "low_freq_factor": 1.0, "high_freq_factor": 4.0},
}


def ours(config="gqa", scaling=None, seed=0, max_seq_len=int(FACTOR * WINDOW)):
    args = ModelArgs(**CONFIGS[config], max_seq_len=max_seq_len, rope_scaling=scaling)
    model = create_model(args, seed=seed).eval()
    torch.manual_seed(seed)
    return sharpen(model)


def sharpen(model):
    """Random norms, so that a wrongly mapped weight cannot hide, and queries/keys 6x the initial scale, so
    that attention is sharp and the positions matter (otherwise a wrong scaling moves the logits by ~1e-3)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
            if name.endswith(("wq.weight", "wk.weight", "q_proj.weight", "k_proj.weight")):
                p.mul_(6)
    return model


def tokens(t=LENGTH, b=2, seed=0):
    return torch.randint(0, 128, (b, t), generator=torch.Generator().manual_seed(seed))


def hf_from_export(model, d):
    """Our model written as an HF checkpoint and read by transformers (a fresh model: HF's dynamic rope
    keeps state between calls)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        save_model(model, d, "hf")
    return transformers.LlamaForCausalLM.from_pretrained(d, dtype=torch.float32).eval()


def logits(model, x):
    with torch.no_grad():
        out = model(x)
    return out if torch.is_tensor(out) else out.logits


@pytest.mark.parametrize("config", sorted(CONFIGS))
@pytest.mark.parametrize("kind", sorted(SCALINGS))
def test_logits_equal_hf_beyond_the_window(tmp_path, kind, config):
    model, x = ours(config, SCALINGS[kind]), tokens()
    hf = hf_from_export(model, tmp_path)
    assert hf.config.rope_parameters["rope_type"] == kind
    torch.testing.assert_close(logits(model, x), logits(hf, x), atol=ATOL, rtol=0)
    # the scaling matters at this length: the unscaled model is far from it
    assert (logits(ours(config), x) - logits(model, x)).abs().max() > 100 * ATOL


@pytest.mark.parametrize("style", ["5.x", "4.x"])
@pytest.mark.parametrize("kind", sorted(SCALINGS))
def test_hf_config_loads_with_its_scaling(tmp_path, kind, style):
    """An HF model made from a LlamaConfig with the scaling; config.json in transformers 5.x's
    `rope_parameters` or 4.x's `rope_scaling` with "type"."""
    scaling = dict(SCALINGS[kind])
    window = scaling.pop("original_max_position_embeddings") if kind == "dynamic" else None  # HF: the window
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=128, rms_norm_eps=1e-5,
                                   max_position_embeddings=window or int(FACTOR * WINDOW), rope_scaling=scaling)
    torch.manual_seed(0)
    hf = sharpen(transformers.LlamaForCausalLM(cfg).eval())
    hf.save_pretrained(tmp_path)
    if style == "4.x":
        path = tmp_path / "config.json"
        c = json.loads(path.read_text())
        params = c.pop("rope_parameters")
        c["rope_theta"] = params.pop("rope_theta")
        c["rope_scaling"] = {"type": params.pop("rope_type"), **params}
        path.write_text(json.dumps(c))
    model, x = load_model(tmp_path), tokens()
    assert model.args.max_seq_len == int(FACTOR * WINDOW)
    assert model.args.rope_scaling.get("original_max_position_embeddings", WINDOW) == WINDOW
    torch.testing.assert_close(logits(model, x), logits(hf, x), atol=ATOL, rtol=0)


@pytest.mark.parametrize("config", sorted(CONFIGS))
def test_ntk_equals_hf_default_rope_with_the_scaled_base(tmp_path, config):
    model, x = ours(config, {"rope_type": "ntk", "factor": FACTOR}), tokens()
    d, theta = model.args.head_dim, model.args.rope_theta
    with pytest.warns(UserWarning, match="no 'ntk' rope type"):
        save_model(model, tmp_path, "hf")
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["rope_scaling"] is None and cfg["rope_theta"] == pytest.approx(theta * FACTOR ** (d / (d - 2)))
    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    torch.testing.assert_close(logits(model, x), logits(hf, x), atol=ATOL, rtol=0)
    assert (logits(ours(config), x) - logits(model, x)).abs().max() > 100 * ATOL


@pytest.mark.parametrize("kind", ["linear", "ntk", "yarn", "llama3"])
def test_scale_one_equals_unscaled(kind):
    scaling = {**SCALINGS.get(kind, {"rope_type": kind}), "factor": 1.0}
    x = tokens()
    torch.testing.assert_close(logits(ours(scaling=scaling), x), logits(ours(), x), atol=1e-6, rtol=0)


def test_dynamic_equals_unscaled_within_the_window_only():
    scaled, plain = ours(scaling=SCALINGS["dynamic"]), ours()
    inside, beyond = tokens(WINDOW), tokens(WINDOW + 1)
    torch.testing.assert_close(logits(scaled, inside), logits(plain, inside), atol=1e-6, rtol=0)
    assert (logits(scaled, beyond) - logits(plain, beyond)).abs().max() > 1e-4


def test_dynamic_cached_generation_equals_hf_generate(tmp_path):
    """Prompt inside the window, generation far past it: with a KV cache every step recomputes the base
    from the current length, and keys already cached keep their angles, as in HF."""
    model = ours(scaling=SCALINGS["dynamic"])
    hf = hf_from_export(model, tmp_path)
    prompt = tokens(20, b=1)
    out = hf.generate(prompt, max_new_tokens=40, do_sample=False, return_dict_in_generate=True, output_logits=True,
                      attention_mask=torch.ones_like(prompt), pad_token_id=0)
    hf_new = out.sequences[0, 20:].tolist()
    assert generate(model, prompt[0].tolist(), 40) == [hf_new]
    # the logits of every cached step too
    model.setup_cache(1)
    seq = out.sequences
    with torch.no_grad():
        step_logits = [model(seq[:, :20])[:, -1]]
        step_logits += [model(seq[:, p:p + 1], start_pos=p)[:, -1] for p in range(20, 20 + 39)]
    model.clear_cache()
    torch.testing.assert_close(torch.cat(step_logits), torch.cat(out.logits), atol=ATOL, rtol=0)


def test_load_model_applies_a_scaling(tmp_path):
    save_model(ours(max_seq_len=WINDOW), tmp_path / "plain")
    model = load_model(tmp_path / "plain", rope_scaling=SCALINGS["yarn"], max_seq_len=int(FACTOR * WINDOW))
    assert model.args.rope_scaling == SCALINGS["yarn"] and model.args.max_seq_len == FACTOR * WINDOW
    x = tokens()
    torch.testing.assert_close(logits(model, x), logits(ours(scaling=SCALINGS["yarn"]), x), atol=0, rtol=0)


@pytest.mark.parametrize("kind", sorted(SCALINGS) + ["ntk", "linear-4.x"])
def test_scaling_round_trips(tmp_path, kind):
    scaling = ({"type": "linear", "factor": 2.0} if kind == "linear-4.x"
               else SCALINGS.get(kind, {"rope_type": "ntk", "factor": FACTOR}))
    model = ours(scaling=scaling)
    save_model(model, tmp_path / "native")
    assert load_model(tmp_path / "native").args.rope_scaling == scaling
    with warnings.catch_warnings():
        warnings.simplefilter("error" if kind != "ntk" else "ignore")  # only ntk changes form in HF
        save_model(model, tmp_path / "hf", "hf")
    back = load_model(tmp_path / "hf").args
    assert back.max_seq_len == model.args.max_seq_len
    if kind == "ntk":  # HF has no ntk type: the scaled base is written as rope_theta
        assert back.rope_scaling is None and back.rope_theta == pytest.approx(10000.0 * FACTOR ** (16 / 14))
    else:
        expected = {k: v for k, v in scaling.items() if k != "type"}
        assert back.rope_scaling == {**expected, "rope_type": kind.removesuffix("-4.x")}


@pytest.mark.parametrize("seq_len", [None, LENGTH])
@pytest.mark.parametrize("kind", sorted(SCALINGS))
def test_a_parsed_spec_gives_transformers_rope_init(kind, seq_len):
    """rope.scaling_from_spec("TYPE:4", WINDOW), the one parser of `train --rope-scaling` and `eval --variants`,
    against transformers' own rope init function for that type (ROPE_INIT_FUNCTIONS) given the hand-written
    SCALINGS dict, on a model whose max_position_embeddings is the extended length FACTOR * WINDOW (dynamic: the
    window, which HF reads as the trained one). A parsed dict without the trained window, or with another, would
    not give HF's yarn and llama3 frequencies; dynamic is compared unscaled (seq_len None) and beyond the window."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from minillama.rope import rope_inv_freq, scaling_from_spec, yarn_attention_factor

    hf = dict(SCALINGS[kind])
    if kind == "dynamic":
        hf.pop("original_max_position_embeddings")
    args = CONFIGS["mha"]
    cfg = transformers.LlamaConfig(hidden_size=args["dim"], num_attention_heads=args["n_heads"],
                                   rope_theta=args["rope_theta"], rope_scaling=hf,
                                   max_position_embeddings=WINDOW if kind == "dynamic" else int(FACTOR * WINDOW))
    want, attention = ROPE_INIT_FUNCTIONS[kind](cfg, None, seq_len=seq_len)
    scaling = scaling_from_spec(f"{kind}:{FACTOR:g}", WINDOW)
    head_dim = args["dim"] // args["n_heads"]
    got = rope_inv_freq(head_dim, args["rope_theta"], scaling, seq_len=seq_len)
    torch.testing.assert_close(got, want, atol=0, rtol=1e-6)
    assert (yarn_attention_factor(scaling) if kind == "yarn" else 1.0) == pytest.approx(attention, rel=1e-12)
    if not (kind == "dynamic" and seq_len is None):  # the scaling moves these frequencies
        assert not torch.allclose(got, rope_inv_freq(head_dim, args["rope_theta"]))
