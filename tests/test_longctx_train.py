"""Long-context LoRA (issue 14): the TYPE:FACTOR flag, a short LoRA run at 4x the trained window, the PEFT +
transformers round trip of an adapter trained with a RoPE scaling, and the sweep on a micro budget."""

import json
import shutil

import pytest
import torch

from minillama import ModelArgs, create_model, load_model, save_model
from minillama.course.paths import corpora_dir, tiny_model_dir
from minillama.lora import apply_lora, load_adapter
from minillama.rope import scaling_from_spec
from minillama.training import TrainConfig, evaluate_loss, extend_context, save_run_adapter, train

SMALL = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=256, multiple_of=16, max_seq_len=32)


def test_the_flag_gives_hf_style_dicts_with_the_checkpoints_window():
    assert scaling_from_spec("linear:4", 256) == {"rope_type": "linear", "factor": 4.0}
    assert scaling_from_spec("NTK:2.5", 256) == {"rope_type": "ntk", "factor": 2.5}
    for kind in ("yarn", "dynamic", "llama3"):
        assert scaling_from_spec(f"{kind}:4", 256) == {"rope_type": kind, "factor": 4.0,
                                                       "original_max_position_embeddings": 256}
    assert scaling_from_spec("none", 256) is None


needs_tiny = pytest.mark.skipif(not (tiny_model_dir() / "tokenizer.model").exists(), reason="data/tiny is missing")


@needs_tiny
def test_a_short_lora_run_at_1024_lowers_the_loss_of_the_tiny_model(tmp_path):
    from minillama import load_tokenizer
    from minillama.course.context_extension import eval_docs, long_training_docs
    from minillama.training.data import pack_documents

    torch.set_num_threads(2)
    tok = load_tokenizer(tiny_model_dir())
    model = load_model(tiny_model_dir())  # trained at 256 tokens
    cfg = TrainConfig(steps=4, batch_size=2, lr=5e-3, warmup_steps=1, lora_r=8, max_seq_len=1024,
                      rope_scaling={"rope_type": "linear", "factor": 4.0}, train_norms=True, eval_every=4,
                      save_every=4, seed=0)
    rows = pack_documents(long_training_docs(tok, 8, 1024, seed=0, passkey_share=0.0), 1024)
    held_out = pack_documents([d[:1025] for d in eval_docs(tok, corpora_dir(), 1024, 2)], 1024)
    extend_context(model, cfg.rope_scaling, cfg.max_seq_len)
    before = evaluate_loss(model, *held_out)
    train(model, rows, {}, cfg, tmp_path / "run", progress=False)
    after = evaluate_loss(model, *held_out)
    assert after < before - 0.05, (before, after)
    ckpt = tmp_path / "run" / "checkpoint"
    state = torch.load(ckpt / "train_state.pt", weights_only=True)
    assert state["config"]["rope_scaling"] == {"rope_type": "linear", "factor": 4.0}
    assert state["config"]["max_seq_len"] == 1024
    rope = json.loads((ckpt / "adapter" / "rope_config.json").read_text())
    assert rope["minillama"] == {"rope_scaling": {"rope_type": "linear", "factor": 4.0}, "max_seq_len": 1024}
    assert rope["hf_config"]["rope_scaling"] == {"rope_type": "linear", "factor": 4.0}
    assert json.loads((ckpt / "adapter" / "adapter_config.json").read_text())["modules_to_save"] == [
        "input_layernorm", "norm", "post_attention_layernorm"]


