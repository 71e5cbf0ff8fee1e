"""Checkpoints: round trips in the three formats, Meta checked against HF by an independent
conversion written here, atomic saving, dtypes, and one clear error per bad input."""

import json
import os
import re

import pytest
import torch
from conftest import HF_CONFIGS, make_hf_model
from safetensors.torch import load_file, save_file

import minillama.checkpoints.weights as ckpt
from minillama import create_model, get_preset, load_model, save_model

ATOL = 1e-5  # fp32 logits


def tokens_for(vocab, b=2, t=24, seed=0):
    return torch.randint(0, vocab, (b, t), generator=torch.Generator().manual_seed(seed))


def assert_same_state(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype, k
        assert torch.equal(sa[k], sb[k]), k


def leftovers(parent, name):
    """Temporary or backup directories that save_model might leave beside `name`."""
    return [p.name for p in parent.iterdir() if p.name.startswith((f".{name}.tmp-", f".{name}.old-"))]


@pytest.fixture
def small_model():
    """A random minillama model small enough to split into 2 Meta shards (all split dims even)."""
    args = get_preset("tiny").replace(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=128,
                                      multiple_of=16, max_seq_len=64)
    return create_model(args, seed=3)


# ---- round trips ---------------------------------------------------------------------------------
def test_native_round_trip_is_bit_identical(hf_dir, tmp_path):
    model = load_model(hf_dir)
    save_model(model, tmp_path / "native", format="native")
    assert json.loads((tmp_path / "native" / "config.json").read_text())["format"] == "minillama"
    again = load_model(tmp_path / "native")
    assert_same_state(model, again)
    assert again.args.ffn_hidden_dim == model.args.ffn_hidden_dim


def test_hf_round_trip_and_transformers_reads_it(hf_model, hf_dir, tmp_path):
    transformers = pytest.importorskip("transformers")
    model = load_model(hf_dir)
    out = save_model(model, tmp_path / "hf_out", format="hf")
    assert_same_state(model, load_model(out))
    ref = transformers.LlamaForCausalLM.from_pretrained(out).float().eval()
    x = tokens_for(hf_model.config.vocab_size)
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref(x).logits, atol=ATOL, rtol=0)


def test_hf_sharded_round_trip(tmp_path):
    transformers = pytest.importorskip("transformers")
    model = load_model_from_hf("gqa", tmp_path)
    out = save_model(model, tmp_path / "sharded", format="hf", max_shard_bytes=200_000)
    files = sorted(p.name for p in out.glob("*.safetensors"))
    assert len(files) >= 3, files
    m = len(files)
    assert files == [f"model-{i:05d}-of-{m:05d}.safetensors" for i in range(1, m + 1)]
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(files)
    assert len(index["weight_map"]) == len(model.state_dict())
    total = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    assert index["metadata"]["total_size"] == total
    assert_same_state(model, load_model(out))
    ref = transformers.LlamaForCausalLM.from_pretrained(out).float().eval()
    x = tokens_for(model.args.vocab_size)
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref(x).logits, atol=ATOL, rtol=0)


def test_meta_two_shards_round_trip(hf_dir, tmp_path):
    model = load_model(hf_dir)
    out = save_model(model, tmp_path / "meta", format="meta", num_shards=2)
    assert sorted(p.name for p in out.glob("*.pth")) == ["consolidated.00.pth", "consolidated.01.pth"]
    shard0 = torch.load(out / "consolidated.00.pth", weights_only=True)
    full = model.state_dict()
    assert shard0["layers.0.attention.wq.weight"].shape[0] == full["layers.0.attention.wq.weight"].shape[0] // 2
    assert shard0["layers.0.attention.wo.weight"].shape[1] == full["layers.0.attention.wo.weight"].shape[1] // 2
    assert shard0["norm.weight"].shape == full["norm.weight"].shape
    assert_same_state(model, load_model(out))


def load_model_from_hf(name, tmp_path):
    d = tmp_path / f"hf_{name}"
    make_hf_model(name).save_pretrained(d)
    return load_model(d)


