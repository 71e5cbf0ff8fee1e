"""What one step keeps in memory, op by op, inside the layers: the tensors a training forward saves for the
backward (block by block, then the head and the loss), and what a no-grad forward keeps live at its largest
moments (the FFN product, attention, the logits). The totals, the moments of the peak and the static bytes are
minillama.measuring.memory's, which calls these with its settings `s` (memory._Settings: the resolved options,
named like the model code: N tokens, d, hid, r and c bytes, ...) and its `notes` (one line per term).
The notation is memory.py's (its module docstring)."""

from __future__ import annotations

from dataclasses import dataclass


# ---- 2. the training step: activations saved for backward, block by block ---------------------
def _rmsnorm(s, name: str, x_rg: bool, save) -> bool:
    """RMSNorm.forward in training. kernels.RMSNormFunction keeps only its input x (in the stream's dtype) and
    the fp32 1/rms; x_hat is recomputed in its backward, also when the weight trains. The plain formula
    (kernels=False): pow and the product with rstd keep x's fp32 copy (x itself when r = 4) and rstd when x
    requires grad, and the product with the weight keeps x_hat (r*N*d) when the weight trains."""
    N, d = s.N, s.args.dim
    if s.kernels and (x_rg or s.full):
        save(f"{name}: input x", s.r * N * d, f"N*d*{s.r} (kept by RMSNormFunction)")
        save(f"{name}: rsqrt", 4 * N, "N*4 (fp32 [B,T,1], kept by RMSNormFunction)")
    if not s.kernels and x_rg:  # the checkpointing term finds "input x" when it is the block's own input
        save(f"{name}: {'input x' if s.r == 4 else 'fp32 copy of x'}", 4 * N * d, "N*d*4 (kept by pow and * rstd)")
        save(f"{name}: rsqrt", 4 * N, "N*4 (fp32 [B,T,1], kept by * rstd)")
    if not s.kernels and s.full:
        save(f"{name}: x_hat", s.r * N * d, f"N*d*{s.r} (kept by weight * x_hat)")
    return x_rg or s.full


def _linear_inputs(s, src: str, x_bytes: int, x_rg: bool, names, save, already_saved=False) -> dict:
    """What F.linear (and LoRA's A/B) keep of their input; returns {name: output requires grad}."""
    N, out_rg, shared = s.N, {}, False
    for nm in names:
        fin = s.shapes[nm][0]
        if s.full:  # base weight trainable: the input is kept for the weight's gradient
            cast = s.c  # autocast casts the input to bf16/fp16 (a copy per call when it is not already)
            if cast == x_bytes:
                shared = True
            else:
                save(f"{nm}: autocast copy of {src}", cast * N * fin, f"N*{fin}*{cast} (kept by F.linear)")
        # a frozen base weight (LoRA, 4-bit) keeps no input: bitsandbytes' MatMul4Bit keeps only the
        # packed weight; F.linear with a frozen weight keeps the weight, which is a parameter
        if nm in s.targets:
            cast = 2 if s.amp else s.lb  # PEFT casts x to lora_A's dtype; autocast to bf16/fp16
            if s.lora["dropout"] > 0:
                save(f"{nm}.lora dropout mask", N * fin, f"N*{fin}*1 (bool, kept by native_dropout)")
                save(f"{nm}.lora_A input (dropped out)", cast * N * fin, f"N*{fin}*{cast} (kept by lora_A)")
            elif cast == x_bytes:
                shared = True
            else:
                save(f"{nm}.lora_A: cast copy of {src}", cast * N * fin, f"N*{fin}*{cast} (kept by lora_A)")
            ab = 2 if s.amp else s.lb
            save(f"{nm}.lora_B input (A x)", ab * N * s.lora["r"], f"N*r*{ab} (kept by lora_B)")
        out_rg[nm] = x_rg or s.full or nm in s.targets
    if shared and not already_saved:
        fin = s.shapes[names[0]][0]
        save(f"{src} (input of {'/'.join(names)})", x_bytes * N * fin, f"N*{fin}*{x_bytes} (kept by the linears)")
    return out_rg


