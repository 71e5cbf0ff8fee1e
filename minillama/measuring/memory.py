"""Analytic memory model: predicted bytes of one training or inference step, by category.

    est = estimate_memory(get_preset("tiny"), batch=4, seq_len=256)          # fp32, AdamW, train
    est.peak_bytes, est.peak_moment, est.by_category, est.at_peak
    print("\\n".join(est.notes))                                             # every term with its formula

Nothing here is fitted to a measurement. Every term is counted from what THIS implementation
(minillama/model.py, rope.py, train.py; kernels.py with kernels=True, the default, as train runs) allocates and
what autograd SAVES for the backward pass, op by op; the comments next to each term name the op that keeps it. `minillama.measuring.measure.MemoryTracker`
counts the same thing (live tensor storages), so the two can be compared row by row
(`minillama.measuring.bench` puts both in every benchmark row).

Notation: N = batch * seq_len tokens; d = dim; Hq = n_heads * head_dim (= d); Hkv = n_kv_heads * head_dim;
hid = FFN width; V = vocab_size; L = n_layers; r = bytes of the residual stream (4 with amp: fp32 master
weights make the stream fp32); c = bytes of what linears and attention produce (2 under amp, else the
param dtype).

Categories (`minillama.measuring.measure.CATEGORIES`, the same as MemoryTracker's):
  parameters       the model's weights (4-bit packed weights and their constants included), LoRA weights
  gradients        .grad of every trainable parameter (dtype of the parameter)
  optimizer_state  AdamW moments (+ the per-tensor `step` counters, on the parameters' device with the
                   trainer's fused AdamW), 8-bit states and absmax
  activations      tensors autograd saves for backward, alive at the end of the forward pass
  temporary        the transient alive at the peak moment besides the above (logits gradients,
                   non-fused AdamW's sqrt/div temporaries, a layer's intermediates in inference)

Moments. Memory is not the sum of the categories: the peak is the largest of a few moments of the step,
each with its own live set (`MemoryEstimate.moments`):
  train:     "cross-entropy forward" (all activations + one chunk of logits in linear_cross_entropy),
             "cross-entropy backward" (all activations + the loss's gradient w.r.t. the last hidden state),
             "backward of the last block" / "of the first block", "optimizer step"
             (parameters + gradients + state + AdamW temporaries). Gradients are None during forward
             and backward when the step zeroes them with set_to_none before the next forward (bench.py);
             train.py zeroes them after the forward, so there last step's gradients live during the
             forward (grads_in_forward=True); with grad_accum > 1 they live throughout.
  inference: parameters + the largest live set inside the forward: the FFN's product (3 [N, hid]),
             the attention output projection, or the logits. Generation adds its KV cache
             (`kv_cache_bytes`), allocated before the forward.

Reading order (each function's docstring states its formula):
  1. static bytes        parameter_bytes, gradient_bytes, optimizer_bytes
  2. training peak       saved_for_backward (activations, block by block), train_moments
  3. inference peak      inference_moments (FFN, attention, logits), kv_cache_bytes
  4. technique terms     LoRA (_lora_parameter_bytes, _linear_inputs), 4-bit (_quant4_parameter_bytes,
                         _dequant_bytes, _dequant_forward_moment),
                         AMP weight copies (_amp_weight_copies, _autocast_cache), checkpointing
                         (_checkpointed_inputs), gradient accumulation (_gradients_in_backward)
  5. estimate_memory     checks the arguments and adds the parts up; the peak is the largest moment.

Units: bytes everywhere; `format_bytes` prints MiB / GiB (1024**2, 1024**3 bytes), labelled as such.

The Llama-3-8B budget of the QLoRA report (docs/references.md) is rebuilt by `llama3_8b_budget()`; the report
prints GiB and calls them GB, rounds the parameter count to 8.1e9 (it is 8,030,261,248) and uses two
shortcuts that the exact counts here do not share (see the notes of each row).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from ..config import DTYPES, ModelArgs, get_preset, parse_dtype
from ..lora import ADAPTER_DTYPE, TARGETS, lora_parameter_count, normalise_targets
from ..training.config import AMP_MODES, OPTIMIZERS, adamw_is_fused
from .measure import CATEGORIES

MODES = ("train", "inference", "eval")  # eval: a no-grad forward that also computes the loss
LINEARS = TARGETS  # the seven linears of a block (owner: minillama.lora.TARGETS); the old name, kept
QUANT_TYPES = ("nf4", "fp4")
QUANT_BACKENDS = ("minillama", "bnb")  # minillama.quant.BACKENDS: who dequantises the 4-bit weights

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



def effective_amp(amp, param_dtype) -> Optional[str]:
    """The autocast that estimate_memory models for a run with `amp` ("off", None, "bf16", "fp16") over weights of
    `param_dtype`: the amp mode over fp32 master weights or weights of the other 16-bit dtype (autocast then
    runs the linears on 16-bit copies of the weights); None over weights already in the amp dtype, where
    autocast changes nothing. bench and the train pre-flight use it."""
    if amp in (None, "off"):
        return None
    torch_dtype = parse_dtype(param_dtype)
    return None if torch_dtype == parse_dtype(amp) else amp


def _dtype_bytes(dtype, what: str) -> int:
    """Bytes per element of a dtype named as in minillama.config.DTYPES (or given as one of its torch dtypes)."""
    try:
        torch_dtype = parse_dtype(dtype)
    except ValueError:
        torch_dtype = None
    if torch_dtype not in DTYPES.values():
        raise ValueError(f"estimate_memory: {what}={dtype!r} is unknown: expected one of {sorted(DTYPES)}.")
    return torch_dtype.itemsize


def _check_positive_int(value, what: str) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"estimate_memory: {what}={value!r} is invalid: expected a positive integer.")


def _check_dict_or_none(value, what: str, example: str) -> None:
    if value is not None and not isinstance(value, dict):
        raise ValueError(f"estimate_memory: {what}={value!r} is invalid: expected None or a dict like {example}.")


def _check_lora(lora) -> Optional[dict]:
    """None, or {"r", "targets" (normalised by minillama.lora.normalise_targets), "dtype", "dropout"}."""
    _check_dict_or_none(lora, "lora", "{'r': 8, 'targets': ('wq', 'wv')}")
    if lora is None:
        return None
    r = lora.get("r", 8)
    _check_positive_int(r, "lora r")
    dropout = float(lora.get("dropout", 0.0))
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"estimate_memory: lora dropout={dropout!r} is invalid: expected 0 <= dropout < 1.")
    try:
        targets = normalise_targets(lora.get("targets", ("wq", "wv")))
    except ValueError as e:
        raise ValueError(f"estimate_memory: lora targets are invalid: {e}") from None
    return {"r": r, "targets": targets, "dtype": lora.get("dtype"), "dropout": dropout}


# ---- parameter counts ---------------------------------------------------------------------------
def parameter_count(args: ModelArgs, lora=None) -> dict:
    """{"total", "trainable", "lora", "base"}: the model's parameters (args.num_params(), the same as
    summing numel over minillama.Transformer(args)) plus LoRA's r*(in+out) per targeted linear per layer
    (A is [r, in], B is [out, r]; counted by minillama.lora.lora_parameter_count). With LoRA only the
    adapters are trainable.

    Llama-2-7B: 6,738,415,616; q/v r=8 adds 4,194,304; all seven linears r=8 add 19,988,480."""
    lora = _check_lora(lora)
    base = args.num_params()
    n_lora = 0 if lora is None else lora_parameter_count(args, lora["r"], lora["targets"])
    return {"total": base + n_lora, "trainable": n_lora if lora is not None else base, "lora": n_lora,
            "base": base}


def _param_tensors(args: ModelArgs) -> list[tuple[str, int]]:
    """(name, numel) of every parameter in model.parameters() order."""
    shapes = args.linear_shapes()
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
    shapes = args.linear_shapes()
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




def _dequant_bytes(s: "_Settings", numel: int) -> int:
    """The transient of dequantising one 4-bit weight of `numel` values for a matmul (the per-layer temporary:
    Linear4bit dequantises at every use, forward and backward, and frees the copy right after).
    backend "minillama" (minillama.quant.dequantize_4bit, in PyTorch ops): the unpacked codes (uint8, 1 B per
    value) are alive while `code[idx.long()]` makes an int64 index (8 B) and gathers the fp32 levels (4 B), and
    again while the padded blocks are scaled by absmax (1 + 4 + 4 + 4 B): 13 B per value; a compute dtype
    below fp32 adds the final cast (c B); double quantisation adds the fp32 absmax it rebuilds (4 B per block).
    backend "bnb": bitsandbytes' CUDA kernel writes one dequantised weight (c B per value); its CPU kernel
    (0.50.2) allocates outside the dispatcher, so nothing is counted."""
    q = s.quant4
    if q["backend"] == "bnb":
        return s.c * numel if s.on_cuda else 0
    cast = s.c * numel if s.c < 4 else 0
    absmax = 4 * -(-numel // q["blocksize"]) if q["double_quant"] else 0
    return 13 * numel + cast + absmax


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




class _Notes(list):
    """The estimate's notes: one line per term, "name: formula = size"."""

    def add(self, name: str, nbytes: int, formula: str) -> None:
        self.append(f"{name}: {formula} = {format_bytes(nbytes)}")