def test_meta_shards_are_joined_in_numeric_order(tmp_path):
    """Unpadded names (consolidated.0.pth ... consolidated.10.pth) sort wrongly as text (10 before 2);
    the shards must still be joined in rank order. 11 shards: every split dim is a multiple of 11."""
    args = get_preset("tiny").replace(dim=88, n_layers=1, n_heads=4, n_kv_heads=4, vocab_size=121,
                                      hidden_dim=176, max_seq_len=32)
    model = create_model(args, seed=6)
    d = save_model(model, tmp_path / "meta", format="meta", num_shards=11)
    for i in range(11):
        (d / f"consolidated.{i:02d}.pth").rename(d / f"consolidated.{i}.pth")
    assert_same_state(model, load_model(d))


def test_meta_duplicate_shard_numbers(meta_dir):
    (meta_dir / "consolidated.1.pth").write_bytes((meta_dir / "consolidated.01.pth").read_bytes())
    with pytest.raises(ValueError, match=r"consolidated\.01\.pth and consolidated\.1\.pth .*same rank 1"):
        load_model(meta_dir)


# ---- Meta format against HF, through a conversion written independently here -----------------------
HF_TO_META = {
    "model.embed_tokens.weight": "tok_embeddings.weight", "model.norm.weight": "norm.weight",
    "lm_head.weight": "output.weight",
}
HF_TO_META_LAYER = {
    "self_attn.q_proj": "attention.wq", "self_attn.k_proj": "attention.wk", "self_attn.v_proj": "attention.wv",
    "self_attn.o_proj": "attention.wo", "mlp.gate_proj": "feed_forward.w1", "mlp.down_proj": "feed_forward.w2",
    "mlp.up_proj": "feed_forward.w3", "input_layernorm": "attention_norm",
    "post_attention_layernorm": "ffn_norm",
}
# Meta's model-parallel split: column-parallel on dim 0, row-parallel (and the embedding) on dim 1.
META_SPLIT = {"wq": 0, "wk": 0, "wv": 0, "w1": 0, "w3": 0, "output": 0, "wo": 1, "w2": 1, "tok_embeddings": 1}


def unpermute(w, n_heads):
    """HF (rotate halves) -> Meta (interleaved pairs) row order of a q/k projection."""
    out, inp = w.shape
    return w.view(n_heads, 2, out // n_heads // 2, inp).transpose(1, 2).reshape(out, inp)


def hf_state_to_meta(sd, n_heads, n_kv_heads):
    meta = {}
    for name, t in sd.items():
        if name in HF_TO_META:
            meta[HF_TO_META[name]] = t.clone()
            continue
        m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)\.weight", name)
        assert m, name
        new = HF_TO_META_LAYER[m.group(2)]
        if new == "attention.wq":
            t = unpermute(t, n_heads)
        elif new == "attention.wk":
            t = unpermute(t, n_kv_heads)
        meta[f"layers.{m.group(1)}.{new}.weight"] = t.clone()
    return meta


def meta_ffn_width(dim, multiple_of):
    hidden = int(2 * 4 * dim / 3)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


def write_meta_checkpoint(hf, d, num_shards=2):
    """Write `hf` (a LlamaForCausalLM) as Meta would: params.json + consolidated.NN.pth shards."""
    cfg = hf.config
    meta = hf_state_to_meta(hf.state_dict(), cfg.num_attention_heads, cfg.num_key_value_heads)
    d.mkdir(parents=True)
    for rank in range(num_shards):
        shard = {}
        for name, t in meta.items():
            dim = META_SPLIT.get(name.split(".")[-2])
            shard[name] = t if dim is None else t.chunk(num_shards, dim=dim)[rank].clone()
        torch.save(shard, d / f"consolidated.{rank:02d}.pth")
    # Meta's params.json has no explicit FFN width: pick the multiple_of that makes Meta's rule give
    # HF's intermediate_size (172 from dim 64 needs 4; 256 from dim 96 needs 256), so no hidden_dim.
    multiple_of = {64: 4, 96: 256}[cfg.hidden_size]
    assert meta_ffn_width(cfg.hidden_size, multiple_of) == cfg.intermediate_size
    theta = (getattr(cfg, "rope_parameters", None) or {}).get("rope_theta") or getattr(cfg, "rope_theta", None)
    params = {"dim": cfg.hidden_size, "n_layers": cfg.num_hidden_layers, "n_heads": cfg.num_attention_heads,
              "n_kv_heads": cfg.num_key_value_heads, "vocab_size": -1, "multiple_of": multiple_of,
              "ffn_dim_multiplier": None, "norm_eps": cfg.rms_norm_eps, "rope_theta": theta}
    (d / "params.json").write_text(json.dumps(params))
    return d