def _attention_saved(s, x_rg: bool, save) -> bool:
    """What Attention.forward keeps of attention_norm(x) (x_rg: it requires grad); returns whether the
    output of wo requires grad. SDPA keeps q, k, v (c*N*Hq, 2*c*N*Hkv), its output c*N*Hq and the fp32
    logsumexp 4*B*H*T; the math path keeps q, k and v at n_heads, the fp32 softmax 4*B*H*T*T and the mask."""
    a = s.args
    N, B, T, c = s.N, s.B, s.T, s.c
    H, hq, hkv = a.n_heads, a.n_heads * a.head_dim, a.n_kv_heads * a.head_dim
    qkv_rg = _linear_inputs(s, "attention_norm(x)", s.r, x_rg, ("wq", "wk", "wv"), save)
    # RoPE keeps only cos/sin (its multiplications by cos/sin need no q, k: cos/sin need no grad);
    # the rotated q, k are new tensors (torch.stack of the fp32 halves, cast back with type_as)
    any_rg = any(qkv_rg.values())
    if s.attn_impl == "sdpa":
        # torch 2.13 on CPU picks _scaled_dot_product_flash_attention_for_cpu for fp32 and bf16, also with
        # enable_gqa (k, v are not repeated); it keeps q, k, v, its output and the fp32 logsumexp, as the
        # CUDA flash / memory-efficient kernels do (their lse may be padded; not modelled)
        if any_rg:
            save("SDPA: q after RoPE", c * N * hq, f"N*{hq}*{c}")
            save("SDPA: k after RoPE", c * N * hkv, f"N*{hkv}*{c}")
            save("SDPA: v", c * N * hkv, f"N*{hkv}*{c}")
            save("SDPA: output (also wo's input: transpose+reshape is a view)", c * N * hq, f"N*{hq}*{c}")
            save("SDPA: logsumexp", 4 * B * H * T, "B*n_heads*T*4 (fp32)")
        return _linear_inputs(s, "attention output", c, any_rg, ("wo",), save, already_saved=any_rg)["wo"]
    # Attention.math_attention, written out
    if any_rg:
        probs = B * H * T * T
        save("math attention: q (reshaped copy for the batched matmul)", c * N * hq, f"N*{hq}*{c}")
        save("math attention: k repeated to n_heads, or a contiguous copy (kept by q @ k^T)", c * N * hq,
             f"N*{hq}*{c}")
        save("math attention: softmax output (fp32)", 4 * probs, "B*n_heads*T*T*4 (kept by softmax)")
        if c < 4:
            save("math attention: probabilities cast back", c * probs, f"B*n_heads*T*T*{c} (kept by probs @ v)")
        save("math attention: v repeated to n_heads, or a contiguous copy (kept by probs @ v)", c * N * hq,
             f"N*{hq}*{c}")
        save("math attention: ~mask", T * T, "T*T*1 (bool, kept by masked_fill)")
    # the output [B,H,T,hd] -> transpose(1,2).reshape is a copy, kept by wo if wo needs its input
    return _linear_inputs(s, "attention output (reshaped copy)", c, any_rg, ("wo",), save)["wo"]


def _block_saved(s, x_rg: bool) -> tuple[list, bool, int]:
    """Saved-for-backward terms of one TransformerBlock in forward order, whether its output requires
    grad, and the bytes of p = silu(w1 x) * w3 x if it is saved (freed first in the block's backward).
    FFN: silu_mul keeps w1 x and w3 x (c*N*hid each), w2 keeps p unless SiLUMulLinear recomputes it; the plain
    formula (kernels=False) keeps silu(w1 x) as well, and w2 keeps p."""
    N, c, hid = s.N, s.c, s.args.ffn_hidden_dim
    terms = []

    def save(name, n, formula):
        terms.append((name, int(n), formula))

    # h = x + attention(attention_norm(x))
    n1_rg = _rmsnorm(s, "attention_norm", x_rg, save)
    wo_rg = _attention_saved(s, n1_rg, save)
    h_rg = x_rg or wo_rg
    # out = h + feed_forward(ffn_norm(h)); FeedForward: w2(silu(w1 x) * w3 x)
    n2_rg = _rmsnorm(s, "ffn_norm", h_rg, save)
    f_rg = _linear_inputs(s, "ffn_norm(h)", s.r, n2_rg, ("w1", "w3"), save)
    if f_rg["w1"] or f_rg["w3"]:  # kernels.silu_mul keeps w1 x and w3 x (silu(w1 x) is recomputed in backward)
        save(f"FFN: w1 x (kept by {'silu_mul' if s.kernels else 'silu'})", c * N * hid, f"N*{hid}*{c}")
        save(f"FFN: w3 x (kept by {'silu_mul' if s.kernels else 'the product'})", c * N * hid, f"N*{hid}*{c}")
        if not s.kernels:
            save("FFN: silu(w1 x) (kept by the product)", c * N * hid, f"N*{hid}*{c}")
    n_before = len(terms)
    if s.kernels and s.full and not s.checkpointing:  # a plain trainable w2 runs in model.SiLUMulLinear, which recomputes p in
        # its backward: nothing more kept (a checkpointed block keeps the plain way: FeedForward.recompute_product)
        w2_rg = {"w2": True}
    else:
        w2_rg = _linear_inputs(s, "FFN product p", c, f_rg["w1"] or f_rg["w3"], ("w2",), save)
    p_bytes = sum(t[1] for t in terms[n_before:])  # all released once w2 (and its LoRA) ran backward
    return terms, h_rg or w2_rg["w2"], p_bytes


