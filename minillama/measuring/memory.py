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

Reading order (each function's docstring states its formula; "activations" is minillama.measuring.activations,
the per-op rules inside the layers):
  1. static bytes        parameter_bytes, gradient_bytes, optimizer_bytes
  2. training peak       activations.saved_for_backward (block by block), train_moments
  3. inference peak      inference_moments (activations.ffn_live, attention_live, logits_live), kv_cache_bytes
  4. technique terms     LoRA (_lora_parameter_bytes, activations._linear_inputs), 4-bit (_quant4_parameter_bytes,
                         _dequant_bytes, _dequant_forward_moment, _dequant_ffn_moment),
                         AMP weight copies (activations._amp_weight_copies, autocast_cache), checkpointing
                         (activations.checkpointed_inputs), gradient accumulation (_gradients_in_backward)
  5. estimate_memory     checks the arguments and adds the parts up; the peak is the largest moment.

Units: bytes everywhere; `format_bytes` prints MiB / GiB (1024**2, 1024**3 bytes), labelled as such.

The published budgets (the QLoRA paper's and the Llama-3-8B report's) beside this model's counts are
minillama.measuring.budgets'.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from ..config import DTYPES, ModelArgs, parse_dtype
from ..lora import ADAPTER_DTYPE, lora_parameter_count, normalise_targets
from ..training.settings import AMP_MODES, OPTIMIZERS, adamw_is_fused
from .activations import (Saved, attention_live, autocast_cache, checkpointed_inputs, ffn_live, logits_live,
                          loss_chunk_bytes, saved_for_backward)
from .measure import CATEGORIES

MODES = ("train", "inference", "eval")  # eval: a no-grad forward that also computes the loss
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


def quant4_bytes(numel: int, blocksize: int, double_quant: bool) -> int:
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
    """4-bit term: L * (sum over the 7 linears of quant4_bytes(in*out)) + (embeddings, norms, output head) * pb."""
    q, L = s.quant4, s.args.n_layers
    q_bytes = L * sum(quant4_bytes(i * o, q["blocksize"], q["double_quant"]) for i, o in s.shapes.values())
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


# ---- 2. the training step: the moments of its peak ------------------------------------------------
def train_moments(s: _Settings, params: int, grads: int, opt: int, opt_temp: int, saved: Saved,
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


def _dequant_forward_moment(s: _Settings, base: dict, saved: Saved, notes: _Notes) -> dict[str, int]:
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
        act = sum(t[1] for t in checkpointed_inputs(s)) + s.cos_sin
    else:
        act = sum(saved.per_block) + sum(saved.amp_blocks) + s.cos_sin
    return {**base, "gradients": base["gradients"], "activations": act, "temporary": tmp}


def _block_backward(s: _Settings, i: int, saved: Saved, grads: int) -> dict[str, int]:
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
    live set of the FFN (ffn_live), of attention (attention_live) or of the logits (logits_live).
    x is a block's input (the caller still holds it), h the stream after attention, n2 = ffn_norm(h)."""
    base = {"parameters": params, "gradients": 0, "optimizer_state": 0, "activations": 0}
    fixed = s.cos_sin + s.positions
    live = {**ffn_live(s, notes), **_dequant_ffn_moment(s, notes), **attention_live(s, notes),
            "logits": logits_live(s, notes)}
    if s.amp and s.full:
        a = s.args
        notes.add("temporary: autocast weight cache", autocast_cache(s, a.n_layers * s.per_layer_linear
                                                                      + a.vocab_size * a.dim),
                  "2 * the weights of the linears run so far (autocast caches casts of leaf weights that "
                  "require grad, also under no_grad)")
    return {name: {**base, "temporary": fixed + v} for name, v in live.items()}


def _dequant_ffn_moment(s: _Settings, notes: _Notes) -> dict[str, int]:
    """4-bit term of a no-grad forward: w3 runs on a dequantised weight (_dequant_bytes) while x, h, n2 and
    silu(w1 x) live, and w3 x is being made: 3*r*N*d + 2*c*N*hid + the dequantised copy. {} without 4 bits."""
    a = s.args
    N, d, hid, r, c = s.N, a.dim, a.ffn_hidden_dim, s.r, s.c
    deq = _dequant_bytes(s, d * hid) if s.quant4 else 0
    if not deq:
        return {}
    name = "FFN w3 on a dequantised weight"  # (and w2 while the product p lives)
    live = 3 * r * N * d + 2 * c * N * hid + deq
    notes.add(f"temporary: {name}", live,
              f"3*N*{d}*{r} + 2*N*{hid}*{c} + {format_bytes(deq)} (dequantising {d}x{hid}: _dequant_bytes)")
    return {name: live}


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