class _Settings:
    """The resolved options of one estimate, so that the per-op rules read like the model code."""

    def __init__(self, args: ModelArgs, *, batch, seq_len, mode, param_dtype, amp, lora, quant4, optimizer,
                 checkpointing, grad_accum, optimizer_state_dtype, device, foreach, fused, grads_in_forward, kernels=True):
        self.args, self.B, self.T, self.N = args, batch, seq_len, batch * seq_len
        self.mode, self.train = mode, mode == "train"
        self.pb = _dtype_bytes(param_dtype, "param_dtype")  # bytes of a parameter
        self.amp = amp is not None
        self.r = self.pb  # residual stream: the weights' dtype (fp32 master weights under amp)
        self.c = 2 if self.amp else self.pb  # linear / attention outputs
        self.lora = lora
        self.targets = set(lora["targets"]) if lora else set()
        # adapters are fp32 unless the estimate says otherwise (minillama.lora.ADAPTER_DTYPE, as PEFT)
        self.lb = _dtype_bytes(lora["dtype"], "lora dtype") if lora and lora["dtype"] else ADAPTER_DTYPE.itemsize
        self.gb = self.lb if lora else self.pb  # bytes of a gradient: the trainable parameters' dtype
        self.quant4 = quant4
        self.full = lora is None and quant4 is None  # base weights trainable
        self.attn_impl = args.attn_impl
        self.shapes = args.linear_shapes()
        self.per_layer_linear = sum(i * o for i, o in self.shapes.values())  # weights of a block's linears
        self.counts = parameter_count(args, lora)
        self.optimizer, self.optimizer_state_dtype = optimizer, optimizer_state_dtype
        self.on_cuda = str(device).startswith("cuda")
        self.foreach = foreach if foreach is not None else self.on_cuda  # torch's default: foreach on CUDA
        # AdamW: the trainer's fused kernel (training.train.adamw_is_fused) unless `fused` says otherwise
        self.fused = fused if fused is not None else adamw_is_fused("cuda" if self.on_cuda else "cpu")
        self.checkpointing, self.grad_accum, self.grads_in_forward = checkpointing, grad_accum, grads_in_forward
        self.kernels = kernels  # minillama.kernels' hand-written backward passes, or plain autograd
        self.cos_sin = 2 * seq_len * (args.head_dim // 2) * 4  # rope_cos_sin: fp32 [T, head_dim/2] each
        self.positions = 8 * seq_len  # torch.arange positions, int64


# ---- 1. static bytes: parameters, gradients, optimizer state -------------------------------------
def parameter_bytes(s: _Settings, notes: _Notes) -> int:
    """parameters = base weights + LoRA weights.
    Base: num_params * pb; with 4-bit, the blocks' linears packed + everything else * pb (see
    _quant4_parameter_bytes). LoRA: r*(in+out) per targeted linear per layer * lb (see _lora_parameter_bytes)."""
    if s.quant4:
        params = _quant4_parameter_bytes(s, notes)
    else:
        params = s.counts["base"] * s.pb
        notes.add("parameters: model", params, f"{s.counts['base']:,} * {s.pb}")
    if s.lora:
        params += _lora_parameter_bytes(s, notes)
    return params


def _quant4_parameter_bytes(s: _Settings, notes: _Notes) -> int:
    """4-bit term: L * (sum over the 7 linears of _quant4_bytes(in*out)) + (embeddings, norms, output head) * pb."""
    q, L = s.quant4, s.args.n_layers
    q_bytes = L * sum(_quant4_bytes(i * o, q["blocksize"], q["double_quant"]) for i, o in s.shapes.values())
    rest = s.counts["base"] - L * s.per_layer_linear
    bits = 8 * q_bytes / (L * s.per_layer_linear)
    notes.add("parameters: 4-bit linears", q_bytes, f"{L * s.per_layer_linear:,} weights at {bits:.3f} bits "
              f"({q['quant_type']}, blocksize {q['blocksize']}, double_quant={q['double_quant']})")
    notes.add("parameters: embeddings, norms, output head", rest * s.pb, f"{rest:,} * {s.pb}")
    return q_bytes + rest * s.pb


def _lora_parameter_bytes(s: _Settings, notes: _Notes) -> int:
    """LoRA term: lora_parameter_count (r*(in+out) per targeted linear per layer) * lb, the adapters' dtype."""
    n = s.counts["lora"]
    notes.add("parameters: LoRA A and B", n * s.lb, f"{n:,} * {s.lb} "
              f"(r={s.lora['r']} on {'/'.join(s.lora['targets'])}: r*(in+out) per linear per layer)")
    return n * s.lb


def gradient_bytes(s: _Settings, notes: _Notes) -> int:
    """gradients = trainable parameters * gb (the adapters' dtype with LoRA, else the param dtype); 0 without
    training."""
    if not s.train:
        return 0
    grads = s.counts["trainable"] * s.gb
    notes.add("gradients", grads, f"{s.counts['trainable']:,} trainable * {s.gb}")
    return grads


def optimizer_bytes(s: _Settings, notes: _Notes) -> tuple[int, int]:
    """(optimizer state, temporary of optimizer.step()) for the chosen optimizer; (0, 0) without training.
    The tensors come per param group, in the order make_optimizer builds them (_trainable_groups)."""
    if not s.train:
        return 0, 0
    groups = _trainable_groups(s.args, s.lora)
    if s.optimizer == "adamw":
        return _adamw_bytes(s, groups, notes)
    if s.optimizer in ("adamw8bit", "paged_adamw8bit"):
        return _adamw8bit_bytes(s, groups, notes), 0
    return _sgd_bytes(s, groups, notes)


def _adamw_bytes(s: _Settings, groups: list[list[int]], notes: _Notes) -> tuple[int, int]:
    """torch.optim.AdamW. state = 2 * trainable * sb (exp_avg, exp_avg_sq; sb = optimizer_state_dtype, default
    the gradients' dtype) + 4 bytes of `step` per tensor where the counters live on the parameters' device:
    always with fused=True (the trainer's), on CPU otherwise (non-fused AdamW on CUDA keeps them on the host).
    Temporary: fused = 0 (one kernel per group updates the tensors in place); foreach = largest group's
    numel * sb (torch._foreach_sqrt of the group); single-tensor = max_i(2*numel_i + numel_(i-1)) * sb."""
    n, osd = s.counts["trainable"], s.optimizer_state_dtype
    sb = _dtype_bytes(osd, "optimizer_state_dtype") if osd else s.gb
    opt = 2 * n * sb
    notes.add("optimizer_state: AdamW exp_avg, exp_avg_sq", opt, f"2 * {n:,} * {sb}")
    if s.fused or not s.on_cuda:
        n_tensors = sum(len(g) for g in groups)
        opt += 4 * n_tensors
        notes.add("optimizer_state: AdamW step counters", 4 * n_tensors, f"{n_tensors} tensors * 4 (fp32 scalars)")
    if s.fused:  # torch._fused_adamw_: reads and writes every tensor in place, no temporary
        temp = 0
        notes.add("temporary: AdamW fused", 0, "0 (the fused kernel updates the tensors in place)")
    elif s.foreach:  # _multi_tensor_adam: exp_avg_sq_sqrt = torch._foreach_sqrt(all of the group)
        temp = max(sum(g) for g in groups) * sb
        notes.add("temporary: AdamW foreach sqrt(exp_avg_sq)", temp, "largest param group's numel * "
                  f"{sb} (torch._foreach_sqrt of the whole group)")
    else:  # _single_tensor_adam, per tensor: denom = (exp_avg_sq.sqrt() / bc).add_(eps): sqrt and
        # div results live together, and the previous tensor's `denom` is still referenced
        temp = sb * max((2 * n + (g[i - 1] if i else 0) for g in groups for i, n in enumerate(g)), default=0)
        notes.add("temporary: AdamW single-tensor sqrt/div", temp, f"max(2*numel_i + numel_(i-1)) * {sb} "
                  "(sqrt and div of tensor i, denom of tensor i-1)")
    return opt, temp


def _adamw8bit_bytes(s: _Settings, groups: list[list[int]], notes: _Notes) -> int:
    """bitsandbytes' 8-bit AdamW, per tensor of n values: 2*n uint8 states + 2 fp32 absmax per 256 values
    (tensors under 4096 values: 2*n*4, fp32 states); + the two shared 256-entry fp32 maps."""
    opt = BNB_QMAP_BYTES
    for g in groups:
        for n in g:
            opt += (2 * n + 2 * 4 * -(-n // BNB_OPT_BLOCK)) if n >= BNB_MIN_8BIT_SIZE else 2 * 4 * n
    notes.add(f"optimizer_state: {s.optimizer}", opt, "per tensor: 2 uint8 states + 2 fp32 absmax per 256 values "
              f"(tensors < {BNB_MIN_8BIT_SIZE} values: 2 fp32 states) + 2 shared 256-entry maps"
              + ("; paged: unified memory, evicted to the CPU only under memory pressure (MemoryTracker "
                 "does not see paged buffers)" if s.optimizer.startswith("paged") else ""))
    return opt


def _sgd_bytes(s: _Settings, groups: list[list[int]], notes: _Notes) -> tuple[int, int]:
    """SGD without momentum: no state. Temporary: weight decay on the matrices (as make_optimizer sets it),
    grad.add(param, alpha=wd), a new tensor per parameter (single-tensor: largest decayed tensor * gb) or
    one for the whole group (foreach: numel of the decay group * gb)."""
    notes.add("optimizer_state: SGD without momentum", 0, "0")
    temp = (sum(groups[0]) if s.foreach else max(groups[0], default=0)) * s.gb
    notes.add("temporary: SGD weight decay (grad + wd * param)", temp,
              f"{'numel of the decay group' if s.foreach else 'largest decayed tensor'} * {s.gb}")
    return 0, temp


# ---- 2. the training step: activations saved for backward, block by block ---------------------
def _rmsnorm(s: _Settings, name: str, x_rg: bool, save) -> bool:
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


def _attention_saved(s: _Settings, x_rg: bool, save) -> bool:
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


def _block_saved(s: _Settings, x_rg: bool) -> tuple[list, bool, int]:
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


def _head_saved(s: _Settings, x_rg: bool) -> list[tuple[str, int, str]]:
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


def loss_chunk_bytes(s: _Settings) -> tuple[int, str]:
    """linear_cross_entropy's transient for one chunk of Nc positions (model.loss_chunk(N, V)): the
    chunk's logits c*Nc*V, their fp32 copy 4*Nc*V when c < 4 (the softmax and its gradient are made in place),
    and, when c < 4, the gradient cast back to the weight's dtype for the matrix products c*Nc*V."""
    from ..model import loss_chunk

    V, c = s.args.vocab_size, s.c
    nc = min(s.N, loss_chunk(s.N, V))
    n = c * nc * V + (4 * nc * V + c * nc * V if c < 4 else 0)
    return n, f"{nc}*{V}*{c} (one chunk of logits)" + (f" + {nc}*{V}*4 (fp32) + {nc}*{V}*{c} (gradient cast)"
                                                      if c < 4 else "")


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


@dataclass
class _Saved:
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


def saved_for_backward(s: _Settings, notes: _Notes) -> _Saved:
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
    act_terms = _checkpointed_inputs(s) if s.checkpointing else _merged_block_terms(blocks, amp_blocks)
    act_terms += head
    act_terms.append(("RoPE cos, sin", s.cos_sin, f"2 * T*{a.head_dim // 2}*4 (fp32, kept by the RoPE products)"))
    if amp_head:
        act_terms.append(("autocast copy of the output head", amp_head, f"{a.vocab_size}*{a.dim}*2 (kept by F.linear)"))
    for name, n, formula in act_terms:
        notes.add(f"activations: {name}", n, formula)
    return _Saved(blocks, amp_blocks, amp_head, act_terms)


def _checkpointed_inputs(s: _Settings) -> list[tuple[str, int, str]]:
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


# ---- 2. the training step: the moments of its peak ------------------------------------------------
def train_moments(s: _Settings, params: int, grads: int, opt: int, opt_temp: int, saved: _Saved,
                  notes: _Notes) -> dict[str, dict[str, int]]:
    """Live bytes by category at five moments of a training step:
      end of forward:     activations + one chunk of logits in linear_cross_entropy (loss_chunk_bytes) + positions
      start of backward:  activations + the loss's gradient w.r.t. norm(h) (r*N*d; and the head's, full FT)
      backward of the last / first block (_block_backward), and the optimizer step: parameters + gradients
      + state + the optimizer's temporary. Gradients are None in forward and backward (set_to_none),
      except last step's in the forward with grads_in_forward, and all of them with grad_accum > 1."""
    N, V, c, L = s.N, s.args.vocab_size, s.c, s.args.n_layers
    grads_fwd = grads if s.grad_accum > 1 else 0  # set_to_none zeroing: no .grad during forward/backward
    base = {"parameters": params, "gradients": grads_fwd, "optimizer_state": opt}
    activations = saved.total
    # the end of the forward: one chunk of logits inside linear_cross_entropy
    chunk, chunk_formula = loss_chunk_bytes(s)
    logits_tmp = chunk + s.positions
    if s.checkpointing:  # autocast's cache still holds the blocks' weight copies until autocast exits
        logits_tmp += sum(saved.amp_blocks) if s.full else 0
    # the loss's backward: its saved gradients times the incoming scalar (new tensors; the head's becomes .grad)
    d = s.args.dim
    loss_bwd = s.r * N * d
    moments = {
        "cross-entropy forward (end of forward)": {**base, "gradients": grads if s.grads_in_forward else grads_fwd,
                                                   "activations": activations, "temporary": logits_tmp},
        "cross-entropy backward (start of backward)": {**base, "activations": activations, "temporary": loss_bwd,
                                                       "gradients": grads_fwd + (V * d * s.pb if s.full else 0)}}
    for i, label in ((L - 1, "backward of the last block"), (0, "backward of the first block")):
        moments[label] = {**base, **_block_backward(s, i, saved, grads)}
    if s.quant4:
        moments["4-bit w2 of the last block (forward)"] = _dequant_forward_moment(s, base, saved, notes)
    moments["optimizer step"] = {"parameters": params, "gradients": grads, "optimizer_state": opt,
                                 "activations": 0, "temporary": opt_temp}
    hid, r = s.args.ffn_hidden_dim, s.r
    notes.add("temporary at the end of the forward", logits_tmp, chunk_formula + " + positions")
    notes.add("temporary at the start of the backward", loss_bwd, f"N*{d}*{s.r} (the loss's gradient w.r.t. norm(h))")
    notes.add("temporary in a block's backward", moments["backward of the first block"]["temporary"],
              f"N*{d}*{r} (incoming grad) + 3*N*{hid}*{c} (grad_p, grad of w1 x, silu(w1 x) made into grad of w3 x)"
              + (" + the largest new gradient (accumulated in place)" if s.grad_accum > 1 else ""))
    return moments


def _dequant_forward_moment(s: _Settings, base: dict, saved: _Saved, notes: _Notes) -> dict[str, int]:
    """4-bit term of the forward: the last block's w2 dequantises its d x hid weight (_dequant_bytes) while every
    block's saved tensors live (the head's not yet), with its input, the FFN product p (c*N*hid), the stream h
    that the block adds it to (r*N*d) and the positions."""
    a = s.args
    N, d, hid = s.N, a.dim, a.ffn_hidden_dim
    deq = _dequant_bytes(s, d * hid)
    tmp = s.c * N * hid + s.r * N * d + s.positions + deq
    notes.add("temporary at the last block's 4-bit w2 (forward)", tmp, f"N*{hid}*{s.c} (p) + N*{d}*{s.r} (h) + "
              f"positions + {format_bytes(deq)} (dequantising {d}x{hid}: _dequant_bytes)")
    if s.checkpointing:  # a checkpointed forward saves nothing: only the blocks' inputs are held so far
        act = sum(t[1] for t in _checkpointed_inputs(s)) + s.cos_sin
    else:
        act = sum(saved.per_block) + sum(saved.amp_blocks) + s.cos_sin
    return {**base, "gradients": base["gradients"], "activations": act, "temporary": tmp}


def _block_backward(s: _Settings, i: int, saved: _Saved, grads: int) -> dict[str, int]:
    """Gradients, activations and temporary in the backward of block i (memory is linear in i, so the
    last and the first block bound every block). The head's saved tensors are gone; activations of blocks
    <= i remain (with checkpointing: their inputs, plus block i recomputed), less p and w2's autocast copy,
    freed by then. Temporary, at the FFN product's backward: the incoming grad r*N*d and grad_p,
    grad_w1x, silu(w1 x) recomputed, grad_w3x (3*c*N*hid; kernels=False: the same count, autograd's grad of
    silu(w1 x) taking the place of the recomputed silu(w1 x)); a 4-bit w2's backward dequantises it (_dequant_bytes) beside the incoming
    grad and the grad of w2's output (c*N*d)."""
    N, d, hid, r, c = s.N, s.args.dim, s.args.ffn_hidden_dim, s.r, s.c
    terms, p_i, _ = saved.blocks[i]
    if s.checkpointing:
        shared_x = sum(t[1] for t in terms if t[0] == "attention_norm: input x")
        act = (i + 1) * r * N * d + saved.per_block[i] - shared_x + saved.amp_blocks[i]
    else:
        act = sum(saved.per_block[: i + 1]) + sum(saved.amp_blocks[: i + 1])
    amp_w2 = 2 * d * hid if (s.amp and saved.amp_blocks[0]) else 0
    act += s.cos_sin - p_i - amp_w2
    tmp = r * N * d + 3 * c * N * hid  # silu_mul's backward: grad_p, grad_w1x, silu(w1 x) made into grad_w3x
    if s.quant4:  # w2's backward runs on a dequantised copy of its weight beside the incoming grad
        tmp = max(tmp, r * N * d + c * N * d + _dequant_bytes(s, d * hid))
    g, g_tmp = _gradients_in_backward(s, i, grads)
    return {"gradients": g, "activations": act, "temporary": tmp + g_tmp}


def _gradients_in_backward(s: _Settings, i: int, grads: int) -> tuple[int, int]:
    """(gradients alive in the backward of block i, their extra temporary).
    One micro-step: the head's, blocks i+1..L-1's and w2's of block i: g_head + (L-1-i)*g_block + g_w2.
    Gradient accumulation (grad_accum > 1): every .grad exists from the earlier micro-steps and each new
    gradient is a transient added in place: all gradients, + the largest trainable tensor * gb."""
    if s.grad_accum > 1:
        largest = max((n for grp in _trainable_groups(s.args, s.lora) for n in grp), default=0)
        return grads, largest * s.gb
    a, pb = s.args, s.pb
    d, hid, V, L = a.dim, a.ffn_hidden_dim, a.vocab_size, a.n_layers
    if s.full:
        g_block, g_w2, g_head = (s.per_layer_linear + 2 * d) * pb, d * hid * pb, (V * d + d) * pb
    else:
        g_block, g_head = (s.counts["lora"] // L) * s.lb, 0
        g_w2 = s.lora["r"] * (d + hid) * s.lb if "w2" in s.targets else 0
    return g_head + (L - 1 - i) * g_block + g_w2, 0


# ---- 3. the inference peak: a no-grad forward --------------------------------------------------
def inference_moments(s: _Settings, params: int, notes: _Notes) -> dict[str, dict[str, int]]:
    """Live bytes at the candidate peaks inside a no-grad forward: parameters + cos/sin + positions + the
    live set of the FFN (_ffn_live), of attention (_attention_live) or of the logits (_logits_live).
    x is a block's input (the caller still holds it), h the stream after attention, n2 = ffn_norm(h)."""
    base = {"parameters": params, "gradients": 0, "optimizer_state": 0, "activations": 0}
    fixed = s.cos_sin + s.positions
    live = {**_ffn_live(s, notes), **_attention_live(s, notes), "logits": _logits_live(s, notes)}
    if s.amp and s.full:
        a = s.args
        notes.add("temporary: autocast weight cache", _autocast_cache(s, a.n_layers * s.per_layer_linear
                                                                      + a.vocab_size * a.dim),
                  "2 * the weights of the linears run so far (autocast caches casts of leaf weights that "
                  "require grad, also under no_grad)")
    return {name: {**base, "temporary": fixed + v} for name, v in live.items()}


def _autocast_cache(s: _Settings, n_weights: int) -> int:
    """AMP term: under autocast the bf16/fp16 casts of trainable leaf weights are cached until autocast
    exits, also under no_grad: 2 bytes per weight of the linears run so far (0 without amp, or when the
    base weights are frozen)."""
    return 2 * n_weights if (s.amp and s.full) else 0


def _ffn_live(s: _Settings, notes: _Notes) -> dict[str, int]:
    """FFN product: 3*r*N*d (x, h, n2) + 3*c*N*hid (silu(w1 x), w3 x, their product); LoRA on w3 (PEFT's
    out-of-place form) adds one c*N*hid. On CUDA a 4-bit w3 runs on a dequantised weight c*d*hid while
    silu(w1 x) lives."""
    a = s.args
    N, d, hid, r, c, L = s.N, a.dim, a.ffn_hidden_dim, s.r, s.c, a.n_layers
    ffn = 3 * r * N * d + 3 * c * N * hid  # x, h, n2 + silu(w1 x), w3 x, and their product
    if "w3" in s.targets:  # LoRA w3 (PEFT's out-of-place form): silu(w1 x) beside base(x),
        ffn += c * N * hid  # scaling * B(A x) and their sum: one [N, hid] more than the product
    live = {"FFN product (inference)": ffn + _autocast_cache(s, L * s.per_layer_linear - d * hid)}
    lora_w3 = "; LoRA on w3: base + scaled B(A x) + sum" if "w3" in s.targets else ""
    notes.add("temporary: FFN product moment", ffn, f"3*N*{d}*{r} (x, h, ffn_norm(h)) + {3 + ('w3' in s.targets)}"
              f"*N*{hid}*{c} (silu(w1 x), w3 x, product{lora_w3})")
    deq = _dequant_bytes(s, d * hid) if s.quant4 else 0
    if deq:  # w3 is dequantised while silu(w1 x) lives (and w2 while the product p lives)
        name = "FFN w3 on a dequantised weight"
        live[name] = 3 * r * N * d + 2 * c * N * hid + deq
        notes.add(f"temporary: {name}", live[name],
                  f"3*N*{d}*{r} + 2*N*{hid}*{c} + {format_bytes(deq)} (dequantising {d}x{hid}: _dequant_bytes)")
    return live


def _attention_live(s: _Settings, notes: _Notes) -> dict[str, int]:
    """SDPA, at wo: 2*r*N*d (x, attention_norm(x)) + c*N*(2*Hq + 2*Hkv) (q, k, v, output) + 4*B*H*T (lse)
    + c*N*d (wo's output). Math path, at the softmax: q, k, v, k and v repeated to n_heads (copies unless
    n_kv_heads == n_heads), the T*T mask, and the [B,H,T,T] scores with their softmax."""
    a = s.args
    N, B, T, d, r, c, L, sh = s.N, s.B, s.T, a.dim, s.r, s.c, a.n_layers, s.shapes
    hq, hkv = a.n_heads * a.head_dim, a.n_kv_heads * a.head_dim
    attn = 2 * r * N * d + c * N * (2 * hq + 2 * hkv) + 4 * B * a.n_heads * T + c * N * d
    attn_cache = (L - 1) * s.per_layer_linear + sum(sh[n][0] * sh[n][1] for n in ("wq", "wk", "wv", "wo"))
    live = {"attention output projection": attn + _autocast_cache(s, attn_cache)}
    notes.add("temporary: attention moment", attn, f"2*N*{d}*{r} (x, attention_norm(x)) + N*(2*{hq}+2*{hkv})*{c} "
              f"(q, k, v after RoPE, SDPA output) + lse + N*{d}*{c} (wo output)")
    if s.attn_impl == "math":
        # fp32 scores -> `scores` (masked) and the softmax output live together, then probs @ v's output;
        # in bf16/fp16 the softmax runs on an fp32 copy of the scores (scores c + fp32 copy + fp32 probs)
        probs = B * a.n_heads * T * T
        rep = 2 * c * N * hq if a.n_kv_heads != a.n_heads else 0
        sm = 8 * probs + c * N * hq if c == 4 else (c + 8) * probs
        m_attn = 2 * r * N * d + c * N * (hq + 2 * hkv) + rep + T * T + sm
        live["math attention softmax"] = m_attn + _autocast_cache(s, attn_cache - sh["wo"][0] * sh["wo"][1])
        notes.add("temporary: math attention moment", m_attn,
                  f"2*N*{d}*{r} + N*({hq}+2*{hkv})*{c} (q,k,v) + repeated k,v + T*T mask + scores and softmax "
                  f"({'8*B*H*T*T + output' if c == 4 else f'{c + 8}*B*H*T*T'})")
    return live


def _logits_live(s: _Settings, notes: _Notes) -> int:
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
    return logits + _autocast_cache(s, a.n_layers * s.per_layer_linear + V * d)


def kv_cache_bytes(args: ModelArgs, *, batch: int, length: int, param_dtype="fp32") -> int:
    """The KV cache that generation sets up before its first forward (Transformer.setup_cache, "prealloc"):
    k and v of every layer, [batch, n_kv_heads, length, head_dim] in the weights' dtype:
    2 * n_layers * batch * n_kv_heads * length * head_dim * bytes."""
    b = _dtype_bytes(param_dtype, "param_dtype")
    return 2 * args.n_layers * batch * args.n_kv_heads * length * args.head_dim * b


# ---- 5. the estimate ----------------------------------------------------------------------------
def _validate(args, batch, seq_len, mode, param_dtype, amp, optimizer, grad_accum, checkpointing,
              optimizer_state_dtype, device) -> None:
    """One clear sentence for the first bad argument (lora and quant4 are checked by their own functions)."""
    if not isinstance(args, ModelArgs):
        raise ValueError(f"estimate_memory: args must be a minillama ModelArgs, got {type(args).__name__}.")
    for key, v in (("batch", batch), ("seq_len", seq_len), ("grad_accum", grad_accum)):
        _check_positive_int(v, key)
    if seq_len > args.max_seq_len:
        raise ValueError(f"estimate_memory: seq_len={seq_len} is longer than max_seq_len={args.max_seq_len}.")
    if mode not in MODES:
        raise ValueError(f"estimate_memory: mode={mode!r} is unknown: expected one of {MODES}.")
    _dtype_bytes(param_dtype, "param_dtype")
    if amp is not None and amp not in AMP_MODES:
        raise ValueError(f"estimate_memory: amp={amp!r} is unknown: expected None or one of {AMP_MODES}.")
    if amp not in (None, "off") and effective_amp(amp, param_dtype) is None:
        raise ValueError(f"estimate_memory: amp={amp!r} needs param_dtype='fp32' (fp32 master weights) or the "
                         f"other 16-bit dtype (autocast to the weights' own dtype changes nothing), got {param_dtype!r}.")
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"estimate_memory: optimizer={optimizer!r} is unknown: expected one of {OPTIMIZERS}.")
    if not isinstance(checkpointing, bool):
        raise ValueError(f"estimate_memory: checkpointing={checkpointing!r} is invalid: expected True or False.")
    if optimizer_state_dtype is not None:
        _dtype_bytes(optimizer_state_dtype, "optimizer_state_dtype")
    if not (device == "cpu" or str(device).startswith("cuda")):
        raise ValueError(f"estimate_memory: device={device!r} is unknown: expected 'cpu' or 'cuda'.")


def _check_quant4(quant4, mode: str, lora) -> Optional[dict]:
    """None, or the 4-bit settings with their defaults filled in (blocksize 64, double_quant, nf4)."""
    _check_dict_or_none(quant4, "quant4", "{'blocksize': 64, 'double_quant': True, 'quant_type': 'nf4'}")
    if quant4 is None:
        return None
    bs = quant4.get("blocksize", 64)
    _check_positive_int(bs, "quant4 blocksize")
    if quant4.get("quant_type", "nf4") not in QUANT_TYPES:
        raise ValueError(f"estimate_memory: quant4 quant_type={quant4.get('quant_type')!r} is unknown: "
                         f"expected one of {QUANT_TYPES}.")
    if mode == "train" and lora is None:
        raise ValueError("estimate_memory: training a 4-bit model needs lora (4-bit base weights are frozen).")
    backend = quant4.get("backend", "minillama")
    if backend not in QUANT_BACKENDS:
        raise ValueError(f"estimate_memory: quant4 backend={backend!r} is unknown: expected one of {QUANT_BACKENDS}.")
    return {"blocksize": bs, "double_quant": bool(quant4.get("double_quant", True)),
            "quant_type": quant4.get("quant_type", "nf4"), "backend": backend}


def estimate_memory(args: ModelArgs, *, batch: int, seq_len: int, mode: str = "train", param_dtype="fp32",
                    amp=None, lora=None, quant4=None, optimizer="adamw", checkpointing=False, grad_accum=1,
                    optimizer_state_dtype=None, device="cpu", foreach=None, fused=None, grads_in_forward=False,
                    kernels=True) -> MemoryEstimate:
    """Predicted bytes of one step of `minillama.Transformer(args)` on `batch` x `seq_len` tokens.

    mode: "train" (forward with loss, backward, optimizer.step()), "inference" (a no-grad forward
      returning logits, as bench.py's inference rows), or "eval" (a no-grad forward with the loss).
    param_dtype: dtype of the weights ("fp32", "bf16", "fp16"); amp: None (or "off") or "bf16"/"fp16"
      autocast (needs fp32 weights: linears then run on a bf16 copy of each weight).
    lora: None or {"r": 8, "targets": ("wq", "wv") or "all", "dtype": None (= fp32, the adapters' dtype), "dropout": 0.0}:
      base weights, embeddings, norms and the output head frozen; only the adapters train.
    quant4: None or {"blocksize": 64, "double_quant": True, "quant_type": "nf4", "backend": "minillama"}: the 7
      linears of every block in 4 bits (bitsandbytes layout); embeddings, norms, output head stay in
      param_dtype. backend "minillama" (minillama.quant.Linear4bit, dequantised by PyTorch ops that the
      tracker sees, see _dequant_bytes) or "bnb" (bitsandbytes.nn.Linear4bit).
    optimizer: "adamw" (torch.optim.AdamW; moments in optimizer_state_dtype, default the param dtype, as
      torch does), "adamw8bit" / "paged_adamw8bit" (bitsandbytes), "sgd" (no momentum: no state).
    checkpointing: torch.utils.checkpoint around every block (use_reentrant=False).
    grad_accum: micro-steps per optimizer step (batch is the micro-batch); > 1 keeps gradients alive
      through every forward and backward.
    grads_in_forward: the previous step's gradients still live during the forward (train.py's loop
      calls zero_grad(set_to_none=True) between forward and backward; bench.py after the step).
      Gradient clipping (train.py) adds only one scalar per tensor (torch._foreach_norm) and is not counted.
    device: "cpu" or "cuda".
    fused: AdamW's implementation; None = the trainer's (training.train.make_optimizer: fused on CPU and
      CUDA, no temporary, `step` counters on the parameters' device). fused=False: torch's default loop,
      foreach (default on CUDA) or single-tensor (default on CPU) as `foreach` says, with its temporaries;
      its `step` counters stay on the CPU when the model is on CUDA. `foreach` also picks SGD's form.
    kernels: True (train's default): minillama.kernels' hand-written backward passes (kernels.enable_kernels);
      False: the plain autograd model of model.py (the RMSNorms, SwiGLU and the loss keep more for backward).
    """
    if not isinstance(kernels, bool):
        raise ValueError(f"estimate_memory: kernels={kernels!r}: expected True or False.")
    _validate(args, batch, seq_len, mode, param_dtype, amp, optimizer, grad_accum, checkpointing,
              optimizer_state_dtype, device)
    if fused not in (None, True, False):
        raise ValueError(f"estimate_memory: fused={fused!r} is invalid: expected None, True or False.")
    lora = _check_lora(lora)
    quant4 = _check_quant4(quant4, mode, lora)
    s = _Settings(args, batch=batch, seq_len=seq_len, mode=mode, param_dtype=param_dtype,
                  amp=None if amp == "off" else amp, lora=lora, quant4=quant4, optimizer=optimizer,
                  checkpointing=checkpointing, grad_accum=grad_accum, optimizer_state_dtype=optimizer_state_dtype,
                  device=device, foreach=foreach, fused=fused, grads_in_forward=grads_in_forward, kernels=kernels)
    notes = _Notes([f"N = batch*seq_len = {batch}*{seq_len} = {s.N} tokens; r = {s.r} bytes (residual stream), "
                    f"c = {s.c} bytes (linear/attention outputs); sizes in MiB = 1024**2 bytes."])
    params = parameter_bytes(s, notes)
    grads = gradient_bytes(s, notes)
    opt, opt_temp = optimizer_bytes(s, notes)
    if s.train:
        saved = saved_for_backward(s, notes)
        moments, activations = train_moments(s, params, grads, opt, opt_temp, saved, notes), saved.total
    else:
        moments, activations = inference_moments(s, params, notes), 0
    static = {"parameters": params, "gradients": grads, "optimizer_state": opt}
    return _peak(moments, static, activations, notes)


def _peak(moments: dict[str, dict[str, int]], static: dict[str, int], activations: int,
          notes: _Notes) -> MemoryEstimate:
    """The peak is the moment with the most live bytes; by_category gives each category's full size
    (temporary: the one alive at the peak)."""
    totals = {name: sum(m.values()) for name, m in moments.items()}
    peak_moment = max(totals, key=totals.get)
    at_peak = {cat: moments[peak_moment].get(cat, 0) for cat in CATEGORIES}
    by_category = {**static, "activations": activations, "temporary": at_peak["temporary"]}
    notes.append(f"peak: {peak_moment} = {format_bytes(totals[peak_moment])} "
                 f"({', '.join(f'{k} {format_bytes(v)}' for k, v in at_peak.items() if v)})")
    for name, v in totals.items():
        if name != peak_moment:
            notes.append(f"other moment: {name} = {format_bytes(v)}")
    return MemoryEstimate(by_category=by_category, peak_bytes=totals[peak_moment], static_bytes=sum(static.values()),
                          notes=list(notes), peak_moment=peak_moment, at_peak=at_peak, moments=totals)


# ---- the Llama-3-8B budget of the QLoRA report ----------------------------------------------------
REPORT_PARAMS = 8.1e9  # the report's "8.1B" (the real count is 8,030,261,248)
REPORT_GB = 1024**3  # the report's "GB" are GiB: 8.1e9 * 2 bytes / 1024**3 = 15.09 -> "15.1 GB"
QLORA_8B = dict(param_dtype="bf16", lora={"r": 64, "targets": "all", "dtype": "bf16"},
                quant4={"blocksize": 64, "double_quant": True, "quant_type": "nf4", "backend": "bnb"},
                optimizer="paged_adamw8bit",
                checkpointing=True, device="cuda")


def llama3_8b_budget() -> list[dict]:
    """The QLoRA report's Llama-3-8B memory table (docs/references.md, "Memory budget of Llama-3-8B"), row by row:

    component; ours_bytes (this module's exact count for the preset "llama3-8b"); ours_gib; report (the
    report's number, in its "GB", which are GiB); report_rule_bytes (the report's number rebuilt by the
    rule it must have used, None where no rule was found); note (the rule, and why ours differs).
    The QLoRA rows are r=64 LoRA on all 7 linears of every block, bf16 adapters and gradients, NF4 with
    double quantisation (blocksize 64), paged 8-bit AdamW, on CUDA."""
    args = get_preset("llama3-8b")
    L, d, V = args.n_layers, args.dim, args.vocab_size
    n = parameter_count(args)["total"]
    n_lora = parameter_count(args, QLORA_8B["lora"])["lora"]
    linear = L * sum(i * o for i, o in args.linear_shapes().values())  # 6,979,321,856 weights in the blocks
    full = estimate_memory(args, batch=1, seq_len=1, param_dtype="bf16", optimizer_state_dtype="fp32", device="cuda")
    q = estimate_memory(args, batch=1, seq_len=8192, **QLORA_8B)
    lora_b = n_lora * 2
    base4 = q.by_category["parameters"] - lora_b
    q4_linear = L * sum(_quant4_bytes(i * o, 64, True) for i, o in args.linear_shapes().values())
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


# ---- the 7B / 8B budget: full fine-tuning vs LoRA vs QLoRA ----------------------------------------
BUDGET_PRESETS = ("llama2-7b", "llama3-8b")
BUDGET_LORA = {"r": 64, "targets": "all", "dtype": "bf16"}  # the QLoRA report's adapters, on every linear
BUDGET_METHODS = {  # estimate_memory settings; every row on CUDA, bf16, one 512-token sequence, checkpointing
    "bf16 full fine-tuning (AdamW, fp32 moments)": dict(optimizer="adamw", optimizer_state_dtype="fp32"),
    "bf16 LoRA r=64 (paged 8-bit AdamW)": dict(lora=BUDGET_LORA, optimizer="paged_adamw8bit"),
    "QLoRA NF4 r=64 (paged 8-bit AdamW)": dict(
        lora=BUDGET_LORA, optimizer="paged_adamw8bit",
        quant4={"blocksize": 64, "double_quant": False, "quant_type": "nf4", "backend": "bnb"}),
    "QLoRA NF4 + double quant r=64 (paged 8-bit AdamW)": dict(
        lora=BUDGET_LORA, optimizer="paged_adamw8bit",
        quant4={"blocksize": 64, "double_quant": True, "quant_type": "nf4", "backend": "bnb"}),
}
QLORA_PAPER_7B_BASE_MB = 5048  # QLoRA paper, Figure 6: LLaMA-7B's 4-bit base model (docs/references.md)


def constant_bits_per_weight(args: ModelArgs, double_quant: bool, blocksize: int = 64) -> float:
    """Bits per weight spent on the 4-bit constants of the blocks' linears (everything but the packed codes:
    absmax, or its 8-bit form with the second-level absmax, map and offset, and the 16-level code book)."""
    shapes = args.linear_shapes().values()
    numel = sum(i * o for i, o in shapes)
    consts = sum(_quant4_bytes(i * o, blocksize, double_quant) - -(-(i * o) // 2) for i, o in shapes)
    return 8 * consts / numel


def qlora_paper_base_reconstruction(args: ModelArgs, blocksize: int = 64) -> int:
    """The largest count of a 4-bit base model's own tensors that the QLoRA paper's code can produce: the blocks'
    linears in NF4 with one fp32 absmax per block (no double quantisation: 4 + 32/blocksize bits per weight),
    and everything else (embeddings, output head, norms) in fp32, the dtype peft's
    prepare_model_for_kbit_training (called by the paper's qlora.py) casts them to. Bytes."""
    linear = args.n_layers * sum(i * o for i, o in args.linear_shapes().values())
    return linear * (4 + 32 / blocksize) // 8 + 4 * (args.num_params() - linear)


def _published(preset: str, method: str, est: MemoryEstimate, args: ModelArgs) -> tuple[str, str]:
    """(the published figure, why ours differs) for the rows that have one (docs/references.md)."""
    base = est.by_category["parameters"] - parameter_count(args, BUDGET_LORA)["lora"] * 2
    if preset == "llama2-7b" and "double quant" in method:
        paper, n = QLORA_PAPER_7B_BASE_MB * 10**6, args.num_params()
        most = qlora_paper_base_reconstruction(args)
        return (f"base ~{QLORA_PAPER_7B_BASE_MB:,} MB (QLoRA paper, LLaMA-1 7B, same shapes): {8 * paper / n:.2f} "
                f"bits/param; its tensors reach at most {most / 1e6:,.0f} MB, {(paper - most) / 1e6:,.0f} MB short; "
                f"constants 0.127 bit/weight",
                f"ours {base / 1e6:,.0f} MB (1e6 bytes): the blocks' linears at 4 + "
                f"{constant_bits_per_weight(args, True):.3f} bits and the embeddings and head in bf16, "
                f"{8 * base / n:.2f} bits per parameter. The paper says only 'the 4-bit base model consumes 5,048 "
                f"MB'. No count of the model's tensors reaches that: the largest its own code allows (fp32 absmax "
                f"without double quantisation, 0.5 bit/weight, and embeddings, head and norms in fp32 as peft's "
                f"prepare_model_for_kbit_training casts them) is {most / 1e6:,.0f} MB, {(paper - most) / 1e6:,.0f} "
                f"MB short, and its recipe (double quantisation, bf16 embeddings and head) gives ours. Read as "
                f"MiB (its '26 MB' of LoRA weights, 0.2% of the model in bf16, is 25.7 MiB or 27.0 MB), 5,048 MiB "
                f"is {QLORA_PAPER_7B_BASE_MB * 2**20 / 1e6:,.0f} MB and the gap larger. The rest is memory that is "
                f"no tensor of the model (CUDA context, allocator cache), which the paper does not itemise.")
    if preset == "llama3-8b" and method.startswith("bf16 full"):
        return ("90.7 GB static (Llama-3-8B report)", "the report counts 12 B per parameter of a rounded 8.1e9 and "
                "prints GiB as GB; ours: 12 B * 8,030,261,248 (llama3_8b_budget)")
    if preset == "llama3-8b" and "double quant" in method:
        return ("5.5 GB static (Llama-3-8B report); constants 0.127 bit/weight", "the report keeps ONE bf16 vocab x "
                "dim matrix (ours keeps the untied output head in bf16 too, +0.98 GiB) and counts LoRA as if every "
                "matrix were dim x dim (ours: r*(in+out), 23% fewer); see llama3_8b_budget")
    if "double quant" in method:
        return ("constants 0.127 bit/weight (QLoRA paper)", "8/64 + 32/(64*256) = 0.127; ours adds each tensor's "
                "256-level map, offset and code book")
    if "QLoRA" in method:
        return ("constants 0.5 bit/weight (QLoRA paper)", "32-bit absmax per 64 weights = 0.5; ours adds the "
                "16-level code book of each tensor (64 bytes)")
    return "", ""


def qlora_budget_table(presets=BUDGET_PRESETS, batch: int = 1, seq_len: int = 512) -> list[dict]:
    """The fine-tuning budget of 7B/8B models by method (BUDGET_METHODS), from estimate_memory on CUDA in bf16
    with gradient checkpointing, one row per (preset, method): parameters (the base + adapters), gradients,
    optimizer_state, static (their sum), peak (a training step on batch x seq_len tokens; 1 x 512 as in the
    QLoRA paper's Figure 6), const_bits (bits per weight of the 4-bit constants, None without 4 bits), and
    the published figure with the reason ours differs (`published`, `why`; empty where none)."""
    rows = []
    for preset in presets:
        args = get_preset(preset)
        for method, kw in BUDGET_METHODS.items():
            est = estimate_memory(args, batch=batch, seq_len=seq_len, param_dtype="bf16", checkpointing=True,
                                  device="cuda", **kw)
            q = kw.get("quant4")
            published, why = _published(preset, method, est, args)
            rows.append({"preset": preset, "method": method, **{c: est.by_category[c] for c in
                         ("parameters", "gradients", "optimizer_state")}, "static": est.static_bytes,
                         "peak": est.peak_bytes, "const_bits": constant_bits_per_weight(args, q["double_quant"])
                         if q else None, "published": published, "why": why})
    return rows


def format_budget_table(rows: list[dict]) -> str:
    """qlora_budget_table as a markdown table in GiB (1024**3 bytes)."""
    lines = ["| model | method | parameters | gradients | optimizer | static | peak | constants bits/weight |"
             " published |", "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    for r in rows:
        nums = " | ".join(f"{r[k] / GiB:.2f}" for k in ("parameters", "gradients", "optimizer_state", "static", "peak"))
        bits = "" if r["const_bits"] is None else f"{r['const_bits']:.4f}"
        lines.append(f"| {r['preset']} | {r['method']} | {nums} | {bits} | {r['published']} |")
    return "\n".join(lines)
