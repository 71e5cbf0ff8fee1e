"""Llama-3 end to end on CPU (issue 27): a small random Llama-3-shaped HF checkpoint (tied embeddings,
rope_theta 500000, `llama3` RoPE scaling, a byte-level BPE tokenizer.json with Meta's special tokens) is
fine-tuned by `minillama train` with QLoRA on the shipped Alpaca data in Llama-3's chat format; a killed run
resumes exactly; PEFT loads the adapter onto transformers' model with equal logits; `minillama generate --chat`
answers in the chat format and stops at <|eot_id|>. The checkpoint round-trips through the HF and Meta formats."""

import json
import shutil
from pathlib import Path

import pytest
import torch

# main() imports minillama.course.context_extension to build its parser, and that module takes `train` by name: imported
# first, as in test_qlora.py, so that the killed_at_batch fixture's stream is the one training uses.
import minillama.course.context_extension  # noqa: F401
from _llama3 import STRINGS, MetaTokenizer, build_llama3_tokenizer
from minillama import load_model, load_tokenizer, save_model
from minillama.cli.main import main
from minillama.lora import load_adapter
from minillama.rope import rope_inv_freq
from minillama.training.data import IGNORE_INDEX, read_alpaca, tokenize_sft

transformers = pytest.importorskip("transformers")
pytest.importorskip("tiktoken")
ALPACA = Path(__file__).resolve().parents[1] / "data" / "corpora" / "alpaca_data_200.json"
TIMING = ("tokens_per_s", "target_tokens_per_s", "mem_mib")


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """An HF folder as Llama-3.2's: config.json (tied embeddings), model.safetensors, tokenizer.json only."""
    root = tmp_path_factory.mktemp("llama3")
    info = build_llama3_tokenizer(root / "tok")
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 32}
    cfg = transformers.LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=info["vocab_size"], tie_word_embeddings=True, rope_theta=500000.0, rope_scaling=scaling,
        max_position_embeddings=256, rms_norm_eps=1e-5, bos_token_id=info["n_base"], eos_token_id=info["n_base"] + 1)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(cfg).save_pretrained(root / "base")
    shutil.copy(root / "tok" / "tokenizer.json", root / "base")
    return root / "base"


def train_argv(base, out, data=ALPACA, *extra):
    return ["train", "--model", str(base), "--data", str(data), "--out", str(out), "--batch-size", "2",
            "--max-len", "160", "--lora-r", "4", "--lora-alpha", "8", "--lora-targets", "all", "--seed", "1",
            "--device", "cpu", "--quiet", *extra]


def log_of(out):
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING}
            for line in (Path(out) / "log.jsonl").read_text().splitlines()]


def test_sft_examples_are_metas_chat_format_with_the_prompt_masked(base):
    tok, meta = load_tokenizer(base), MetaTokenizer(base.parent / "tok" / "tokenizer.model")
    ex = read_alpaca(ALPACA)[:3]
    out, _ = tokenize_sft(ex, tok, max_len=10_000)
    for e, (ids, labels) in zip(ex, out):
        user = e["instruction"] + (f"\n\n{e['input']}" if e["input"] else "")
        full = meta.encode_dialog_prompt([{"role": "user", "content": user}, {"role": "assistant", "content": e["output"]}])
        assert ids == full[:len(ids)] and ids[-1] == meta.special_tokens["<|eot_id|>"]  # up to the answer's end of turn
        n_prompt = len(meta.encode_dialog_prompt([{"role": "user", "content": user}]))
        assert labels[:n_prompt] == [IGNORE_INDEX] * n_prompt and labels[n_prompt:] == ids[n_prompt:]


def test_qlora_run_resumes_exactly_and_peft_reproduces_its_logits(base, tmp_path, killed_at_batch):
    extra = ("--load-in-4bit", "--steps", "4", "--lr", "3e-3", "--save-every", "2")
    assert main(train_argv(base, tmp_path / "full", ALPACA, *extra)) == 0
    killed_at_batch(2)  # killed while fetching the batch of step 3: the last save was step 2
    with pytest.raises(KeyboardInterrupt):
        main(train_argv(base, tmp_path / "run", ALPACA, *extra))
    killed_at_batch.restore()
    assert main(train_argv(base, tmp_path / "run", ALPACA, *extra, "--resume")) == 0
    assert log_of(tmp_path / "run") == log_of(tmp_path / "full")  # exact on CPU
    adapter = tmp_path / "run" / "checkpoint" / "adapter"

    # minillama: the 4-bit base as training saw it (nf4, blocksize 64) with the adapter
    ours = load_model(base, load_in_4bit=True)
    load_adapter(ours, adapter)
    tokens = torch.randint(0, ours.args.vocab_size, (1, 48), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        logits = ours.eval()(tokens)
    # transformers + PEFT on the same base weights: the 4-bit weights dequantised into the HF checkpoint
    plain = load_model(base)
    weights = {name.replace(".base", "") + ".weight": m.dequantized_weight().float()
               for name, m in ours.named_modules() if hasattr(m, "dequantized_weight")}
    assert len(weights) == 2 * 7
    plain.load_state_dict(weights, strict=False)
    save_model(plain, tmp_path / "dequantized", "hf")
    peft = pytest.importorskip("peft")
    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "dequantized", dtype=torch.float32)
    hf = peft.PeftModel.from_pretrained(hf, adapter).eval()
    with torch.no_grad():
        torch.testing.assert_close(hf(tokens).logits, logits, atol=1e-4, rtol=0)


