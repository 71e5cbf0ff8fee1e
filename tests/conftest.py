"""Shared fixtures: small random HF LLaMA models (the reference) and a small sentencepiece tokenizer."""

import io
import random

import pytest
import torch

# Random configs: plain multi-head attention, grouped-query attention, and an FFN width that breaks
# Meta's rounding rule (HF's intermediate_size is free).
HF_CONFIGS = {
    "mha": dict(hidden_size=64, intermediate_size=172, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=4, vocab_size=256, rms_norm_eps=1e-5, max_position_embeddings=128),
    "gqa": dict(hidden_size=96, intermediate_size=256, num_hidden_layers=3, num_attention_heads=6,
                num_key_value_heads=2, vocab_size=300, rms_norm_eps=1e-6, rope_theta=500000.0,
                max_position_embeddings=96),
}


def make_hf_model(name, seed=0, **overrides):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(**{**HF_CONFIGS[name], **overrides})
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(cfg).eval()
    # HF initialises norms to one; randomise them so that a wrongly mapped norm cannot go unnoticed
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "norm" in n:
                p.uniform_(0.5, 1.5)
    return model


@pytest.fixture(params=sorted(HF_CONFIGS))
def hf_model(request):
    return make_hf_model(request.param)


@pytest.fixture
def hf_dir(hf_model, tmp_path):
    d = tmp_path / "hf"
    hf_model.save_pretrained(d)
    return d


def _sentences(n, seed=0):
    rng = random.Random(seed)
    names = ["Lily", "Tom", "Max", "Anna", "Ben", "Zoe"]
    things = ["a red ball", "the blue door", "her cat", "a big tree", "the old boat", "37 apples"]
    verbs = ["saw", "found", "liked", "painted", "carried", "lost"]
    return [f"{rng.choice(names)} {rng.choice(verbs)} {rng.choice(things)} near the river." for _ in range(n)]


@pytest.fixture(scope="session")
def spm_path(tmp_path_factory):
    """A Llama-like sentencepiece model: BPE, byte fallback, BOS=1, EOS=2, no pad."""
    spm = pytest.importorskip("sentencepiece")
    out = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_sentences(2000)), model_writer=out, vocab_size=300, model_type="bpe",
        byte_fallback=True, split_digits=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        character_coverage=1.0, normalization_rule_name="identity", remove_extra_whitespaces=False,
        minloglevel=2)
    path = tmp_path_factory.mktemp("tok") / "tokenizer.model"
    path.write_bytes(out.getvalue())
    return path


@pytest.fixture
def killed_at_batch(monkeypatch):
    """kill(n): the training loop's batch stream raises KeyboardInterrupt while fetching batch n (0-based), as if
    the process were killed there; restore() puts the real stream back for the resumed run."""
    import minillama.training.train as T

    real = T.batches

    def kill(n):
        def dies(*args, **kwargs):
            for i, b in enumerate(real(*args, **kwargs)):
                if i == n:
                    raise KeyboardInterrupt
                yield b

        monkeypatch.setattr(T, "batches", dies)

    kill.restore = lambda: monkeypatch.setattr(T, "batches", real)
    return kill