@pytest.mark.parametrize("name", sorted(HF_CONFIGS))
def test_meta_checkpoint_gives_hf_logits(name, tmp_path):
    hf = make_hf_model(name, seed=1)
    d = write_meta_checkpoint(hf, tmp_path / "meta")
    model = load_model(d)
    assert model.args.vocab_size == hf.config.vocab_size  # -1 resolved from the embedding
    assert model.args.hidden_dim is None and model.args.ffn_hidden_dim == hf.config.intermediate_size
    x = tokens_for(hf.config.vocab_size, t=32)
    with torch.no_grad():
        torch.testing.assert_close(model(x), hf(x).logits, atol=ATOL, rtol=0)


def test_meta_params_with_hidden_dim_and_rope_freqs(tmp_path):
    """A width Meta's rule cannot reach with this multiple_of needs our `hidden_dim` key; Meta's stored
    `rope.freqs` is ignored (recomputed)."""
    hf = make_hf_model("mha", seed=2)
    d = write_meta_checkpoint(hf, tmp_path / "meta")
    params = json.loads((d / "params.json").read_text())
    params.update(multiple_of=256, hidden_dim=172)
    (d / "params.json").write_text(json.dumps(params))
    for f in d.glob("*.pth"):
        shard = torch.load(f, weights_only=True)
        shard["rope.freqs"] = torch.ones(8)
        torch.save(shard, f)
    model = load_model(d)
    x = tokens_for(hf.config.vocab_size)
    with torch.no_grad():
        torch.testing.assert_close(model(x), hf(x).logits, atol=ATOL, rtol=0)


# ---- atomic save ---------------------------------------------------------------------------------
def test_save_replaces_existing_checkpoint(small_model, tmp_path):
    d = tmp_path / "ckpt"
    save_model(small_model, d)
    other = create_model(small_model.args, seed=4)
    save_model(other, d, format="hf")
    assert not (d / "model.safetensors.index.json").exists()
    assert json.loads((d / "config.json").read_text())["model_type"] == "llama"
    assert_same_state(other, load_model(d))
    assert leftovers(tmp_path, "ckpt") == []


def test_saved_directory_has_normal_permissions(small_model, tmp_path):
    """The checkpoint directory gets the mode of a plain mkdir (umask), not a private temp dir's 0700."""
    plain = tmp_path / "plain"
    plain.mkdir()
    out = save_model(small_model, tmp_path / "ckpt")
    assert out.stat().st_mode & 0o777 == plain.stat().st_mode & 0o777


@pytest.mark.parametrize("fmt, kwargs", [("native", {}), ("hf", {}), ("hf", {"max_shard_bytes": 30_000})])
def test_failed_save_keeps_previous_checkpoint(small_model, tmp_path, monkeypatch, fmt, kwargs):
    d = tmp_path / "ckpt"
    save_model(small_model, d)
    calls = []
    real_save_file = ckpt.save_file

    def failing_save_file(tensors, filename, metadata=None):  # sharded: the 2nd file fails; else the 1st
        calls.append(filename)
        if len(calls) == 1 and kwargs:
            return real_save_file(tensors, filename, metadata=metadata)
        raise OSError("No space left on device (simulated)")

    monkeypatch.setattr(ckpt, "save_file", failing_save_file)
    with pytest.raises(OSError, match="simulated"):
        save_model(create_model(small_model.args, seed=5), d, format=fmt, **kwargs)
    assert calls
    monkeypatch.undo()
    assert_same_state(small_model, load_model(d))
    assert sorted(p.name for p in d.iterdir()) == ["config.json", "model.safetensors"]
    assert leftovers(tmp_path, "ckpt") == []


def test_failed_meta_save_keeps_previous_checkpoint(small_model, tmp_path, monkeypatch):
    d = tmp_path / "ckpt"
    save_model(small_model, d, format="meta", num_shards=2)
    real_save = torch.save

    def failing_save(obj, f, *args, **kwargs):
        if str(f).endswith("consolidated.01.pth"):
            raise OSError("No space left on device (simulated)")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(OSError, match="simulated"):
        save_model(create_model(small_model.args, seed=5), d, format="meta", num_shards=2)
    monkeypatch.undo()
    assert_same_state(small_model, load_model(d))
    assert leftovers(tmp_path, "ckpt") == []


