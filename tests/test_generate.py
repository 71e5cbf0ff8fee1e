"""Generation against HF's greedy generate, against uncached decoding, and its bad inputs."""

import pytest
import torch
from conftest import make_hf_model

from minillama import create_model, generate, get_preset, load_model

PROMPTS = [[1, 17, 42, 99, 5, 23], [1, 8, 3], [1, 200, 150, 77, 31, 64, 90, 12, 2]]


@pytest.fixture
def model(hf_dir):
    return load_model(hf_dir)


def uncached_greedy(model, prompt, n):
    """The slow explicit definition: run the whole sequence again for every token."""
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
    return seq[len(prompt):]


def test_greedy_equals_hf_generate(hf_model, model):
    for prompt in PROMPTS:
        ref = hf_model.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False, eos_token_id=None,
                                pad_token_id=0)[0, len(prompt):].tolist()
        assert generate(model, prompt, 12) == [ref]


def test_cached_equals_uncached(model):
    for prompt in PROMPTS:
        assert generate(model, prompt, 10)[0] == uncached_greedy(model, prompt, 10)


def test_ragged_batch_equals_one_by_one(model):
    batched = generate(model, PROMPTS, 10)
    assert batched == [generate(model, p, 10)[0] for p in PROMPTS]


def test_prealloc_cache_equals_concat_cache(model):
    assert generate(model, PROMPTS, 10, cache_mode="prealloc") == generate(model, PROMPTS, 10, cache_mode="concat")


def test_sampling_is_reproducible_with_a_seed_and_leaves_global_rng_alone(model):
    state = torch.get_rng_state()
    a = generate(model, PROMPTS, 15, temperature=1.5, seed=3)
    b = generate(model, PROMPTS, 15, temperature=1.5, seed=3)
    c = generate(model, PROMPTS, 15, temperature=1.5, seed=4)
    assert a == b and a != c
    assert torch.equal(state, torch.get_rng_state())


def test_tiny_top_p_is_greedy(model):
    # only the most likely token survives a nucleus of mass 1e-6
    assert generate(model, PROMPTS, 10, temperature=1.0, top_p=1e-6, seed=0) == generate(model, PROMPTS, 10)


def test_eos_stops_a_row_and_is_not_returned(model):
    free = generate(model, PROMPTS[0], 10)[0]
    eos = free[4]
    out = generate(model, PROMPTS[0], 10, eos_id=eos)[0]
    assert out == free[: free.index(eos)]


def test_any_of_several_stop_ids_stops_a_row(model):
    """Llama-3 stops at <|end_of_text|> or <|eot_id|> (tokenizer.stop_ids): the first of them to come ends it."""
    free = generate(model, PROMPTS[0], 10)[0]
    stops = [free[6], free[3], 10**6]  # the later one first in the list, and an id that never comes
    assert generate(model, PROMPTS[0], 10, eos_id=stops)[0] == free[: min(free.index(free[6]), free.index(free[3]))]
    assert generate(model, PROMPTS[0], 10, eos_id=[])[0] == free


def test_stream_callback_sees_every_token_in_order(model):
    seen = []
    out = generate(model, PROMPTS, 6, stream=lambda row, tok: seen.append((row, tok)))
    for row in range(len(PROMPTS)):
        assert [t for r, t in seen if r == row] == out[row]


def test_generation_stops_at_max_seq_len():
    model = create_model(get_preset("tiny").replace(n_layers=1, max_seq_len=12))
    out = generate(model, [1, 2, 3, 4, 5], 100)
    assert len(out[0]) == 7


@pytest.mark.parametrize("kwargs, match", [
    (dict(temperature=-0.1), "temperature"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
    (dict(max_new_tokens=-1), "max_new_tokens"),
])
def test_bad_sampling_arguments(model, kwargs, match):
    args = dict(max_new_tokens=4)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        generate(model, PROMPTS[0], **args)


def test_prompt_longer_than_max_seq_len(model):
    n = model.args.max_seq_len + 1
    with pytest.raises(ValueError, match=f"Prompt 0 has {n} tokens, longer than the model's max_seq_len"):
        generate(model, [1] * n, 4)


def test_out_of_vocab_and_empty_prompts(model):
    with pytest.raises(ValueError, match="vocab_size"):
        generate(model, [1, model.args.vocab_size], 4)
    with pytest.raises(ValueError, match="at least one token"):
        generate(model, [[1, 2], []], 4)


def test_tensor_prompts_are_accepted(model):
    assert generate(model, torch.tensor(PROMPTS[0]), 5) == generate(model, PROMPTS[0], 5)
    assert generate(model, torch.tensor([PROMPTS[0], PROMPTS[0]]), 5) == generate(model, [PROMPTS[0]] * 2, 5)
