"""Autoregressive generation with a KV cache (greedy, temperature, nucleus/top-p).

Ragged batches follow Meta's scheme: prompts are right-aligned to position 0 and padded at the
end; decoding starts after the shortest prompt, and a row whose prompt is longer keeps feeding
its own prompt tokens until they run out. Every position a row attends to therefore holds a real
token of that row, so no attention mask or position offsets are needed, and each row gets exactly
what it would get alone.
"""

from __future__ import annotations

import math
import numbers
from typing import Callable, Optional, Sequence, Union

import torch

from .model import Transformer

Prompt = Union[Sequence[int], Sequence[Sequence[int]]]


def sample_top_p(probs: torch.Tensor, top_p: float, generator: Optional[torch.Generator]) -> torch.Tensor:
    """Sample from the smallest set of tokens whose probability mass reaches top_p (nucleus sampling).

    probs: [B, vocab] rows summing to one. Sort descending, keep a token while the mass before it is at
    most top_p, renormalise, draw with torch.multinomial(generator=generator), map back to token ids [B].
    """
    # BEGIN PROMPT
    # Hint: torch.sort(..., descending=True) returns the order too; the mass *before* token j is
    # cumsum_j - p_j. Zero the dropped tokens, renormalise, sample, then map back with torch.gather.
    # END PROMPT
    # BEGIN SOLUTION a1
    probs_sorted, idx = torch.sort(probs, dim=-1, descending=True)
    cum = torch.cumsum(probs_sorted, dim=-1)
    probs_sorted[cum - probs_sorted > top_p] = 0.0  # drop tokens once the mass before them exceeds top_p
    probs_sorted /= probs_sorted.sum(dim=-1, keepdim=True)
    choice = torch.multinomial(probs_sorted, num_samples=1, generator=generator)
    return torch.gather(idx, -1, choice).squeeze(-1)
    # END SOLUTION


def check_sampling(temperature: float, top_p: float, max_new_tokens: int) -> None:
    """Refuse settings generate() cannot honour (the CLI checks them before it loads a model)."""
    if not isinstance(temperature, numbers.Real) or not (math.isfinite(temperature) and temperature >= 0):
        raise ValueError(f"temperature={temperature} is invalid: expected a finite value >= 0 (0 is greedy).")
    if not isinstance(top_p, numbers.Real) or not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p={top_p} is invalid: expected a value in (0, 1].")
    if not isinstance(max_new_tokens, numbers.Integral) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens={max_new_tokens} is invalid: expected an integer >= 0.")


def _prompts(tokens: Prompt) -> list[list[int]]:
    """One prompt (ids) or a batch (lists of ids; a tensor or array too) as lists of ints; a clear error otherwise."""
    if hasattr(tokens, "tolist"):  # a torch tensor or numpy array, [T] or [B, T]
        tokens = tokens.tolist()
    if not isinstance(tokens, (list, tuple)):
        raise ValueError(f"tokens={tokens!r} is invalid: expected a list of token ids or a list of such lists.")
    prompts = [tokens] if tokens and not isinstance(tokens[0], (list, tuple)) else tokens
    if not prompts or any(not isinstance(p, (list, tuple)) or len(p) == 0 for p in prompts):
        raise ValueError("Every prompt needs at least one token (e.g. BOS).")
    for i, p in enumerate(prompts):
        wrong = [t for t in p if not isinstance(t, numbers.Integral) or isinstance(t, bool)]
        if wrong:
            raise ValueError(f"Prompt {i} holds {wrong[0]!r}: token ids must be integers.")
    return [[int(t) for t in p] for p in prompts]


@torch.inference_mode()
def generate(model: Transformer, tokens: Prompt, max_new_tokens: int, temperature: float = 0.0,
             top_p: float = 1.0, eos_id: Union[int, Sequence[int], None] = None, seed: Optional[int] = None, *,
             stream: Optional[Callable[[int, int], None]] = None, cache_mode: str = "prealloc") -> list[list[int]]:
    """Continue each prompt by up to max_new_tokens tokens.

    tokens: one prompt (a list of ids) or a batch (a list of lists, lengths may differ).
    temperature: 0 is greedy (argmax); > 0 divides the logits before sampling with top_p.
    eos_id: a row stops after producing it (the EOS itself is not returned); several ids stop it too
            (a Llama-3 chat answer ends with <|eot_id|>, a text with <|end_of_text|>: tokenizer.stop_ids).
    seed: seeds a private generator, so sampling is reproducible and the global RNG is untouched.
    stream: called as stream(row, token_id) for every new token, e.g. to print as it is made (turn the ids
            into text with tokenizer.TextStream: a token decoded alone loses its leading space).
    Generation also stops when a row reaches the model's max_seq_len.
    Returns the new ids of every prompt, as a list of lists (also for a single prompt).
    """
    check_sampling(temperature, top_p, max_new_tokens)
    prompts = _prompts(tokens)
    stop = {eos_id} if isinstance(eos_id, numbers.Integral) else set(eos_id or ())  # the ids that end a row
    max_len = model.args.max_seq_len
    for i, p in enumerate(prompts):
        if len(p) > max_len:
            raise ValueError(f"Prompt {i} has {len(p)} tokens, longer than the model's max_seq_len={max_len}.")
    vocab = model.args.vocab_size
    if any(not 0 <= t < vocab for p in prompts for t in p):
        raise ValueError(f"Prompt token ids must lie in [0, {vocab}) for this model's vocab_size.")

    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
    bsz = len(prompts)
    min_len, total_len = min(map(len, prompts)), min(max_len, max(map(len, prompts)) + max_new_tokens)
    buf = torch.zeros(bsz, total_len, dtype=torch.long, device=device)
    is_prompt = torch.zeros(bsz, total_len, dtype=torch.bool, device=device)
    for i, p in enumerate(prompts):
        buf[i, : len(p)] = torch.tensor(p, dtype=torch.long, device=device)
        is_prompt[i, : len(p)] = True
    lengths = torch.tensor([len(p) for p in prompts], device=device)
    done = torch.zeros(bsz, dtype=torch.bool, device=device)
    new: list[list[int]] = [[] for _ in prompts]

    was_training = model.training
    model.eval()
    model.setup_cache(bsz, total_len, mode=cache_mode)
    try:
        prev = 0
        for cur in range(min_len, total_len):
            logits = model(buf[:, prev:cur], start_pos=prev, last_only=True)[:, -1].float()
            if temperature > 0:
                nxt = sample_top_p(torch.softmax(logits / temperature, dim=-1), top_p, generator)
            else:
                nxt = logits.argmax(dim=-1)
            # rows still inside their prompt keep their own token
            nxt = torch.where(is_prompt[:, cur], buf[:, cur], nxt)
            buf[:, cur] = nxt
            produced = ~is_prompt[:, cur] & ~done & (cur - lengths < max_new_tokens)
            for i in produced.nonzero().flatten().tolist():
                tok = int(nxt[i])
                if tok in stop:
                    done[i] = True
                    continue
                new[i].append(tok)
                if stream is not None:
                    stream(i, tok)
            prev = cur
            if bool((done | (cur + 1 - lengths >= max_new_tokens)).all()):
                break
    finally:
        model.clear_cache()
        model.train(was_training)
    return new