def _head_saved(s, x_rg: bool) -> list[tuple[str, int, str]]:
    """Saved-for-backward terms of the final norm and of the loss (x_rg: the last block's output requires
    grad). With kernels the loss is kernels.linear_cross_entropy: it computes its gradients in the forward and
    keeps only them: d loss / d norm(h) (r*N*d, when norm(h) requires grad) and, when the head trains,
    d loss / d weight in fp32 (4*V*d). The plain loss (Transformer.loss) keeps every chunk's fp32 logits
    (4*N*V, for logsumexp), with the logsumexp, target indices and mask (13*N), and the head keeps its
    input norm(h) when it trains (its autocast copy c*N*d under AMP)."""
    N, d, V, r = s.N, s.args.dim, s.args.vocab_size, s.r
    head: list[tuple[str, int, str]] = []

    def hsave(name, n, formula):
        head.append((name, int(n), formula))

    nf_rg = _rmsnorm(s, "norm (final)", x_rg, hsave)
    if not s.kernels:
        if s.full:
            c = s.c if s.amp else r
            hsave("loss: the head's input norm(h)", c * N * d, f"N*{d}*{c} (kept by the output head)")
        if nf_rg or s.full:
            hsave("loss: fp32 logits of every chunk", 4 * N * V, f"N*{V}*4 (kept by logsumexp)")
            hsave("loss: logsumexp, target indices, mask", 13 * N, "N*(4+8+1) (kept by the loss's ops)")
        return head
    if nf_rg or s.full:
        hsave("loss: gradient w.r.t. norm(h)", r * N * d, f"N*{d}*{r} (kept by linear_cross_entropy)")
    if s.full:
        hsave("loss: gradient w.r.t. the head's weight (fp32)", 4 * V * d, f"{V}*{d}*4 (kept by linear_cross_entropy)")
    return head


def loss_chunk_bytes(s) -> tuple[int, str]:
    """linear_cross_entropy's transient for one chunk of Nc positions (model.loss_chunk(N, V)): the
    chunk's logits c*Nc*V, their fp32 copy 4*Nc*V when c < 4 (the softmax and its gradient are made in place),
    and, when c < 4, the gradient cast back to the weight's dtype for the matrix products c*Nc*V."""
    from ..model import loss_chunk

    V, c = s.args.vocab_size, s.c
    nc = min(s.N, loss_chunk(s.N, V))
    n = c * nc * V + (4 * nc * V + c * nc * V if c < 4 else 0)
    return n, f"{nc}*{V}*{c} (one chunk of logits)" + (f" + {nc}*{V}*4 (fp32) + {nc}*{V}*{c} (gradient cast)"
                                                      if c < 4 else "")


def _amp_weight_copies(s, block_in_rg: list[bool]) -> tuple[list[int], int]:
    """Bytes of the autocast (bf16/fp16) weight copies kept for backward, per block and for the head.
    Under autocast every F.linear runs on a low-precision copy of its fp32 weight; copies of trainable
    leaf weights are cached by autocast for the whole forward, and every linear whose input requires
    grad keeps its weight copy for the input's gradient."""
    L = s.args.n_layers
    if not s.amp or s.quant4:
        return [0] * L, 0
    numel = {n: i * o for n, (i, o) in s.shapes.items()}
    head = 2 * s.args.vocab_size * s.args.dim
    if s.full:
        return [2 * sum(numel.values())] * L, head
    out, rr, sh = [], s.lora["r"], s.shapes
    lora_copy = 2 * sum(rr * (sh[t][0] + sh[t][1]) for t in s.targets)
    for rg in block_in_rg:  # which base linears see an input that requires grad (frozen base: per call)
        qkv = rg
        wo = qkv or any(t in s.targets for t in ("wq", "wk", "wv"))
        w13 = wo or "wo" in s.targets
        w2 = w13 or "w1" in s.targets or "w3" in s.targets
        kept = {"wq": qkv, "wk": qkv, "wv": qkv, "wo": wo, "w1": w13, "w3": w13, "w2": w2}
        out.append(2 * sum(numel[n] for n, k in kept.items() if k) + lora_copy)
    return out, head


