"""Hidden tests of assignment 5 (long context): inverse frequencies against transformers' own rope code,
and the passkey scoring with a scripted model whose answers are known."""

import pytest
import torch

from minillama import create_model, get_preset
from minillama.evaluation import evaluate
from minillama.rope import rope_inv_freq


@pytest.mark.parametrize("scaling", [
    {"rope_type": "linear", "factor": 3.0},
    {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 64},
    {"rope_type": "yarn", "factor": 2.5, "original_max_position_embeddings": 256, "beta_fast": 16, "beta_slow": 2},
])
def test_inv_freq_equals_transformers(scaling):
    """head_dim 24, theta 20000: linear and YaRN frequencies equal transformers' ROPE_INIT_FUNCTIONS; NTK equals
    plain RoPE with the base theta * s ** (d / (d - 2)) written out here."""
    transformers = pytest.importorskip("transformers")
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    cfg = transformers.LlamaConfig(hidden_size=96, num_attention_heads=4, head_dim=24, max_position_embeddings=512,
                                   rope_parameters={**scaling, "rope_theta": 20000.0})
    want, _ = ROPE_INIT_FUNCTIONS[scaling["rope_type"]](cfg, "cpu")
    got = rope_inv_freq(24, 20000.0, scaling)
    torch.testing.assert_close(got, want.float(), atol=1e-7, rtol=1e-6)
    base = 20000.0 * 3.0 ** (24 / 22)
    plain = 1.0 / base ** (torch.arange(0, 24, 2, dtype=torch.float64) / 24)
    torch.testing.assert_close(rope_inv_freq(24, 20000.0, {"rope_type": "ntk", "factor": 3.0}).double(), plain,
                               atol=1e-9, rtol=1e-6)


class ScriptedTokenizer:
    """encode gives every prompt one id (its trial number); decode answers right for trials 0, 3, 6, 9."""

    def __init__(self):
        self.prompts = []

    def encode(self, text, bos=True):
        self.prompts.append(text)
        return [len(self.prompts) - 1]

    def decode(self, ids):
        i = ids[0]
        key = self.prompts[i].split("The pass key is ")[1][:5]
        wrong = ("2" if key[0] == "1" else "1") + key[1:]
        return f"  {key}. The end" if i % 3 == 0 else f" {wrong}"


def test_passkey_scoring_counts_per_depth(monkeypatch):
    """10 trials in batches of 4, right on trials 0, 3, 6, 9: accuracy 0.4, and per depth (trial i has depth
    i % 5 / 4) 0.5, 0.5, 0.0, 0.5, 0.5."""
    model = create_model(get_preset("tiny").replace(n_layers=1, max_seq_len=64))
    tok = ScriptedTokenizer()
    batches = []

    def scripted_generate(m, prompts, max_new_tokens):
        batches.append(len(prompts))
        return [[p[-1]] for p in prompts]

    monkeypatch.setattr(evaluate, "generate", scripted_generate)
    monkeypatch.setattr(evaluate, "passkey_prompt_filler", lambda tokenizer, context: 2)
    r = evaluate.passkey_accuracy(model, tok, context=64, trials=10, seed=5, batch_size=4)
    assert batches == [4, 4, 2]
    assert r["accuracy"] == pytest.approx(0.4)
    assert r["per_depth"] == pytest.approx({0.0: 0.5, 0.25: 0.5, 0.5: 0.0, 0.75: 0.5, 1.0: 0.5})