@pytest.mark.parametrize("spec,targets,extras", [("linear:4", ("wq", "wv"), False), ("yarn:4", "all", True)])
def test_peft_and_transformers_reproduce_the_logits_of_a_scaled_adapter(tmp_path, spec, targets, extras):
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    model = create_model(SMALL, seed=0)
    save_model(model, tmp_path / "base", "hf")  # the unscaled base, as the user has it
    extend_context(model, scaling_from_spec(spec, SMALL.max_seq_len), 4 * SMALL.max_seq_len)
    apply_lora(model, r=4, alpha=8, targets=targets)
    torch.manual_seed(1)
    with torch.no_grad():  # a trained-looking adapter (B is zero at init) and changed embeddings / norms
        for n, p in model.named_parameters():
            if ".lora_B." in n or (extras and (n.startswith("tok_embeddings") or "norm." in n)):
                p.add_(0.1 * torch.randn_like(p))
                p.requires_grad_(True)
    save_run_adapter(model, tmp_path / "adapter")
    tokens = torch.randint(3, SMALL.vocab_size, (1, 120), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ours = model.eval()(tokens)

    # transformers + PEFT: the base's config.json with the adapter's recorded position settings
    hf_dir = tmp_path / "hf-scaled"
    shutil.copytree(tmp_path / "base", hf_dir)
    cfg = json.loads((hf_dir / "config.json").read_text())
    cfg.update(json.loads((tmp_path / "adapter" / "rope_config.json").read_text())["hf_config"])
    (hf_dir / "config.json").write_text(json.dumps(cfg))
    hf = transformers.LlamaForCausalLM.from_pretrained(hf_dir, torch_dtype=torch.float32)
    hf = peft.PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()
    with torch.no_grad():
        theirs = hf(tokens).logits
    torch.testing.assert_close(theirs, ours, atol=1e-4, rtol=0)

    # and back into minillama: the scaled base + load_adapter
    scaling = json.loads((tmp_path / "adapter" / "rope_config.json").read_text())["minillama"]
    back = load_model(tmp_path / "base", **scaling)
    load_adapter(back, tmp_path / "adapter")
    with torch.no_grad():
        torch.testing.assert_close(back(tokens), ours, atol=1e-5, rtol=0)


@needs_tiny
def test_the_sweep_on_a_micro_budget_writes_every_field_the_same_twice(tmp_path):
    from minillama.course.context_extension import SweepConfig, run_sweep

    model_dir = tmp_path / "micro"  # a random model with the shipped tokenizer and a window of 32 tokens
    args = ModelArgs(dim=32, n_layers=1, n_heads=2, n_kv_heads=1, vocab_size=2048, multiple_of=16, max_seq_len=32)
    save_model(create_model(args, seed=0), model_dir)
    shutil.copy(tiny_model_dir() / "tokenizer.model", model_dir / "tokenizer.model")
    cfg = SweepConfig(steps=1, batch_size=1, rank=2, warmup_steps=1, contexts=(16, 32, 64, 128), ppl_docs=1,
                      passkey_trials=1, phrases_trials=1, threads=1)
    variants = ("base", "yarn-x4", "yarn+qlora", "linear+lora", "linear+lora+emb-norms")
    res = run_sweep(tmp_path / "a", cfg, variants, model_path=model_dir, corpora=corpora_dir(), command="test")
    meta = json.loads((tmp_path / "a" / "results.json").read_text())["meta"]
    assert {"device", "torch", "date", "wall_s", "cpu_s", "steps", "command", "context", "sweep"} <= set(meta)
    assert meta["context"] == 128 and meta["steps"] == 1
    assert list(res["variants"]) == list(variants)
    for name, v in res["variants"].items():
        assert {"rope_scaling", "targets", "finetuned", "ppl", "passkey"} <= set(v), name
        assert list(v["ppl"]) == ["16", "32", "64", "128"] and all(x > 1 for x in v["ppl"].values())
        assert list(v["passkey"]["128"]) == ["0.0", "0.25", "0.5", "0.75", "1.0"]
        assert v["finetuned"] == (tmp_path / "a" / "adapters" / name / "adapter_config.json").exists()
    assert res["variants"]["yarn-x4"]["rope_scaling"] == {"rope_type": "yarn", "factor": 4.0,
                                                          "original_max_position_embeddings": 32}
    assert "ppl @ 128" in (tmp_path / "a" / "README.md").read_text()
    assert "| yarn+qlora | yarn x4 | wq,wv (NF4 base) |" in (tmp_path / "a" / "README.md").read_text()
    assert [v["base_4bit"] for v in res["variants"].values()] == [None, None, "nf4, double quantisation", None, None]
    csv_lines = (tmp_path / "a" / "results.csv").read_text().splitlines()
    assert len(csv_lines) == 1 + len(variants)
    assert csv_lines[0].startswith("variant,rope_scaling,targets,finetuned,base_4bit,ppl_16")
    # deterministic: a second run (two variants at once, in worker processes) writes the same adapters
    run_sweep(tmp_path / "b", cfg, variants[3:], model_path=model_dir, corpora=corpora_dir(), command="test", jobs=2)
    for f in ("adapter_model.safetensors", "adapter_config.json", "rope_config.json"):
        assert (tmp_path / "a/adapters/linear+lora" / f).read_bytes() == (tmp_path / "b/adapters/linear+lora" / f).read_bytes()