def test_generate_chat_answers_and_stops_at_eot(base, tmp_path, capsys):
    """A LoRA run that learns one answer by heart (the full-precision base, as `generate` loads it); the chat
    prompt then yields that answer, ended by <|eot_id|>."""
    data = tmp_path / "one.json"
    data.write_text(json.dumps([{"instruction": "Say hi to Lily.", "input": "", "output": "Hi Lily!"}] * 4))
    assert main(train_argv(base, tmp_path / "run", data, "--steps", "40", "--lr", "1e-2", "--warmup-steps", "1",
                           "--lora-r", "8")) == 0
    capsys.readouterr()
    argv = ["generate", "--model", str(base), "--adapter", str(tmp_path / "run" / "checkpoint" / "adapter"),
            "--chat", "--prompt", "Say hi to Lily.", "--max-new-tokens", "20", "--device", "cpu"]
    assert main(argv) == 0
    assert capsys.readouterr().out == "Hi Lily!\n"  # not followed by the 20 - 3 tokens it was allowed


def test_a_tied_llama3_checkpoint_round_trips_through_hf_and_meta_with_its_tokenizer(base, tmp_path):
    hf = transformers.LlamaForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    tokens = torch.randint(0, hf.config.vocab_size, (1, 40), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        reference = hf(tokens).logits
    model, tok = load_model(base), load_tokenizer(base)
    assert torch.equal(model.output.weight, model.tok_embeddings.weight)  # the tied head, read from the embedding
    assert (model.args.rope_theta, model.args.rope_scaling["rope_type"]) == (500000.0, "llama3")
    save_model(model, tmp_path / "hf", "hf", tokenizer=tok)
    with pytest.warns(UserWarning, match="rope"):  # Meta's params.json cannot hold the scaling: minillama.json does
        save_model(model, tmp_path / "meta", "meta", tokenizer=tok)
    assert json.loads((tmp_path / "meta" / "params.json").read_text())["vocab_size"] == hf.config.vocab_size
    for fmt in ("hf", "meta"):
        back = load_model(tmp_path / fmt).eval()
        with torch.no_grad():
            torch.testing.assert_close(back(tokens), reference, atol=1e-5, rtol=0)
        again = load_tokenizer(tmp_path / fmt, vocab_size=back.args.vocab_size)
        assert again.path.name == {"hf": "tokenizer.json", "meta": "tokenizer.model"}[fmt]
        assert all(again.encode(s) == tok.encode(s) for s in STRINGS)
    exported = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(exported(tokens).logits, reference, atol=1e-5, rtol=0)
    auto = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert auto("Say hi to Lily.")["input_ids"] == tok.encode("Say hi to Lily.")


def test_a_meta_llama31_folder_with_use_scaled_rope_loads_with_hf_llama3_scaling(tmp_path):
    """Meta's params.json says `"use_scaled_rope": true` (Llama-3.1/3.2), HF's config.json says rope_type "llama3"
    with factor 8 over 8,192 positions: the same frequencies, so the same logits as transformers."""
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2,
                                   num_key_value_heads=1, vocab_size=300, rope_theta=500000.0, rope_scaling=dict(scaling),
                                   max_position_embeddings=131072, rms_norm_eps=1e-5)
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(cfg).eval()
    hf.save_pretrained(tmp_path / "hf")
    tokens = torch.randint(0, 300, (1, 64), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        reference = hf(tokens).logits
    with pytest.warns(UserWarning, match="rope_theta"):
        save_model(load_model(tmp_path / "hf", max_seq_len=256), tmp_path / "meta", "meta")
    params = json.loads((tmp_path / "meta" / "params.json").read_text())
    assert params["use_scaled_rope"] is True and "rope_scaling_factor" not in params  # Meta's default factor 8
    (tmp_path / "meta" / "minillama.json").unlink()  # as Meta ships it: params.json alone
    meta = load_model(tmp_path / "meta").eval()
    assert meta.args.rope_scaling == scaling
    with torch.no_grad():
        torch.testing.assert_close(meta(tokens), reference, atol=1e-5, rtol=0)
    # the frequencies themselves (a small random model's logits hardly depend on them at 64 positions)
    hf_inv_freq = hf.model.rotary_emb.inv_freq
    a = meta.args
    torch.testing.assert_close(rope_inv_freq(a.head_dim, a.rope_theta, a.rope_scaling), hf_inv_freq)
    assert not torch.allclose(rope_inv_freq(a.head_dim, a.rope_theta, None), hf_inv_freq)