def test_failed_final_rename_restores_previous_checkpoint(small_model, tmp_path, monkeypatch):
    """If moving the new directory into place fails, the old one (already moved aside) goes back."""
    d = tmp_path / "ckpt"
    save_model(small_model, d)
    real_replace = os.replace
    calls = []

    def failing_replace(src, dst):
        calls.append((src, dst))
        if len(calls) == 2:  # 1st: old -> backup; 2nd: new -> final name
            raise OSError("rename failed (simulated)")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError, match="simulated"):
        save_model(create_model(small_model.args, seed=5), d)
    monkeypatch.undo()
    assert len(calls) >= 2
    assert_same_state(small_model, load_model(d))
    assert leftovers(tmp_path, "ckpt") == []


# ---- dtype -----------------------------------------------------------------------------------------
def test_load_in_bf16(small_model, tmp_path):
    d = save_model(small_model, tmp_path / "ckpt")
    model = load_model(d, dtype="bf16")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    # cast once from the fp32 file: exactly the bf16 rounding of the saved weights
    for k, t in small_model.state_dict().items():
        assert torch.equal(model.state_dict()[k], t.to(torch.bfloat16)), k
    assert {p.dtype for p in load_model(d, dtype=torch.float16).parameters()} == {torch.float16}


@pytest.mark.parametrize("bad", ["fp8", "float64x", "nonsense"])
def test_unknown_dtype_is_refused(small_model, tmp_path, bad):
    d = save_model(small_model, tmp_path / "ckpt")
    with pytest.raises(ValueError, match=f"dtype '{bad}' is unknown"):
        load_model(d, dtype=bad)


# ---- bad input: one exception, one sentence naming the culprit ------------------------------------
class NotATensor:
    """Pickling this needs code from this test module: weights_only=True must refuse it."""

    def __init__(self):
        self.payload = [1, 2, 3]


def test_missing_path(tmp_path):
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "nowhere"))):
        load_model(tmp_path / "nowhere")


def test_empty_directory(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=re.escape(str(tmp_path / "empty")) + " holds no known checkpoint"):
        load_model(tmp_path / "empty")


def test_file_instead_of_directory(small_model, tmp_path):
    d = save_model(small_model, tmp_path / "ckpt")
    with pytest.raises(ValueError, match=re.escape(str(d / "model.safetensors")) + " is a file"):
        load_model(d / "model.safetensors")


@pytest.fixture
def meta_dir(small_model, tmp_path):
    return save_model(small_model, tmp_path / "meta", format="meta", num_shards=2)


def test_missing_meta_shard(meta_dir):
    (meta_dir / "consolidated.01.pth").rename(meta_dir / "consolidated.02.pth")
    with pytest.raises(FileNotFoundError, match=r"consolidated\.01\.pth is missing"):
        load_model(meta_dir)


def test_meta_shards_with_different_replicated_norm(meta_dir):
    f = meta_dir / "consolidated.01.pth"
    shard = torch.load(f, weights_only=True)
    shard["layers.1.ffn_norm.weight"] = shard["layers.1.ffn_norm.weight"] + 1e-3
    torch.save(shard, f)
    with pytest.raises(ValueError, match=r"'layers\.1\.ffn_norm\.weight' differs between consolidated\.00\.pth "
                                         r"and consolidated\.01\.pth"):
        load_model(meta_dir)


def test_meta_key_in_one_shard_only(meta_dir):
    f = meta_dir / "consolidated.01.pth"
    shard = torch.load(f, weights_only=True)
    del shard["layers.0.feed_forward.w3.weight"]
    torch.save(shard, f)
    with pytest.raises(ValueError, match=r"'layers\.0\.feed_forward\.w3\.weight' is in only one of"):
        load_model(meta_dir)


def test_shape_disagrees_with_params_json(meta_dir):
    params = json.loads((meta_dir / "params.json").read_text())
    params["n_kv_heads"] = 1  # saved with 2 kv heads of 16 -> wk is [32, 64]; params.json now implies [16, 64]
    (meta_dir / "params.json").write_text(json.dumps(params))
    with pytest.raises(ValueError, match=r"'layers\.0\.attention\.wk\.weight' has shape \[32, 64\] but "
                                         r"params\.json implies \[16, 64\]"):
        load_model(meta_dir)


def test_shape_disagrees_with_hf_config(tmp_path):
    d = tmp_path / "hf"
    make_hf_model("mha").save_pretrained(d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["intermediate_size"] = 176
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"'layers\.0\.feed_forward\.w1\.weight' has shape \[172, 64\] but "
                                         r"config\.json implies \[176, 64\]"):
        load_model(d)


