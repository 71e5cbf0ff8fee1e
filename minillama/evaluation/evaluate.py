"""Evaluation: perplexity as a function of context length, and passkey retrieval.

Perplexity (chunked): every document is cut to the same number of scored tokens, then split into
non-overlapping windows of `context` tokens; each window is scored on its own. The same tokens are
scored at every context length, so the numbers are comparable: a model that uses long context gets
lower perplexity with longer windows (fewer tokens are predicted from a short prefix).

Passkey (Position Interpolation protocol, scaled down): a 5-digit key hidden at a controlled depth
in filler text, asked for at the end; greedy decoding must produce the key.
"""

from __future__ import annotations

import math
import os
from typing import Optional, Sequence

import torch

from ..generate import generate
from ..measuring.memory import estimate_memory, kv_cache_bytes
from ..model import Transformer
from ..progress import progress_bar
from .passkey import make_passkey

GiB = 1024**3


def available_memory_bytes(device: torch.device) -> int:
    """Free memory on a CUDA device, or MemAvailable of the host."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def forward_bytes(model: Transformer, batch: int, seqlen: int, mode: str = "eval", kv_cache: int = 0) -> int:
    """Bytes that one no-grad forward of batch x seqlen tokens allocates beyond the weights already in
    memory: the peak of the memory model (minillama.measuring.memory.estimate_memory; mode "eval": the
    forward and its loss, "inference": the logits) less the parameters, plus a KV cache of `kv_cache`
    positions (generation sets it up before its first forward)."""
    dtype = model.tok_embeddings.weight.dtype  # never quantised: the dtype the activations run in
    est = estimate_memory(model.args, batch=batch, seq_len=seqlen, mode=mode, param_dtype=dtype)
    need = est.peak_bytes - est.at_peak["parameters"]
    if kv_cache:
        need += kv_cache_bytes(model.args, batch=batch, length=kv_cache, param_dtype=dtype)
    return need


def check_fits(model: Transformer, batch: int, seqlen: int, what: str, *, mode: str = "eval",
               kv_cache: int = 0) -> None:
    """Refuse, before allocating anything, a forward pass that cannot fit in memory (see forward_bytes)."""
    device = next(model.parameters()).device
    need, have = forward_bytes(model, batch, seqlen, mode, kv_cache), available_memory_bytes(device)
    if need > 0.8 * have:
        raise ValueError(f"{what}: a forward pass of batch {batch} x {seqlen} tokens needs about "
                         f"{need / GiB:.1f} GiB, more than the {have / GiB:.1f} GiB available on {device}; "
                         f"use a shorter context.")


@torch.no_grad()
def perplexity(model: Transformer, docs: Sequence[Sequence[int]], context: int, scored_tokens: int,
               batch_size: Optional[int] = None, progress: bool = False) -> dict:
    """Chunked perplexity of `docs` (token lists that start with BOS) with windows of `context` tokens.

    Only documents with more than `scored_tokens` tokens are used, each cut to scored_tokens + 1 tokens,
    so every context length scores exactly the same tokens. progress=True: a bar over the windows (stderr).
    """
    if context <= 0 or context > model.args.max_seq_len:
        raise ValueError(f"context={context} is invalid: expected 1 .. max_seq_len={model.args.max_seq_len}.")
    docs = [list(d[: scored_tokens + 1]) for d in docs if len(d) > scored_tokens]
    if not docs:
        raise ValueError(f"No document is longer than {scored_tokens} tokens: lower scored_tokens.")
    if batch_size is None:  # about 8k tokens per forward pass: few calls, modest memory
        batch_size = max(1, 8192 // context)
    batch_size = max(1, min(batch_size, len(docs) * math.ceil(scored_tokens / context)))
    while batch_size > 1 and forward_bytes(model, batch_size, context) > 0.5 * available_memory_bytes(
            next(model.parameters()).device):
        batch_size //= 2
    check_fits(model, batch_size, context, f"perplexity at context {context}")
    device = next(model.parameters()).device
    windows: dict[int, list[list[int]]] = {}  # grouped by length, so a batch has one shape
    for d in docs:
        for start in range(0, scored_tokens, context):
            w = d[start: start + context + 1]
            windows.setdefault(len(w), []).append(w)
    nll, count = 0.0, 0
    model.eval()
    bar = progress_bar(desc=f"perplexity @ {context}", total=sum(map(len, windows.values())), unit="window",
                       progress=progress, leave=False)
    for rows in windows.values():
        for i in range(0, len(rows), batch_size):
            t = torch.tensor(rows[i:i + batch_size], device=device)
            # the model's own loss: chunk by chunk, never the [B, T, vocab] logits (Transformer.loss)
            nll += float(model(t[:, :-1], t[:, 1:], reduction="sum"))
            count += t[:, 1:].numel()
            bar.update(t.shape[0])
    bar.close()
    mean = nll / count
    return {"context": context, "nll": mean, "ppl": math.exp(mean), "tokens": count, "docs": len(docs)}


def check_retrieval_fits(model: Transformer, context: int, trials: int, batch_size: int, what: str) -> None:
    """Refuse a retrieval evaluation (passkey, phrases) the model cannot run: a context beyond its max_seq_len,
    or generation that would not fit in memory. Cheap, before building any filler: generate() sets up a KV
    cache of about `context` positions for up to batch_size prompts."""
    if context > model.args.max_seq_len:
        raise ValueError(f"context={context} is longer than the model's max_seq_len={model.args.max_seq_len}.")
    check_fits(model, min(batch_size, trials), context, f"{what} at context {context}", mode="inference",
               kv_cache=context)


def passkey_prompt_filler(tokenizer, context: int, answer_tokens: int = 8) -> int:
    """The largest number of filler sentences whose passkey prompt (plus the answer) fits in `context`."""
    def length(n):
        return len(tokenizer.encode(make_passkey(0, n, 0.5)["prompt"], bos=True))
    if length(1) + answer_tokens > context:
        raise ValueError(f"context={context} is too short for even one filler sentence of a passkey prompt.")
    lo, hi = 1, 2  # length grows with n: double hi until it no longer fits, then bisect (O(log n) encodings)
    while length(hi) + answer_tokens <= context:
        lo, hi = hi, 2 * hi
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if length(mid) + answer_tokens <= context else (lo, mid)
    return lo


@torch.no_grad()
def passkey_accuracy(model: Transformer, tokenizer, context: int, trials: int, seed: int = 1234,
                     depths: Sequence[float] = (0.0, 0.25, 0.5, 0.75, 1.0), batch_size: int = 25,
                     progress: bool = False) -> dict:
    """Share of trials where greedy decoding reproduces the key, per depth and overall (progress: a bar).

    Trial i hides a key at depth depths[i % len(depths)]. Score the prompts in batches of batch_size with
    generate(model, prompts, max_new_tokens=8) (greedy); a trial is correct when the decoded answer, with
    surrounding whitespace stripped, starts with the key (item["answer"]). Build the list `correct` (one bool
    per trial, in order) and `per_depth` {depth: share correct among that depth's trials, NaN if none}.
    """
    if trials <= 0:
        raise ValueError(f"trials={trials} is invalid: expected a positive integer.")
    check_retrieval_fits(model, context, trials, batch_size, "passkey")
    n_filler = passkey_prompt_filler(tokenizer, context)
    items = [make_passkey(seed * 1_000_003 + i, n_filler, depths[i % len(depths)]) for i in range(trials)]
    prompts = [tokenizer.encode(it["prompt"], bos=True) for it in items]
    # BEGIN SOLUTION a5
    correct = []
    for i in progress_bar(range(0, trials, batch_size), desc=f"passkey @ {context}", progress=progress, leave=False,
                          unit="batch"):
        outs = generate(model, prompts[i:i + batch_size], max_new_tokens=8)
        for it, out in zip(items[i:i + batch_size], outs):
            correct.append(tokenizer.decode(out).strip().startswith(it["answer"]))
    per_depth = {}
    for d in depths:
        hits = [c for c, it in zip(correct, items) if it["depth"] == d]
        per_depth[d] = sum(hits) / len(hits) if hits else float("nan")
    # END SOLUTION
    return {"context": context, "n_filler": n_filler, "prompt_tokens": max(map(len, prompts)),
            "trials": trials, "accuracy": sum(correct) / trials, "per_depth": per_depth}
