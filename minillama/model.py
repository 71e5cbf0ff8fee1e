"""A minimal LLaMA-2, with Meta's module names.

    Transformer
      tok_embeddings                     token ids -> vectors
      layers[i]: TransformerBlock
        attention_norm: RMSNorm
        attention: Attention (wq wk wv wo)   grouped-query attention with RoPE
        ffn_norm: RMSNorm
        feed_forward: FeedForward (w1 w2 w3) SwiGLU
      norm: RMSNorm
      output                              vectors -> logits

The plain formulas, as the paper and Meta's code write them, differentiated by autograd. Every technique of
the course is a flag or a wrapper on this one model, never a copy: LoRA (lora.py), 4-bit weights (quant.py),
the hand-written backward passes that keep fewer tensors (kernels.py), torch.compile (training.techniques).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .config import ModelArgs
from .rope import apply_rope, rope_cos_sin

CACHE_MODES = ("prealloc", "concat")  # "concat": ConcatKVCache, at the end of this file


class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) * weight, computed in fp32 (as Meta and HF do)."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalise the last dimension of x: compute in fp32, cast back to x's dtype, then scale by weight."""
        # BEGIN SOLUTION a1
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.type_as(x)
        # END SOLUTION


class KVCache(nn.Module):
    """Keys and values of past positions, for generation: one buffer of max_seq_len positions per layer,
    written in place (no allocation per token, no fragmentation)."""

    def __init__(self, batch_size: int, n_kv_heads: int, max_seq_len: int, head_dim: int,
                 dtype: torch.dtype = torch.float32, device=None):
        super().__init__()
        self.batch_size, self.max_seq_len = batch_size, max_seq_len
        shape = (batch_size, n_kv_heads, self.initial_length(max_seq_len), head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.length = 0  # positions filled so far

    @staticmethod
    def initial_length(max_seq_len: int) -> int:
        return max_seq_len

    def check(self, start_pos: int, k: torch.Tensor) -> int:
        bsz, end = k.shape[0], start_pos + k.shape[2]
        if bsz > self.batch_size or end > self.max_seq_len:
            raise ValueError(f"KV cache holds batch {self.batch_size} x {self.max_seq_len} positions; "
                             f"got batch {bsz} up to position {end}.")
        return end

    def update(self, start_pos: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v ([B, n_kv_heads, T, head_dim]) at start_pos; return keys/values of positions 0..start_pos+T.

        Check the bounds first (self.check(start_pos, k) returns end = start_pos + T), write k and v in place
        into rows :B and positions start_pos:end of the buffers self.k / self.v (no new allocation), set
        self.length = end, and return views of the first `end` positions of rows :B.
        """
        # BEGIN SOLUTION a1
        bsz, end = k.shape[0], self.check(start_pos, k)
        self.k[:bsz, :, start_pos:end] = k
        self.v[:bsz, :, start_pos:end] = v
        self.length = end
        return self.k[:bsz, :, :end], self.v[:bsz, :, :end]
        # END SOLUTION


def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """[B, n_kv_heads, T, hd] -> [B, n_kv_heads * n_rep, T, hd]: each KV head serves n_rep query heads."""
    return x if n_rep == 1 else x.repeat_interleave(n_rep, dim=1)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.n_kv_heads, args.head_dim
        self.attn_impl = args.attn_impl
        self.wq = nn.Linear(args.dim, args.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(args.dim, args.n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(args.dim, args.n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(args.n_heads * self.head_dim, args.dim, bias=False)
        self.cache: Optional[KVCache] = None

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, start_pos: int = 0) -> torch.Tensor:
        bsz, seqlen, _ = x.shape
        q = self.wq(x).view(bsz, seqlen, self.n_heads, self.head_dim)
        k = self.wk(x).view(bsz, seqlen, self.n_kv_heads, self.head_dim)
        v = self.wv(x).view(bsz, seqlen, self.n_kv_heads, self.head_dim)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [B, heads, T, head_dim]
        if self.cache is not None:
            k, v = self.cache.update(start_pos, k, v)
        # Query i sits at position start_pos + i and may see keys 0 .. start_pos + i.
        # With no past (keys == queries) that is the plain causal mask; one new token sees everything.
        past = k.shape[2] - seqlen
        mask = None
        if seqlen > 1 and past > 0:
            mask = torch.ones(seqlen, k.shape[2], dtype=torch.bool, device=x.device).tril(diagonal=past)
        causal = seqlen > 1 and past == 0
        if self.attn_impl == "sdpa":
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal,
                                               enable_gqa=self.n_kv_heads != self.n_heads)
        else:
            y = self.math_attention(q, k, v, mask, causal)
        return self.wo(y.transpose(1, 2).reshape(bsz, seqlen, -1))

    def math_attention(self, q, k, v, mask, causal):
        """softmax(q k^T / sqrt(d) + mask) v, written out: the teaching path, tested equal to SDPA.

        q: [B, n_heads, Tq, hd]; k, v: [B, n_kv_heads, Tk, hd] (repeat them for grouped-query attention);
        mask: bool [Tq, Tk] (True = may attend) or None; causal: use the square lower-triangular mask.
        Softmax in fp32, result in q's dtype, shape [B, n_heads, Tq, hd].
        """
        # BEGIN PROMPT
        # Hint: repeat_kv above gives each query head its KV head; masked_fill(~mask, -inf) before the softmax.
        # END PROMPT
        # BEGIN SOLUTION a1
        n_rep = self.n_heads // self.n_kv_heads
        k, v = repeat_kv(k, n_rep), repeat_kv(v, n_rep)
        scores = (q @ k.transpose(-2, -1)) / math.sqrt(self.head_dim)  # [B, H, Tq, Tk]
        if causal:
            mask = torch.ones(q.shape[2], k.shape[2], dtype=torch.bool, device=q.device).tril()
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
        probs = F.softmax(scores.float(), dim=-1).type_as(q)
        return probs @ v
        # END SOLUTION


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x)."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """w2(silu(w1 x) * w3 x)."""
        # BEGIN SOLUTION a1
        return self.w2(F.silu(self.w1(x)) * self.w3(x))
        # END SOLUTION


class TransformerBlock(nn.Module):
    def __init__(self, layer_id: int, args: ModelArgs):
        super().__init__()
        self.layer_id = layer_id
        self.attention_norm = RMSNorm(args.dim, eps=args.norm_eps)
        self.attention = Attention(args)
        self.ffn_norm = RMSNorm(args.dim, eps=args.norm_eps)
        self.feed_forward = FeedForward(args.dim, args.ffn_hidden_dim)

    def forward(self, x, cos, sin, start_pos: int = 0):
        h = x + self.attention(self.attention_norm(x), cos, sin, start_pos)
        return h + self.feed_forward(self.ffn_norm(h))


# The loss is computed a chunk of positions at a time, so that a forward without backward never holds the
# whole [B*T, vocab] logits: with a 32,000-word vocabulary they are 128 KB per token in fp32, more than a
# whole block's activations in Llama-2-7B.
LOSS_CHUNK_ELEMENTS = 2**23  # at most this many logits per chunk (32 MiB in fp32)
LOSS_MIN_CHUNKS = 8  # and at least this many chunks: one chunk's logits stay an eighth of the whole


def loss_chunk(n_positions: int, vocab_size: int) -> int:
    """Positions per chunk of the loss: at most LOSS_CHUNK_ELEMENTS logits, and at most 1/LOSS_MIN_CHUNKS of
    the positions (a chunk's logits are the loss's transient at the top of the activations)."""
    return max(1, min(LOSS_CHUNK_ELEMENTS // vocab_size, -(-n_positions // LOSS_MIN_CHUNKS)))


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(TransformerBlock(i, args) for i in range(args.n_layers))
        self.norm = RMSNorm(args.dim, eps=args.norm_eps)
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False)
        self.checkpoint_every = 0  # gradient checkpointing off (see set_checkpointing)

    def forward(self, tokens: torch.Tensor, targets: Optional[torch.Tensor] = None, *,
                start_pos: int = 0, last_only: bool = False, reduction: str = "mean") -> torch.Tensor:
        """tokens [B, T] -> logits [B, T, vocab_size]; or, with targets [B, T], the mean cross-entropy
        over the positions whose target is not -100 (a scalar; reduction="sum": their sum).

        start_pos: position of tokens[:, 0] (generation with a KV cache).
        last_only: compute logits for the last position only (prefill in generation).
        """
        bsz, seqlen = tokens.shape
        if start_pos + seqlen > self.args.max_seq_len:
            raise ValueError(f"Sequence of {start_pos + seqlen} positions is longer than "
                             f"max_seq_len={self.args.max_seq_len}.")
        positions = torch.arange(start_pos, start_pos + seqlen, device=tokens.device)
        cos, sin = rope_cos_sin(positions, self.args.head_dim, self.args.rope_theta, self.args.rope_scaling)
        h = self.tok_embeddings(tokens)
        for i, layer in enumerate(self.layers):
            if self.checkpoint_every and i % self.checkpoint_every == 0 and self.training and torch.is_grad_enabled():
                # Gradient checkpointing: keep only the block's input; recompute its insides in backward
                # (torch.utils.checkpoint.checkpoint of the block with its four arguments, use_reentrant=False).
                # BEGIN SOLUTION a3
                h = checkpoint(layer, h, cos, sin, start_pos, use_reentrant=False)
                # END SOLUTION
            else:
                h = layer(h, cos, sin, start_pos)
        h = self.norm(h)
        if last_only:
            h = h[:, -1:]
        if targets is None:
            return self.output(h)
        return self.loss(h, targets, reduction)

    def loss(self, h: torch.Tensor, targets: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        """Cross-entropy of the next token: -log softmax(output(h))[target] = logsumexp(logits) - logits[target],
        in fp32, over the positions whose target is not -100; their mean (reduction="mean") or sum ("sum").

        The logits are made a chunk of positions at a time (loss_chunk): without a backward pass (evaluation)
        only one chunk's [positions, vocab] logits exist at once. In training autograd keeps every chunk's fp32
        logits for the backward anyway; minillama.kernels.linear_cross_entropy keeps only the gradients."""
        if reduction not in ("mean", "sum"):
            raise ValueError(f"Transformer.loss(reduction={reduction!r}): expected 'mean' or 'sum'.")
        h, targets = h.flatten(0, 1), targets.flatten()
        valid = targets != -100
        chunk = loss_chunk(h.shape[0], self.args.vocab_size)
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        for h_c, t_c, v_c in zip(h.split(chunk), targets.split(chunk), valid.split(chunk)):
            logits = self.output(h_c).float()  # [chunk, vocab], the softmax in fp32
            picked = logits.gather(1, t_c.clamp(min=0)[:, None])[:, 0]  # -100 -> any index, masked below
            total = total + ((torch.logsumexp(logits, dim=-1) - picked) * v_c).sum()
        return total / valid.sum() if reduction == "mean" else total

    def set_checkpointing(self, every: int = 1) -> None:
        """Gradient checkpointing of every `every`-th transformer block in training (0: off)."""
        if not isinstance(every, int) or every < 0:
            raise ValueError(f"checkpointing every={every!r}: expected 0 (off) or a positive integer.")
        self.checkpoint_every = every

    def set_attn_impl(self, impl: str) -> None:
        """Switch every layer between "sdpa" (fused kernel) and "math" (explicit softmax)."""
        self.args = self.args.replace(attn_impl=impl)  # validates the name
        for layer in self.layers:
            layer.attention.attn_impl = impl

    def set_max_seq_len(self, max_seq_len: int) -> None:
        """Change the longest accepted sequence. RoPE angles are computed per forward pass, so this is
        only a config change: positions beyond the trained length get no scaling (see rope_scaling)."""
        self.args = self.args.replace(max_seq_len=max_seq_len)

    # ---- KV cache -------------------------------------------------------------------------
    def setup_cache(self, batch_size: int, max_seq_len: Optional[int] = None, mode: str = "prealloc") -> None:
        """Give every attention layer a KV cache; forward() then takes start_pos and appends to it.
        mode="prealloc": KVCache; "concat": ConcatKVCache (kept only to compare the two in notebook 01)."""
        if mode not in CACHE_MODES:
            raise ValueError(f"KV cache mode {mode!r} is unknown: expected one of {CACHE_MODES}.")
        cache_cls = KVCache if mode == "prealloc" else ConcatKVCache
        length = max_seq_len or self.args.max_seq_len
        w = self.tok_embeddings.weight  # the activations' dtype (a 4-bit wk's weight is packed uint8)
        for layer in self.layers:
            layer.attention.cache = cache_cls(batch_size, self.args.n_kv_heads, length, self.args.head_dim,
                                              dtype=w.dtype, device=w.device)

    def clear_cache(self) -> None:
        for layer in self.layers:
            layer.attention.cache = None

    # ---- initialisation ---------------------------------------------------------------------
    @torch.no_grad()
    def init_weights(self, seed: Optional[int] = None) -> None:
        """Random init for training from scratch: N(0, 0.02), residual projections (wo, w2) scaled
        by 1/sqrt(2 n_layers) as in GPT-2/llama2.c; norms to one."""
        gen = None
        if seed is not None:
            gen = torch.Generator(device=self.output.weight.device).manual_seed(seed)
        std_res = 0.02 / math.sqrt(2 * self.args.n_layers)
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                std = std_res if name.endswith(("wo.weight", "w2.weight")) else 0.02
                p.normal_(0.0, std, generator=gen)


def create_model(args: ModelArgs, *, device="cpu", dtype: Optional[torch.dtype] = None,
                 seed: Optional[int] = 0) -> Transformer:
    """A randomly initialised model, built directly on `device` in `dtype` (no fp32 copy on the way:
    shapes are made on the meta device, then memory is allocated once)."""
    with torch.device("meta"):
        model = Transformer(args)
    if dtype is not None:
        model.to(dtype)
    model.to_empty(device=device)
    model.init_weights(seed)
    return model


# ---- for comparison only ----------------------------------------------------------------------------
class ConcatKVCache(KVCache):
    """The naive cache, kept so notebook 01 can compare it with KVCache: it grows by torch.cat at every
    step, so each new token allocates a new, larger tensor (and frees the old one)."""

    @staticmethod
    def initial_length(max_seq_len: int) -> int:
        return 0

    def update(self, start_pos: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        end = self.check(start_pos, k)
        if start_pos != self.length:
            raise ValueError(f"concat KV cache holds {self.length} positions; cannot write at {start_pos}.")
        if start_pos == 0:
            self.k, self.v = k, v
        else:
            self.k, self.v = torch.cat([self.k, k], dim=2), torch.cat([self.v, v], dim=2)
        self.length = end
        return self.k, self.v