@dataclass
class Saved:
    """What a training forward leaves for the backward."""
    blocks: list  # per block: (its terms, bytes freed with the FFN product p, whether its input requires grad)
    amp_blocks: list[int]  # autocast weight copies kept per block
    amp_head: int  # autocast copy of the output head
    terms: list  # the activations category, term by term: (name, bytes, formula)

    @property
    def total(self) -> int:
        return sum(t[1] for t in self.terms)

    @property
    def per_block(self) -> list[int]:
        return [sum(t[1] for t in terms) for terms, _, _ in self.blocks]


def saved_for_backward(s, notes) -> Saved:
    """activations = the blocks' saved tensors (or, with checkpointing, only their inputs) + the AMP weight
    copies + the head's and the loss's saved tensors + RoPE's cos and sin (2 * T*head_dim/2*4, fp32)."""
    a = s.args
    blocks, x_rg = [], s.full  # the embedding's output requires grad iff the embedding trains
    for _ in range(a.n_layers):
        terms, out_rg, p_bytes = _block_saved(s, x_rg)
        blocks.append((terms, p_bytes, x_rg))
        x_rg = out_rg
    head = _head_saved(s, x_rg)
    amp_blocks, amp_head = _amp_weight_copies(s, [b[2] for b in blocks])
    act_terms = checkpointed_inputs(s) if s.checkpointing else _merged_block_terms(blocks, amp_blocks)
    act_terms += head
    act_terms.append(("RoPE cos, sin", s.cos_sin, f"2 * T*{a.head_dim // 2}*4 (fp32, kept by the RoPE products)"))
    if amp_head:
        act_terms.append(("autocast copy of the output head", amp_head, f"{a.vocab_size}*{a.dim}*2 (kept by F.linear)"))
    for name, n, formula in act_terms:
        notes.add(f"activations: {name}", n, formula)
    return Saved(blocks, amp_blocks, amp_head, act_terms)


def checkpointed_inputs(s) -> list[tuple[str, int, str]]:
    """Checkpointing term: non-reentrant torch.utils.checkpoint keeps each block's input (the stream x;
    cos and sin are shared) for the recomputation, and nothing that the block's ops would save: L * r*N*d."""
    L, d, r = s.args.n_layers, s.args.dim, s.r
    return [("checkpointed block inputs", L * r * s.N * d, f"{L} * N*{d}*{r} (held for recomputation)")]


def _merged_block_terms(blocks: list, amp_blocks: list[int]) -> list[tuple[str, int, str]]:
    """Without checkpointing: every block's terms, the same term of all blocks summed into one line
    ("k * formula"), then the autocast weight copies of all blocks."""
    merged: dict[str, list] = {}
    for terms, _, _ in blocks:
        for name, n, formula in terms:
            m = merged.setdefault(name, [0, formula, 0])
            m[0] += n
            m[2] += 1
    out = [(f"blocks: {name}", n, f"{k} * {formula}") for name, (n, formula, k) in merged.items()]
    if sum(amp_blocks):
        out.append(("autocast copies of the blocks' weights", sum(amp_blocks),
                    "2 * weights of each linear whose copy is kept (autocast cache / F.linear)"))
    return out


# ---- 3. the inference peak: what a no-grad forward keeps live, op by op ---------------------
def autocast_cache(s, n_weights: int) -> int:
    """AMP term: under autocast the bf16/fp16 casts of trainable leaf weights are cached until autocast
    exits, also under no_grad: 2 bytes per weight of the linears run so far (0 without amp, or when the
    base weights are frozen)."""
    return 2 * n_weights if (s.amp and s.full) else 0