def test_pth_needing_custom_unpickler_is_refused(meta_dir):
    torch.save({"tok_embeddings.weight": NotATensor()}, meta_dir / "consolidated.00.pth")
    with pytest.raises(ValueError, match=r"consolidated\.00\.pth needs arbitrary code .*weights_only=True\) refuses"):
        load_model(meta_dir)


def test_hf_config_of_another_model_type(hf_dir):
    cfg = json.loads((hf_dir / "config.json").read_text())
    cfg["model_type"] = "mistral"
    (hf_dir / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"config\.json has model_type 'mistral'"):
        load_model(hf_dir)


@pytest.mark.parametrize("fmt", ["native", "hf"])
def test_truncated_safetensors(small_model, tmp_path, fmt):
    d = save_model(small_model, tmp_path / "ckpt", format=fmt)
    f = d / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=re.escape(str(f)) + r" is not a readable safetensors file"):
        load_model(d)


def test_garbage_safetensors(small_model, tmp_path):
    d = save_model(small_model, tmp_path / "ckpt")
    f = d / "model.safetensors"
    f.write_bytes(bytes(range(256)) * 4)
    with pytest.raises(ValueError, match=re.escape(str(f)) + r" is not a readable safetensors file"):
        load_model(d)


def test_hf_index_names_missing_shard(small_model, tmp_path):
    d = save_model(small_model, tmp_path / "ckpt", format="hf", max_shard_bytes=30_000)
    shards = sorted(d.glob("model-*.safetensors"))
    assert len(shards) >= 2
    shards[1].unlink()
    with pytest.raises(FileNotFoundError, match=re.escape(shards[1].name) + " is missing"):
        load_model(d)


def test_native_extra_key(small_model, tmp_path):
    d = save_model(small_model, tmp_path / "ckpt")
    sd = load_file(d / "model.safetensors")
    sd["layers.0.attention.wq.bias"] = torch.zeros(64)
    save_file(sd, d / "model.safetensors")
    with pytest.raises(ValueError, match=r"'layers\.0\.attention\.wq\.bias' is not part of a model"):
        load_model(d)


def test_hf_unknown_key(hf_dir):
    f = hf_dir / "model.safetensors"
    sd = load_file(f)
    sd["model.vision_tower.weight"] = torch.zeros(3)
    save_file(sd, f, metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"'model\.vision_tower\.weight' is not part of a LLaMA model"):
        load_model(hf_dir)


@pytest.mark.parametrize("fmt", ["native", "meta"])
def test_missing_key(small_model, tmp_path, fmt):
    d = save_model(small_model, tmp_path / "ckpt", format=fmt)
    if fmt == "native":
        sd = load_file(d / "model.safetensors")
        del sd["norm.weight"]
        save_file(sd, d / "model.safetensors")
    else:
        for f in d.glob("consolidated.*.pth"):  # from every shard, or they would disagree first
            shard = torch.load(f, weights_only=True)
            del shard["norm.weight"]
            torch.save(shard, f)
    with pytest.raises(ValueError, match=r"'norm\.weight' is missing from the checkpoint"):
        load_model(d)


def test_save_unknown_format(small_model, tmp_path):
    with pytest.raises(ValueError, match=r"format 'onnx' is unknown"):
        save_model(small_model, tmp_path / "ckpt", format="onnx")
    assert list(tmp_path.iterdir()) == []


def test_save_over_a_file(small_model, tmp_path):
    f = tmp_path / "ckpt"
    f.write_text("not a directory")
    with pytest.raises(ValueError, match=re.escape(str(f)) + ": it is an existing file"):
        save_model(small_model, f)
    assert f.read_text() == "not a directory"


@pytest.mark.parametrize("fmt", ["native", "hf", "meta"])
def test_rope_scaling_survives_every_format(tmp_path, fmt):
    args = get_preset("tiny").replace(n_layers=1, rope_scaling={"type": "linear", "factor": 2.0})
    model = create_model(args, seed=0)
    back = load_model(save_model(model, tmp_path / fmt, format=fmt))
    assert back.args.rope_scaling["factor"] == 2.0
    x = torch.randint(0, args.vocab_size, (1, 16))
    with torch.no_grad():
        torch.testing.assert_close(back(x), model(x), atol=1e-5, rtol=0)
