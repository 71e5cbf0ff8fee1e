"""Hidden tests of assignment 1 (LLaMA components): other shapes, dtypes and seeds than the public tests,
against independent references (transformers' LlamaRMSNorm, Meta's complex-number RoPE, slow loops)."""

import math

import pytest
import torch
from torch.nn import functional as F

from minillama import get_preset
from minillama.generate import sample_top_p
from minillama.model import Attention, FeedForward, KVCache, RMSNorm
from minillama.rope import apply_rope


def test_rmsnorm_matches_the_formula_in_bf16():
    """RMSNorm of a bf16 input (eps 1e-6) equals transformers' LlamaRMSNorm."""
    transformers = pytest.importorskip("transformers")
    from transformers.models.llama.modeling_llama import LlamaRMSNorm
    g = torch.Generator().manual_seed(11)
    x = (torch.randn(3, 5, 48, generator=g) * 3).to(torch.bfloat16)
    ours, ref = RMSNorm(48, eps=1e-6), LlamaRMSNorm(48, eps=1e-6)
    with torch.no_grad():
        ours.weight.copy_(torch.rand(48, generator=g) + 0.5)
        ref.weight.copy_(ours.weight)
        got, want = ours(x), ref(x)
    assert got.dtype == want.dtype
    torch.testing.assert_close(got, want, atol=1e-2, rtol=1e-2)


def test_rope_matches_meta_complex_rotation():
    """apply_rope equals Meta's reference: pairs as complex numbers times exp(i * angle), fp16 in and out."""
    g = torch.Generator().manual_seed(12)
    x = torch.randn(2, 7, 3, 16, generator=g).to(torch.float16)
    angles = torch.rand(7, 8, generator=g) * 20 - 10
    freqs_cis = torch.polar(torch.ones_like(angles), angles)  # [T, hd/2]
    xc = torch.view_as_complex(x.float().reshape(2, 7, 3, 8, 2))
    want = torch.view_as_real(xc * freqs_cis[None, :, None, :]).flatten(3).to(torch.float16)
    got = apply_rope(x, angles.cos(), angles.sin())
    assert got.dtype == torch.float16 and got.shape == x.shape
    torch.testing.assert_close(got, want, atol=2e-3, rtol=2e-3)


def _slow_attention(q, k, v, allowed):
    """Triple loop in float64: query head h reads KV head h // (n_heads / n_kv_heads)."""
    B, H, Tq, D = q.shape
    group = H // k.shape[1]
    out = torch.zeros(B, H, Tq, D, dtype=torch.float64)
    for b in range(B):
        for h in range(H):
            for i in range(Tq):
                js = [j for j in range(k.shape[2]) if allowed(i, j)]
                s = torch.stack([q[b, h, i].double() @ k[b, h // group, j].double() for j in js]) / math.sqrt(D)
                p = torch.exp(s - s.max())
                p = p / p.sum()
                out[b, h, i] = sum(p[n] * v[b, h // group, j].double() for n, j in enumerate(js))
    return out


def test_math_attention_gqa_matches_a_slow_loop():
    """Grouped-query attention (6 query heads, 2 KV heads), causal and with a past-key mask, equals a loop."""
    args = get_preset("tiny").replace(dim=48, n_heads=6, n_kv_heads=2)
    attn = Attention(args)
    g = torch.Generator().manual_seed(13)
    q = torch.randn(2, 6, 5, 8, generator=g)
    k, v = torch.randn(2, 2, 5, 8, generator=g), torch.randn(2, 2, 5, 8, generator=g)
    got = attn.math_attention(q, k, v, None, True)
    torch.testing.assert_close(got.double(), _slow_attention(q, k, v, lambda i, j: j <= i), atol=1e-5, rtol=1e-5)
    # three new queries after four cached positions: query i sees keys 0 .. 4 + i
    q3 = torch.randn(2, 6, 3, 8, generator=g)
    k7, v7 = torch.randn(2, 2, 7, 8, generator=g), torch.randn(2, 2, 7, 8, generator=g)
    mask = torch.ones(3, 7, dtype=torch.bool).tril(diagonal=4)
    got = attn.math_attention(q3, k7, v7, mask, False)
    torch.testing.assert_close(got.double(), _slow_attention(q3, k7, v7, lambda i, j: j <= 4 + i),
                               atol=1e-5, rtol=1e-5)


def test_swiglu_matches_the_formula():
    """FeedForward(24, 40) equals w2 (silu(w1 x) * w3 x), written with sigmoid in float64."""
    torch.manual_seed(14)
    ff = FeedForward(24, 40)
    x = torch.randn(3, 4, 24)
    a, b = x.double() @ ff.w1.weight.double().T, x.double() @ ff.w3.weight.double().T
    want = (a * torch.sigmoid(a) * b) @ ff.w2.weight.double().T
    torch.testing.assert_close(ff(x).double(), want, atol=1e-5, rtol=1e-5)


def test_kv_cache_update_writes_in_place_at_an_offset():
    """Two updates (positions 0-3, then 4-6) of 2 rows of a 3-row cache: views of the buffer, in order."""
    cache = KVCache(batch_size=3, n_kv_heads=2, max_seq_len=10, head_dim=4)
    ptr = cache.k.data_ptr()
    g = torch.Generator().manual_seed(15)
    k1, v1 = torch.randn(2, 2, 4, 4, generator=g), torch.randn(2, 2, 4, 4, generator=g)
    k2, v2 = torch.randn(2, 2, 3, 4, generator=g), torch.randn(2, 2, 3, 4, generator=g)
    cache.update(0, k1, v1)
    k, v = cache.update(4, k2, v2)
    assert k.shape == (2, 2, 7, 4) and v.shape == (2, 2, 7, 4) and cache.length == 7
    assert torch.equal(k, torch.cat([k1, k2], 2)) and torch.equal(v, torch.cat([v1, v2], 2))
    assert cache.k.data_ptr() == ptr and k.data_ptr() == ptr
    with pytest.raises(ValueError):
        cache.update(8, k2, v2)  # 8 + 3 > 10


def test_top_p_never_draws_outside_the_nucleus():
    """Every draw lies in the nucleus (computed by a loop), with frequencies near the renormalised ones."""
    g = torch.Generator().manual_seed(16)
    probs = F.softmax(torch.randn(3, 12, generator=g) * 2, dim=-1)
    top_p = 0.6
    nuclei = []
    for row in probs.tolist():
        order = sorted(range(12), key=lambda j: -row[j])
        keep, before = [], 0.0
        for j in order:
            if before > top_p:
                break
            keep.append(j)
            before += row[j]
        nuclei.append({j: row[j] / sum(row[m] for m in keep) for j in keep})
    gen = torch.Generator().manual_seed(17)
    counts = torch.zeros(3, 12)
    for _ in range(600):
        draw = sample_top_p(probs.clone(), top_p, gen)
        assert draw.shape == (3,)
        for r, j in enumerate(draw.tolist()):
            assert j in nuclei[r], f"row {r} drew token {j}, outside its nucleus"
            counts[r, j] += 1
    for r in range(3):
        for j, p in nuclei[r].items():
            assert abs(counts[r, j].item() / 600 - p) < 0.08
