"""Analytic memory model: predicted bytes of one training or inference step, by category.

    est = estimate_memory(get_preset("tiny"), batch=4, seq_len=256)          # fp32, AdamW, train
    est.peak_bytes, est.peak_moment, est.by_category, est.at_peak
    print("\\n".join(est.notes))                                             # every term with its formula

Nothing here is fitted to a measurement. Every term is counted from what THIS implementation
(minillama/model.py, rope.py, train.py) allocates and what autograd SAVES for the backward pass,
op by op; the comments next to each term name the op that keeps it. `minillama.measuring.measure.MemoryTracker`
counts the same thing (live tensor storages), so the two can be compared row by row
(`minillama.measuring.bench` puts both in every benchmark row).

Notation: N = batch * seq_len tokens; d = dim; Hq = n_heads * head_dim (= d); Hkv = n_kv_heads * head_dim;
hid = FFN width; V = vocab_size; r = bytes of the residual stream (4 with amp: fp32 master weights make
the stream fp32); c = bytes of what linears and attention produce (2 under amp, else the param dtype).

Categories (the same as MemoryTracker's):
  parameters       the model's weights (4-bit packed weights and their constants included), LoRA weights
  gradients        .grad of every trainable parameter (dtype of the parameter)
  optimizer_state  AdamW moments (+ the per-tensor `step` counters on CPU), 8-bit states and absmax
  activations      tensors autograd saves for backward, alive at the end of the forward pass
  temporary        the transient alive at the peak moment besides the above (logits gradients,
                   AdamW's sqrt/div temporaries, a layer's intermediates in inference)

Moments. Memory is not the sum of the categories: the peak is the largest of a few moments of the step,
each with its own live set (`MemoryEstimate.moments`):
  train:     "cross-entropy backward" (all activations + 2 fp32 [N, V] gradients: nll_loss's and
             log_softmax's), "cross-entropy forward", "backward of the last block", "optimizer step"
             (parameters + gradients + state + AdamW temporaries). Gradients are None during forward
             and backward when the step zeroes them with set_to_none before the next forward (bench.py);
             train.py zeroes them after the forward, so there last step's gradients live during the
             forward (grads_in_forward=True); with grad_accum > 1 they live throughout.
  inference: parameters + the largest live set inside the forward: the FFN's product (3 [N, hid]),
             the attention output projection, or the logits.

Units: bytes everywhere; `format_bytes` prints MiB / GiB (1024**2, 1024**3 bytes), labelled as such.

The Llama-3-8B budget of the QLoRA report (REFERENCE.md) is rebuilt by `llama3_8b_budget()`; the report
prints GiB and calls them GB, rounds the parameter count to 8.1e9 (it is 8,030,261,248) and uses two
shortcuts that the exact counts here do not share (see the notes of each row).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

from ..config import ModelArgs, get_preset

CATEGORIES = ("parameters", "gradients", "optimizer_state", "activations", "temporary")
MODES = ("train", "inference", "eval")  # eval: a no-grad forward that also computes the loss
OPTIMIZERS = ("adamw", "adamw8bit", "paged_adamw8bit", "sgd")
AMP_DTYPES = (None, "fp16", "bf16")
LINEARS = ("wq", "wk", "wv", "wo", "w1", "w2", "w3")  # module registration order inside a block
QUANT_TYPES = ("nf4", "fp4")
DTYPE_BYTES = {"fp32": 4, "float32": 4, "bf16": 2, "bfloat16": 2, "fp16": 2, "float16": 2}

BNB_MIN_8BIT_SIZE = 4096  # bitsandbytes keeps 32-bit states for tensors smaller than this
BNB_OPT_BLOCK = 256  # bitsandbytes' blockwise 8-bit optimizer states: one fp32 absmax per 256 values
BNB_QMAP_BYTES = 2 * 256 * 4  # the two 256-entry fp32 quantisation maps, shared by all tensors
GiB, MiB, KiB = 1024**3, 1024**2, 1024


# ---- small helpers ----------------------------------------------------------------------------
def format_bytes(n) -> str:
    """Bytes as text with 1024-based units: "512 B", "1.50 KiB", "12.34 MiB", "1.23 GiB"."""
    n = int(n)
    sign, a = ("-" if n < 0 else ""), abs(n)
    if a < KiB:
        return f"{sign}{a} B"
    for unit, div in (("GiB", GiB), ("MiB", MiB), ("KiB", KiB)):
        if a >= div:
            return f"{sign}{a / div:.2f} {unit}"
    raise AssertionError("unreachable")


def _dtype_bytes(name, what: str) -> int:
    if name not in DTYPE_BYTES:
        raise ValueError(f"estimate_memory: {what}={name!r} is unknown: expected one of {sorted(DTYPE_BYTES)}.")
    return DTYPE_BYTES[name]


def _linear_shapes(args: ModelArgs) -> dict[str, tuple[int, int]]:
    """(in_features, out_features) of the seven linears of one block."""
    d, hq, hkv, hid = args.dim, args.n_heads * args.head_dim, args.n_kv_heads * args.head_dim, args.ffn_hidden_dim
    return {"wq": (d, hq), "wk": (d, hkv), "wv": (d, hkv), "wo": (hq, d), "w1": (d, hid), "w2": (hid, d),
            "w3": (d, hid)}


def _lora_targets(lora) -> tuple[str, ...]:
    targets = lora.get("targets", ("wq", "wv"))
    if targets == "all":
        return LINEARS
    if isinstance(targets, str):
        targets = (targets,)
    bad = [t for t in targets if t not in LINEARS]
    if bad or not targets:
        raise ValueError(f"estimate_memory: lora targets {targets!r} are invalid: expected \"all\" or names "
                         f"from {LINEARS}.")
    return tuple(t for t in LINEARS if t in targets)  # registration order


def _check_lora(lora) -> Optional[dict]:
    if lora is None:
        return None
    if not isinstance(lora, dict):
        raise ValueError(f"estimate_memory: lora={lora!r} is invalid: expected None or a dict like "
                         f"{{'r': 8, 'targets': ('wq', 'wv')}}.")
    r = lora.get("r", 8)
    if not isinstance(r, int) or isinstance(r, bool) or r <= 0:
        raise ValueError(f"estimate_memory: lora r={r!r} is invalid: expected a positive integer.")
    dropout = float(lora.get("dropout", 0.0))
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"estimate_memory: lora dropout={dropout!r} is invalid: expected 0 <= dropout < 1.")
    return {"r": r, "targets": _lora_targets(lora), "dtype": lora.get("dtype"), "dropout": dropout}


# ---- parameter counts ---------------------------------------------------------------------------
def parameter_count(args: ModelArgs, lora=None) -> dict:
    """{"total", "trainable", "lora", "base"}: the model's parameters (args.num_params(), the same as
    summing numel over minillama.Transformer(args)) plus LoRA's r*(in+out) per targeted linear per layer
    (A is [r, in], B is [out, r]). With LoRA only the adapters are trainable.

    Llama-2-7B: 6,738,415,616; q/v r=8 adds 4,194,304; all seven linears r=8 add 19,988,480."""
    lora = _check_lora(lora)
    base = args.num_params()
    n_lora = 0
    if lora is not None:
        shapes = _linear_shapes(args)
        n_lora = args.n_layers * sum(lora["r"] * (shapes[t][0] + shapes[t][1]) for t in lora["targets"])
    return {"total": base + n_lora, "trainable": n_lora if lora is not None else base, "lora": n_lora,
            "base": base}


def _param_tensors(args: ModelArgs) -> list[tuple[str, int]]:
    """(name, numel) of every parameter in model.parameters() order."""
    shapes = _linear_shapes(args)
    out = [("tok_embeddings.weight", args.vocab_size * args.dim)]
    for i in range(args.n_layers):
        out.append((f"layers.{i}.attention_norm.weight", args.dim))
        out += [(f"layers.{i}.attention.{n}.weight", shapes[n][0] * shapes[n][1]) for n in ("wq", "wk", "wv", "wo")]
        out.append((f"layers.{i}.ffn_norm.weight", args.dim))
        out += [(f"layers.{i}.feed_forward.{n}.weight", shapes[n][0] * shapes[n][1]) for n in ("w1", "w2", "w3")]
    out += [("norm.weight", args.dim), ("output.weight", args.vocab_size * args.dim)]
    return out


def _trainable_groups(args: ModelArgs, lora) -> list[list[int]]:
    """numel of the trainable tensors per optimizer param group, in the order
    minillama.training.train.make_optimizer builds them (decay: tensors with dim >= 2, then no_decay)."""
    if lora is None:
        tensors = _param_tensors(args)
        decay = [n for name, n in tensors if not name.endswith("norm.weight")]
        no_decay = [n for name, n in tensors if name.endswith("norm.weight")]
        return [decay, no_decay]
    shapes = _linear_shapes(args)
    r = lora["r"]
    order = [x for _ in range(args.n_layers) for t in lora["targets"]
             for x in (r * shapes[t][0], shapes[t][1] * r)]  # lora_A [r, in], then lora_B [out, r]
    return [order, []]


def _quant4_bytes(numel: int, blocksize: int, double_quant: bool) -> int:
    """Bytes of one bitsandbytes 4-bit weight: two codes per byte, plus its quant_state.
    double_quant: uint8 absmax per block, fp32 absmax per 256 absmax, the 256-entry fp32 map and an
    fp32 offset; else fp32 absmax per block. Plus the 16-entry fp32 code book (nf4/fp4)."""
    blocks = -(-numel // blocksize)
    packed = -(-numel // 2)
    if double_quant:
        consts = blocks + 4 * -(-blocks // 256) + 256 * 4 + 4
    else:
        consts = 4 * blocks
    return packed + consts + 16 * 4


# ---- the estimate -------------------------------------------------------------------------------
@dataclass
class MemoryEstimate:
    by_category: dict[str, int]  # bytes, keys = CATEGORIES; each category's full size (see at_peak)
    peak_bytes: int  # the largest of `moments`
    static_bytes: int  # parameters + gradients + optimizer_state
    notes: list[str]  # one line per term: the formula used
    peak_moment: str = ""  # which moment of the step the peak is
    at_peak: dict[str, int] = field(default_factory=dict)  # bytes per category live at the peak (sums to peak)
    moments: dict[str, int] = field(default_factory=dict)  # every modelled moment -> live bytes

    def table(self) -> str:
        """A small text table: category, full size, live at the peak (MiB = 1024**2 bytes)."""
        lines = [f"{'category':<16}{'size MiB':>12}{'at peak MiB':>14}"]
        for c in CATEGORIES:
            lines.append(f"{c:<16}{self.by_category[c] / MiB:>12.2f}{self.at_peak.get(c, 0) / MiB:>14.2f}")
        lines.append(f"{'peak':<16}{'':>12}{self.peak_bytes / MiB:>14.2f}   ({self.peak_moment})")
        return "\n".join(lines)


class _Settings:
    """Resolved options, so that the per-op rules read like the model code."""

    def __init__(self, args, batch, seq_len, pb, amp, lora, quant4, attn_impl):
        self.args, self.B, self.T, self.N = args, batch, seq_len, batch * seq_len
        self.pb = pb  # bytes of a parameter
        self.amp = amp is not None
        self.r = 4 if self.amp else pb  # residual stream
        self.c = 2 if self.amp else pb  # linear / attention outputs
        self.lora = lora
        self.targets = set(lora["targets"]) if lora else set()
        self.lb = _dtype_bytes(lora["dtype"], "lora dtype") if lora and lora["dtype"] else pb
        self.quant4 = quant4
        self.full = lora is None and quant4 is None  # base weights trainable
        self.attn_impl = attn_impl
        self.shapes = _linear_shapes(args)


def _rmsnorm(s: _Settings, name: str, x_rg: bool, save) -> bool:
    """RMSNorm.forward: xf = x.float(); xf * rsqrt(xf.pow(2).mean(-1) + eps); .type_as(x); weight * (.)"""
    N, d = s.N, s.args.dim
    if x_rg:
        # pow(2) and xf*rsqrt keep xf: x itself when the stream is fp32, else its fp32 .float() copy
        save(f"{name}: fp32 input x", 4 * N * d, "N*d*4 (kept by xf.pow(2) and xf*rsqrt)")
        save(f"{name}: rsqrt", 4 * N, "N*4 (fp32 [B,T,1], kept by xf*rsqrt)")
    if s.full:  # weight * x_hat keeps x_hat (in the stream's dtype) for the weight's gradient
        save(f"{name}: x_hat", s.r * N * d, f"N*d*{s.r} (kept by weight*x_hat for the weight's grad)")
    return x_rg or s.full


def _linear_inputs(s: _Settings, src: str, x_bytes: int, x_rg: bool, names, save, already_saved=False) -> dict:
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


def _block_saved(s: _Settings, x_rg: bool) -> tuple[list, bool, int]:
    """Saved-for-backward terms of one TransformerBlock in forward order, whether its output requires
    grad, and the bytes of p = silu(w1 x) * w3 x if it is saved (freed first in the block's backward)."""
    a = s.args
    N, B, T, d, c, r = s.N, s.B, s.T, a.dim, s.c, s.r
    H, hd = a.n_heads, a.head_dim
    hq, hkv, hid = H * hd, a.n_kv_heads * hd, a.ffn_hidden_dim
    terms = []

    def save(name, n, formula):
        terms.append((name, int(n), formula))

    # h = x + attention(attention_norm(x))
    n1_rg = _rmsnorm(s, "attention_norm", x_rg, save)
    qkv_rg = _linear_inputs(s, "attention_norm(x)", s.r, n1_rg, ("wq", "wk", "wv"), save)
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
        wo_rg = _linear_inputs(s, "attention output", c, any_rg, ("wo",), save, already_saved=any_rg)
    else:  # Attention.math_attention, written out
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
        wo_rg = _linear_inputs(s, "attention output (reshaped copy)", c, any_rg, ("wo",), save)
    h_rg = x_rg or wo_rg["wo"]
    # out = h + feed_forward(ffn_norm(h)); FeedForward: w2(silu(w1 x) * w3 x)
    n2_rg = _rmsnorm(s, "ffn_norm", h_rg, save)
    f_rg = _linear_inputs(s, "ffn_norm(h)", s.r, n2_rg, ("w1", "w3"), save)
    if f_rg["w1"]:  # silu keeps its input; silu(w1 x) * (w3 x): the grad w.r.t. silu(.) needs w3 x
        save("FFN: w1 x (kept by silu)", c * N * hid, f"N*{hid}*{c}")
        save("FFN: w3 x (kept by the product)", c * N * hid, f"N*{hid}*{c}")
    if f_rg["w3"]:  # ... and its grad w.r.t. w3 x needs silu(w1 x)
        save("FFN: silu(w1 x) (kept by the product)", c * N * hid, f"N*{hid}*{c}")
    n_before = len(terms)
    w2_rg = _linear_inputs(s, "FFN product p", c, f_rg["w1"] or f_rg["w3"], ("w2",), save)
    p_bytes = sum(t[1] for t in terms[n_before:])  # all released once w2 (and its LoRA) ran backward
    return terms, h_rg or w2_rg["w2"], p_bytes


def _amp_weight_copies(s: _Settings, block_in_rg: list[bool]) -> tuple[list[int], int]:
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


def _validate(args, batch, seq_len, mode, param_dtype, amp, optimizer, grad_accum, checkpointing, quant4,
              optimizer_state_dtype, device):
    if not isinstance(args, ModelArgs):
        raise ValueError(f"estimate_memory: args must be a minillama ModelArgs, got {type(args).__name__}.")
    for key, v in (("batch", batch), ("seq_len", seq_len), ("grad_accum", grad_accum)):
        if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
            raise ValueError(f"estimate_memory: {key}={v!r} is invalid: expected a positive integer.")
    if seq_len > args.max_seq_len:
        raise ValueError(f"estimate_memory: seq_len={seq_len} is longer than max_seq_len={args.max_seq_len}.")
    if mode not in MODES:
        raise ValueError(f"estimate_memory: mode={mode!r} is unknown: expected one of {MODES}.")
    _dtype_bytes(param_dtype, "param_dtype")
    if amp not in AMP_DTYPES:
        raise ValueError(f"estimate_memory: amp={amp!r} is unknown: expected one of {AMP_DTYPES}.")
    if amp is not None and DTYPE_BYTES[param_dtype] != 4:
        raise ValueError(f"estimate_memory: amp={amp!r} needs param_dtype='fp32' (autocast keeps fp32 master "
                         f"weights), got {param_dtype!r}.")
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"estimate_memory: optimizer={optimizer!r} is unknown: expected one of {OPTIMIZERS}.")
    if not isinstance(checkpointing, bool):
        raise ValueError(f"estimate_memory: checkpointing={checkpointing!r} is invalid: expected True or False.")
    if optimizer_state_dtype is not None:
        _dtype_bytes(optimizer_state_dtype, "optimizer_state_dtype")
    if not (device == "cpu" or str(device).startswith("cuda")):
        raise ValueError(f"estimate_memory: device={device!r} is unknown: expected 'cpu' or 'cuda'.")
    if quant4 is not None:
        if not isinstance(quant4, dict):
            raise ValueError(f"estimate_memory: quant4={quant4!r} is invalid: expected None or a dict like "
                             f"{{'blocksize': 64, 'double_quant': True, 'quant_type': 'nf4'}}.")
        bs = quant4.get("blocksize", 64)
        if not isinstance(bs, int) or bs <= 0:
            raise ValueError(f"estimate_memory: quant4 blocksize={bs!r} is invalid: expected a positive integer.")
        if quant4.get("quant_type", "nf4") not in QUANT_TYPES:
            raise ValueError(f"estimate_memory: quant4 quant_type={quant4.get('quant_type')!r} is unknown: "
                             f"expected one of {QUANT_TYPES}.")