def ffn_live(s, notes) -> dict[str, int]:
    """FFN product: 3*r*N*d (x, h, n2) + 3*c*N*hid (silu(w1 x), w3 x, their product); LoRA on w3 (PEFT's
    out-of-place form) adds one c*N*hid. (A 4-bit w3's dequantised weight: memory._dequant_ffn_moment.)"""
    a = s.args
    N, d, hid, r, c, L = s.N, a.dim, a.ffn_hidden_dim, s.r, s.c, a.n_layers
    ffn = 3 * r * N * d + 3 * c * N * hid  # x, h, n2 + silu(w1 x), w3 x, and their product
    if "w3" in s.targets:  # LoRA w3 (PEFT's out-of-place form): silu(w1 x) beside base(x),
        ffn += c * N * hid  # scaling * B(A x) and their sum: one [N, hid] more than the product
    live = {"FFN product (inference)": ffn + autocast_cache(s, L * s.per_layer_linear - d * hid)}
    lora_w3 = "; LoRA on w3: base + scaled B(A x) + sum" if "w3" in s.targets else ""
    notes.add("temporary: FFN product moment", ffn, f"3*N*{d}*{r} (x, h, ffn_norm(h)) + {3 + ('w3' in s.targets)}"
              f"*N*{hid}*{c} (silu(w1 x), w3 x, product{lora_w3})")
    return live


def attention_live(s, notes) -> dict[str, int]:
    """SDPA, at wo: 2*r*N*d (x, attention_norm(x)) + c*N*(2*Hq + 2*Hkv) (q, k, v, output) + 4*B*H*T (lse)
    + c*N*d (wo's output). Math path, at the softmax: q, k, v, k and v repeated to n_heads (copies unless
    n_kv_heads == n_heads), the T*T mask, and the [B,H,T,T] scores with their softmax."""
    a = s.args
    N, B, T, d, r, c, L, sh = s.N, s.B, s.T, a.dim, s.r, s.c, a.n_layers, s.shapes
    hq, hkv = a.n_heads * a.head_dim, a.n_kv_heads * a.head_dim
    attn = 2 * r * N * d + c * N * (2 * hq + 2 * hkv) + 4 * B * a.n_heads * T + c * N * d
    attn_cache = (L - 1) * s.per_layer_linear + sum(sh[n][0] * sh[n][1] for n in ("wq", "wk", "wv", "wo"))
    live = {"attention output projection": attn + autocast_cache(s, attn_cache)}
    notes.add("temporary: attention moment", attn, f"2*N*{d}*{r} (x, attention_norm(x)) + N*(2*{hq}+2*{hkv})*{c} "
              f"(q, k, v after RoPE, SDPA output) + lse + N*{d}*{c} (wo output)")
    if s.attn_impl == "math":
        # fp32 scores -> `scores` (masked) and the softmax output live together, then probs @ v's output;
        # in bf16/fp16 the softmax runs on an fp32 copy of the scores (scores c + fp32 copy + fp32 probs)
        probs = B * a.n_heads * T * T
        rep = 2 * c * N * hq if a.n_kv_heads != a.n_heads else 0
        sm = 8 * probs + c * N * hq if c == 4 else (c + 8) * probs
        m_attn = 2 * r * N * d + c * N * (hq + 2 * hkv) + rep + T * T + sm
        live["math attention softmax"] = m_attn + autocast_cache(s, attn_cache - sh["wo"][0] * sh["wo"][1])
        notes.add("temporary: math attention moment", m_attn,
                  f"2*N*{d}*{r} + N*({hq}+2*{hkv})*{c} (q,k,v) + repeated k,v + T*T mask + scores and softmax "
                  f"({'8*B*H*T*T + output' if c == 4 else f'{c + 8}*B*H*T*T'})")
    return live


def logits_live(s, notes) -> int:
    """Logits: r*N*d (norm(h)) + c*N*V (+ 2*N*d, autocast's copy of norm(h)); eval computes the loss instead
    (linear_cross_entropy): norm(h) and one chunk of logits (loss_chunk_bytes), never all of them."""
    a = s.args
    N, d, V, r, c = s.N, a.dim, a.vocab_size, s.r, s.c
    if s.mode == "eval":
        chunk, formula = loss_chunk_bytes(s)
        logits = r * N * d + chunk + (2 * N * d if s.amp else 0)
        notes.add("temporary: loss moment", logits, f"N*{d}*{r} (norm(h)) + {formula}")
    else:
        logits = r * N * d + c * N * V + (2 * N * d if s.amp else 0)  # + autocast's copy of norm(h)
        notes.add("temporary: logits moment", logits, f"N*{d}*{r} (norm(h)) + N*{V}*{c} (logits)")
    return logits + autocast_cache(s, a.n_layers * s.per_layer_linear + V * d)