def estimate_memory(args: ModelArgs, *, batch: int, seq_len: int, mode: str = "train", param_dtype="fp32",
                    amp=None, lora=None, quant4=None, optimizer="adamw", checkpointing=False, grad_accum=1,
                    optimizer_state_dtype=None, device="cpu", foreach=None, grads_in_forward=False
                    ) -> MemoryEstimate:
    """Predicted bytes of one step of `minillama.Transformer(args)` on `batch` x `seq_len` tokens.

    mode: "train" (forward with loss, backward, optimizer.step()), "inference" (a no-grad forward
      returning logits, as bench.py's inference rows), or "eval" (a no-grad forward with the loss).
    param_dtype: dtype of the weights ("fp32", "bf16", "fp16"); amp: None or "bf16"/"fp16" autocast
      (needs fp32 weights: linears then run on a bf16 copy of each weight).
    lora: None or {"r": 8, "targets": ("wq", "wv") or "all", "dtype": None (= param dtype), "dropout": 0.0}:
      base weights, embeddings, norms and the output head frozen; only the adapters train.
    quant4: None or {"blocksize": 64, "double_quant": True, "quant_type": "nf4"}: the 7 linears of every
      block in 4 bits (bitsandbytes layout); embeddings, norms, output head stay in param_dtype.
    optimizer: "adamw" (torch.optim.AdamW; moments in optimizer_state_dtype, default the param dtype, as
      torch does), "adamw8bit" / "paged_adamw8bit" (bitsandbytes), "sgd" (no momentum: no state).
    checkpointing: torch.utils.checkpoint around every block (use_reentrant=False).
    grad_accum: micro-steps per optimizer step (batch is the micro-batch); > 1 keeps gradients alive
      through every forward and backward.
    grads_in_forward: the previous step's gradients still live during the forward (train.py's loop
      calls zero_grad(set_to_none=True) between forward and backward; bench.py after the step).
      Gradient clipping (train.py) adds only one scalar per tensor (torch._foreach_norm) and is not counted.
    device: "cpu" or "cuda" (AdamW is single-tensor on CPU, foreach on CUDA unless `foreach` says;
      AdamW's `step` counters live on the CPU when the model is on CUDA).
    """
    _validate(args, batch, seq_len, mode, param_dtype, amp, optimizer, grad_accum, checkpointing, quant4,
              optimizer_state_dtype, device)
    lora = _check_lora(lora)
    if quant4 is not None:
        quant4 = {"blocksize": quant4.get("blocksize", 64), "double_quant": bool(quant4.get("double_quant", True)),
                  "quant_type": quant4.get("quant_type", "nf4")}
        if mode == "train" and lora is None:
            raise ValueError("estimate_memory: training a 4-bit model needs lora (4-bit base weights are frozen).")
    on_cuda = str(device).startswith("cuda")
    pb = DTYPE_BYTES[param_dtype]
    s = _Settings(args, batch, seq_len, pb, amp, lora, quant4, args.attn_impl)
    a = args
    N, B, T, d, V, L = s.N, batch, seq_len, a.dim, a.vocab_size, a.n_layers
    hq, hkv, hid = a.n_heads * a.head_dim, a.n_kv_heads * a.head_dim, a.ffn_hidden_dim
    r, c = s.r, s.c
    notes: list[str] = [f"N = batch*seq_len = {batch}*{seq_len} = {N} tokens; r = {r} bytes (residual stream), "
                        f"c = {c} bytes (linear/attention outputs); sizes in MiB = 1024**2 bytes."]

    def note(name, nbytes, formula):
        notes.append(f"{name}: {formula} = {format_bytes(nbytes)}")

    # ---- parameters ----
    counts = parameter_count(args, lora)
    per_layer_linear = sum(i * o for i, o in s.shapes.values())
    if quant4:
        q_bytes = L * sum(_quant4_bytes(i * o, quant4["blocksize"], quant4["double_quant"])
                          for i, o in s.shapes.values())
        rest = counts["base"] - L * per_layer_linear
        params = q_bytes + rest * pb
        bits = 8 * q_bytes / (L * per_layer_linear)
        note("parameters: 4-bit linears", q_bytes, f"{L * per_layer_linear:,} weights at {bits:.3f} bits "
             f"({quant4['quant_type']}, blocksize {quant4['blocksize']}, double_quant={quant4['double_quant']})")
        note("parameters: embeddings, norms, output head", rest * pb, f"{rest:,} * {pb}")
    else:
        params = counts["base"] * pb
        note("parameters: model", params, f"{counts['base']:,} * {pb}")
    if lora:
        params += counts["lora"] * s.lb
        note("parameters: LoRA A and B", counts["lora"] * s.lb, f"{counts['lora']:,} * {s.lb} "
             f"(r={lora['r']} on {'/'.join(lora['targets'])}: r*(in+out) per linear per layer)")

    train = mode == "train"
    # ---- gradients and optimizer state ----
    grads = opt = opt_temp = 0
    if train:
        gb = s.lb if lora else pb
        grads = counts["trainable"] * gb
        note("gradients", grads, f"{counts['trainable']:,} trainable * {gb}")
        groups = _trainable_groups(args, lora)
        n_tensors = sum(len(g) for g in groups)
        if optimizer == "adamw":
            sb = _dtype_bytes(optimizer_state_dtype, "optimizer_state_dtype") if optimizer_state_dtype else gb
            opt = 2 * counts["trainable"] * sb
            note("optimizer_state: AdamW exp_avg, exp_avg_sq", opt, f"2 * {counts['trainable']:,} * {sb}")
            if not on_cuda:
                opt += 4 * n_tensors
                note("optimizer_state: AdamW step counters", 4 * n_tensors, f"{n_tensors} tensors * 4 (fp32 scalars)")
            use_foreach = foreach if foreach is not None else on_cuda
            if use_foreach:  # _multi_tensor_adam: exp_avg_sq_sqrt = torch._foreach_sqrt(all of the group)
                opt_temp = max(sum(g) for g in groups) * sb
                note("temporary: AdamW foreach sqrt(exp_avg_sq)", opt_temp, "largest param group's numel * "
                     f"{sb} (torch._foreach_sqrt of the whole group)")
            else:  # _single_tensor_adam, per tensor: denom = (exp_avg_sq.sqrt() / bc).add_(eps): sqrt and
                # div results live together, and the previous tensor's `denom` is still referenced
                opt_temp = sb * max((2 * n + (g[i - 1] if i else 0) for g in groups for i, n in enumerate(g)),
                                    default=0)
                note("temporary: AdamW single-tensor sqrt/div", opt_temp, f"max(2*numel_i + numel_(i-1)) * {sb} "
                     "(sqrt and div of tensor i, denom of tensor i-1)")
        elif optimizer in ("adamw8bit", "paged_adamw8bit"):
            for g in groups:
                for n in g:
                    if n >= BNB_MIN_8BIT_SIZE:
                        opt += 2 * n + 2 * 4 * -(-n // BNB_OPT_BLOCK)
                    else:
                        opt += 2 * 4 * n
            opt += BNB_QMAP_BYTES
            note(f"optimizer_state: {optimizer}", opt, "per tensor: 2 uint8 states + 2 fp32 absmax per 256 values "
                 f"(tensors < {BNB_MIN_8BIT_SIZE} values: 2 fp32 states) + 2 shared 256-entry maps"
                 + ("; paged: unified memory, evicted to the CPU only under memory pressure (MemoryTracker "
                    "does not see paged buffers)" if optimizer.startswith("paged") else ""))
        else:
            note("optimizer_state: SGD without momentum", 0, "0")
            # weight decay on the matrices (as make_optimizer sets it): grad.add(param, alpha=wd) is a new
            # tensor per parameter (single-tensor), or one for the whole group (foreach)
            use_foreach = foreach if foreach is not None else on_cuda
            opt_temp = (sum(groups[0]) if use_foreach else max(groups[0], default=0)) * gb
            note("temporary: SGD weight decay (grad + wd * param)", opt_temp,
                 f"{'numel of the decay group' if use_foreach else 'largest decayed tensor'} * {gb}")

    # ---- activations (train): what autograd saves, block by block ----
    cos_sin = 2 * T * (a.head_dim // 2) * 4  # rope_cos_sin: fp32 [T, head_dim/2] each
    positions = 8 * T  # torch.arange positions, int64
    blocks = []  # per block: (terms, p_bytes, input requires grad)
    x_rg = s.full  # the embedding's output requires grad iff the embedding trains
    for _ in range(L):
        terms, out_rg, p_bytes = _block_saved(s, x_rg)
        blocks.append((terms, p_bytes, x_rg))
        x_rg = out_rg
    head: list[tuple[str, int, str]] = []

    def hsave(name, n, formula):
        head.append((name, int(n), formula))

    nf_rg = _rmsnorm(s, "norm (final)", x_rg, hsave)
    if s.full:
        if s.amp:
            hsave("output: autocast copy of norm(h)", 2 * N * d, f"N*{d}*2 (kept by F.linear)")
        else:
            hsave("output: norm(h)", r * N * d, f"N*{d}*{r} (kept by F.linear for the weight's grad)")
    if nf_rg or s.full:
        hsave("cross_entropy: log_softmax output (fp32)", 4 * N * V, f"N*{V}*4 (kept by log_softmax)")
        hsave("cross_entropy: targets", 8 * N, "N*8 (int64, kept by nll_loss)")
    amp_blocks, amp_head = _amp_weight_copies(s, [b[2] for b in blocks])
    act_blocks = [sum(t[1] for t in terms) for terms, _, _ in blocks]
    act_terms: list[tuple[str, int, str]] = []
    if checkpointing:
        # non-reentrant torch.utils.checkpoint keeps each block's inputs (the stream x; cos and sin are
        # shared) for the recomputation, and nothing that the block's ops would save
        act_terms.append(("checkpointed block inputs", L * r * N * d, f"{L} * N*{d}*{r} (held for recomputation)"))
    else:
        merged: dict[str, list] = {}
        for terms, _, _ in blocks:
            for name, n, formula in terms:
                m = merged.setdefault(name, [0, formula, 0])
                m[0] += n
                m[2] += 1
        act_terms += [(f"blocks: {name}", n, f"{k} * {formula}") for name, (n, formula, k) in merged.items()]
        if sum(amp_blocks):
            act_terms.append(("autocast copies of the blocks' weights", sum(amp_blocks),
                              "2 * weights of each linear whose copy is kept (autocast cache / F.linear)"))
    act_terms += head
    act_terms.append(("RoPE cos, sin", cos_sin, f"2 * T*{a.head_dim // 2}*4 (fp32, kept by the RoPE products)"))
    if amp_head:
        act_terms.append(("autocast copy of the output head", amp_head, f"{V}*{d}*2 (kept by F.linear)"))
    activations = sum(t[1] for t in act_terms) if train else 0
    if train:
        for name, n, formula in act_terms:
            note(f"activations: {name}", n, formula)

    moments: dict[str, dict[str, int]] = {}
    grads_fwd = grads if grad_accum > 1 else 0  # set_to_none zeroing: no .grad during forward/backward
    if train:
        base = {"parameters": params, "gradients": grads_fwd, "optimizer_state": opt}
        fwd_grads = grads if grads_in_forward else grads_fwd
        # the end of the forward: log_softmax's output is allocated while the logits (and, in bf16/fp16,
        # their fp32 .float() copy) still live
        logits_tmp = c * N * V + (4 * N * V if c < 4 else 0) + positions
        if checkpointing:  # autocast's cache still holds the blocks' weight copies until autocast exits
            logits_tmp += sum(amp_blocks) if s.full else 0
        moments["cross-entropy forward (end of forward)"] = {**base, "gradients": fwd_grads,
                                                              "activations": activations, "temporary": logits_tmp}
        # the first ops of the backward: nll_loss_backward's fp32 [N, V] grad and log_softmax_backward's
        # fp32 [N, V] grad, beside every saved tensor (the log_softmax output included)
        moments["cross-entropy backward (start of backward)"] = {**base, "activations": activations,
                                                                 "temporary": 2 * 4 * N * V}
        # the backward of block i: the head's saved tensors are gone; gradients of the head and of the
        # blocks above exist, plus w2's of this block; activations of blocks <= i remain (with
        # checkpointing: their inputs, plus block i recomputed). Transient at the FFN product's backward:
        # the incoming grad [N, d] and grad_p, grad_silu, grad_w3x (3 [N, hid]); p and w2's autocast copy
        # are freed by then. Memory is linear in i, so the two ends bound every block.
        gl = (per_layer_linear + 2 * d) * pb if s.full else (counts["lora"] // L) * s.lb
        g_w2 = d * hid * pb if s.full else (s.lora["r"] * (d + hid) * s.lb if "w2" in s.targets else 0)
        g_head = (V * d + d) * pb if s.full else 0
        amp_w2 = 2 * d * hid if (s.amp and amp_blocks[0]) else 0
        for i, label in ((L - 1, "backward of the last block"), (0, "backward of the first block")):
            terms, p_i, _ = blocks[i]
            if checkpointing:
                shared_x = sum(t[1] for t in terms if t[0] == "attention_norm: fp32 input x") if r == 4 else 0
                act = (i + 1) * r * N * d + act_blocks[i] - shared_x + amp_blocks[i]
            else:
                act = sum(act_blocks[: i + 1]) + sum(amp_blocks[: i + 1])
            act += cos_sin - p_i - amp_w2
            tmp = r * N * d + 3 * c * N * hid
            if quant4 and on_cuda:  # w2's backward runs on a dequantised copy of its weight beside grad_p
                tmp = max(tmp, r * N * d + c * N * hid + c * d * hid)
            g = g_head + (L - 1 - i) * gl + g_w2
            if grad_accum > 1:  # .grad exists already: each new gradient is a transient added in place
                g = grads
                tmp += max((n for grp in _trainable_groups(args, lora) for n in grp), default=0) * gb
            moments[label] = {**base, "gradients": g, "activations": act, "temporary": tmp}
        moments["optimizer step"] = {"parameters": params, "gradients": grads, "optimizer_state": opt,
                                     "activations": 0, "temporary": opt_temp}
        note("temporary at the end of the forward", logits_tmp, f"N*{V}*{c} (logits)"
             + (f" + N*{V}*4 (their fp32 .float() copy)" if c < 4 else "") + " + positions")
        note("temporary at the start of the backward", 2 * 4 * N * V,
             f"2 * N*{V}*4 (nll_loss_backward's and log_softmax_backward's fp32 gradients)")
        note("temporary in a block's backward", tmp, f"N*{d}*{r} (incoming grad) + 3*N*{hid}*{c} (grad_p, "
             "grad of silu(w1 x), grad of w3 x)" + (" + the largest new gradient (accumulated in place)"
                                                     if grad_accum > 1 else ""))
    else:
        # no grad: the live set inside the forward. x is the block input (the caller still holds it),
        # h the stream after attention, n2 = ffn_norm(h). Under autocast the casts of trainable leaf
        # weights are cached until autocast exits: all blocks' linears so far, then the output head.
        base = {"parameters": params, "gradients": 0, "optimizer_state": 0, "activations": 0}
        fixed = cos_sin + positions
        cache = (lambda n: 2 * n) if (s.amp and s.full) else (lambda n: 0)
        sh = s.shapes
        ffn = 3 * r * N * d + 3 * c * N * hid  # x, h, n2 + silu(w1 x), w3 x, and their product
        if "w3" in s.targets:  # LoRA w3 (PEFT's out-of-place form): silu(w1 x) beside base(x),
            ffn += c * N * hid  # scaling * B(A x) and their sum: one [N, hid] more than the product
        cands = {"FFN product (inference)": ffn + cache(L * per_layer_linear - d * hid)}
        lora_w3 = "; LoRA on w3: base + scaled B(A x) + sum" if "w3" in s.targets else ""
        note("temporary: FFN product moment", ffn, f"3*N*{d}*{r} (x, h, ffn_norm(h)) + {3 + ('w3' in s.targets)}"
             f"*N*{hid}*{c} (silu(w1 x), w3 x, product{lora_w3})")
        if quant4 and on_cuda:  # w3 runs on a dequantised copy of its weight while silu(w1 x) lives
            # (on CPU, bitsandbytes 0.50.2 makes no dequantised weight that the dispatcher sees)
            deq = c * d * hid
            cands["FFN w3 on a dequantised weight"] = 3 * r * N * d + 2 * c * N * hid + deq
            note("temporary: FFN w3 on a dequantised weight", cands["FFN w3 on a dequantised weight"],
                 f"3*N*{d}*{r} + 2*N*{hid}*{c} + {d}*{hid}*{c} (the dequantised weight)")
        attn = 2 * r * N * d + c * N * (2 * hq + 2 * hkv) + 4 * B * a.n_heads * T + c * N * d
        attn_cache = (L - 1) * per_layer_linear + sum(sh[n][0] * sh[n][1] for n in ("wq", "wk", "wv", "wo"))
        cands["attention output projection"] = attn + cache(attn_cache)
        note("temporary: attention moment", attn, f"2*N*{d}*{r} (x, attention_norm(x)) + N*(2*{hq}+2*{hkv})*{c} "
             f"(q, k, v after RoPE, SDPA output) + lse + N*{d}*{c} (wo output)")
        if s.attn_impl == "math":
            # x, attention_norm(x), q/k/v after RoPE, k and v repeated to n_heads (repeat_interleave makes
            # copies unless n_kv_heads == n_heads), and the [B,H,T,T] scores: fp32 -> `scores` (masked) and
            # the softmax output live together, then probs @ v's output; in bf16/fp16 the softmax runs on
            # an fp32 copy of the scores (scores c + fp32 copy + fp32 probs)
            probs = B * a.n_heads * T * T
            rep = 2 * c * N * hq if a.n_kv_heads != a.n_heads else 0
            sm = 8 * probs + c * N * hq if c == 4 else (c + 8) * probs
            m_attn = 2 * r * N * d + c * N * (hq + 2 * hkv) + rep + T * T + sm
            cands["math attention softmax"] = m_attn + cache(attn_cache - sh["wo"][0] * sh["wo"][1])
            note("temporary: math attention moment", m_attn,
                 f"2*N*{d}*{r} + N*({hq}+2*{hkv})*{c} (q,k,v) + repeated k,v + T*T mask + scores and softmax "
                 f"({'8*B*H*T*T + output' if c == 4 else f'{c + 8}*B*H*T*T'})")
        logits = r * N * d + c * N * V + (2 * N * d if s.amp else 0)  # + autocast's copy of norm(h)
        if mode == "eval":
            logits += (4 * N * V if c < 4 else 0) + 4 * N * V + 8 * N
        cands["logits"] = logits + cache(L * per_layer_linear + V * d)
        note("temporary: logits moment", logits, f"N*{d}*{r} (norm(h)) + N*{V}*{c} (logits)"
             + (" + fp32 copy and log_softmax (eval)" if mode == "eval" else ""))
        if s.amp and s.full:
            note("temporary: autocast weight cache", cache(L * per_layer_linear + V * d),
                 "2 * the weights of the linears run so far (autocast caches casts of leaf weights that "
                 "require grad, also under no_grad)")
        for name, v in cands.items():
            moments[name] = {**base, "temporary": fixed + v}

    totals = {name: sum(m.values()) for name, m in moments.items()}
    peak_moment = max(totals, key=totals.get)
    at_peak = {cat: moments[peak_moment].get(cat, 0) for cat in CATEGORIES}
    static = params + grads + opt
    by_category = {"parameters": params, "gradients": grads, "optimizer_state": opt, "activations": activations,
                   "temporary": at_peak["temporary"]}
    notes.append(f"peak: {peak_moment} = {format_bytes(totals[peak_moment])} "
                 f"({', '.join(f'{k} {format_bytes(v)}' for k, v in at_peak.items() if v)})")
    for name, v in totals.items():
        if name != peak_moment:
            notes.append(f"other moment: {name} = {format_bytes(v)}")
    return MemoryEstimate(by_category=by_category, peak_bytes=totals[peak_moment], static_bytes=static,
                          notes=notes, peak_moment=peak_moment, at_peak=at_peak, moments=totals)


# ---- the Llama-3-8B budget of the QLoRA report ----------------------------------------------------
REPORT_PARAMS = 8.1e9  # the report's "8.1B" (the real count is 8,030,261,248)
REPORT_GB = 1024**3  # the report's "GB" are GiB: 8.1e9 * 2 bytes / 1024**3 = 15.09 -> "15.1 GB"
QLORA_8B = dict(param_dtype="bf16", lora={"r": 64, "targets": "all", "dtype": "bf16"},
                quant4={"blocksize": 64, "double_quant": True, "quant_type": "nf4"}, optimizer="paged_adamw8bit",
                checkpointing=True, device="cuda")


def llama3_8b_budget() -> list[dict]:
    """The QLoRA report's Llama-3-8B memory table (REFERENCE.md, "Memory budget of Llama-3-8B"), row by row:

    component; ours_bytes (this module's exact count for the preset "llama3-8b"); ours_gib; report (the
    report's number, in its "GB", which are GiB); report_rule_bytes (the report's number rebuilt by the
    rule it must have used, None where no rule was found); note (the rule, and why ours differs).
    The QLoRA rows are r=64 LoRA on all 7 linears of every block, bf16 adapters and gradients, NF4 with
    double quantisation (blocksize 64), paged 8-bit AdamW, on CUDA (AdamW's step counters on the CPU)."""
    args = get_preset("llama3-8b")
    L, d, V = args.n_layers, args.dim, args.vocab_size
    n = parameter_count(args)["total"]
    n_lora = parameter_count(args, QLORA_8B["lora"])["lora"]
    linear = L * sum(i * o for i, o in _linear_shapes(args).values())  # 6,979,321,856 weights in the blocks
    full = estimate_memory(args, batch=1, seq_len=1, param_dtype="bf16", optimizer_state_dtype="fp32", device="cuda")
    q = estimate_memory(args, batch=1, seq_len=8192, **QLORA_8B)
    lora_b = n_lora * 2
    base4 = q.by_category["parameters"] - lora_b
    q4_linear = L * sum(_quant4_bytes(i * o, 64, True) for i, o in _linear_shapes(args).values())
    rule_lora = int(linear * 2 * 64 / d) * 2  # as if every matrix were dim x dim: r*(in+out) = in*out*2r/dim
    rule_base4 = q4_linear + V * d * 2
    inputs = L * 8192 * d * 2
    rows = [
        ("bf16 weights", 2 * n, 15.1, int(REPORT_PARAMS * 2),
         f"report: 8.1e9 * 2 B / 1024**3 = 15.09 (GiB printed as GB); ours: {n:,} * 2 B. The report rounds the "
         "parameter count up by 0.87%."),
        ("full fine-tuning static (bf16 weights + bf16 grads + fp32 AdamW moments, 12 B/param)", full.static_bytes,
         90.7, int(REPORT_PARAMS * 12),
         "report: 8.1e9 * 12 B / 1024**3 = 90.52 (it prints 90.7; 12 B/param of 8.1e9 gives 90.5, and 90.7 "
         "would need 12.02 B/param: a 0.2% residue we could not trace); ours: 12 B * the exact count."),
        ("NF4 + double quant base (blocks' linears in 4 bits; embeddings, norms, output in bf16)", base4, 4.3,
         rule_base4,
         f"report rule: the blocks' {linear:,} linear weights at 4.127 bits (3.35 GiB) + ONE bf16 vocab x dim "
         "matrix (0.98 GiB) = 4.33 GiB; Llama-3-8B does not tie tok_embeddings and output, and bitsandbytes / "
         "transformers keep the output head (lm_head) in bf16, so ours counts both matrices: +0.98 GiB."),
        ("LoRA r=64, all linears (bf16)", lora_b, 0.41, rule_lora,
         f"report rule: LoRA params = linear weights * 2r/dim = {rule_lora // 2:,} (exact for dim x dim matrices "
         f"only); ours: r*(in+out) per linear = {n_lora:,}, 23% fewer, because w1/w2/w3 are 4096 x 14336 "
         "(r*(in+out)/(in*out) = 1.29r/4096, not 2r/4096)."),
        ("LoRA gradients (bf16)", q.by_category["gradients"], 0.41, rule_lora, "as the LoRA row: 2 B per LoRA param."),
        ("paged 8-bit AdamW state", q.by_category["optimizer_state"], 0.41, rule_lora,
         "report rule: 2 B per LoRA param (two uint8 moments) of the report's LoRA count; ours: the exact count "
         "+ bitsandbytes' fp32 absmax per 256 values (+1.6%) and its two 256-entry maps."),
        ("QLoRA static total", q.static_bytes, 5.5, rule_base4 + 3 * rule_lora,
         "report rule: the four rows above (4.33 + 3 * 0.41 = 5.55 GiB, printed 5.5); ours is larger by the bf16 "
         "output head (+0.98 GiB) and smaller by the exact LoRA count (-3 * 0.09 GiB)."),
        ("activations, one 8,192-token sequence, checkpointing", q.by_category["activations"], 1.5, None,
         f"no rule found: the 32 checkpointed bf16 block inputs alone are 32 * 8192 * 4096 * 2 B = "
         f"{inputs / GiB:.2f} GiB, and cross-entropy over V = 128,256 keeps an fp32 log_softmax of "
         f"{8192 * V * 4 / GiB:.2f} GiB (plus 2x that in gradients at the start of backward: the predicted "
         f"peak is {q.peak_bytes / GiB:.1f} GiB, {q.peak_moment}); the report's ~1.5 GB covers neither "
         "(a chunked or fused cross-entropy would remove the second part, not the first)."),
    ]
    return [{"component": c, "ours_bytes": int(ours), "ours_gib": round(ours / GiB, 3), "report": rep,
             "report_rule_bytes": rule, "report_rule_gib": None if rule is None else round(rule / REPORT_GB, 3),
             "note": note} for c, ours, rep, rule, note in rows]
