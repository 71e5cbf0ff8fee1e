"""`minillama bench --compare hf`: minillama side by side with HF transformers + PEFT, in one process.

For each row the same configuration runs through both implementations:

    minillama                                 the standard stack
    create_model(args) (random weights)  -->  LlamaForCausalLM, the same weights (checkpoints.weights.hf_state_dict)
    quantize_model (4-bit rows)               bitsandbytes.nn.Linear4bit (quant.quantize_linear(backend="bnb"))
    apply_lora(r=16, alpha=32)           -->  PEFT, the same adapter (lora.save_adapter -> PeftModel.from_pretrained)
    set_checkpointing(1)                      gradient_checkpointing_enable(use_reentrant=False)
    kernels.enable_kernels (train rows)       (none: HF's RMSNorm, MLP and loss are differentiated by autograd)

with the same batch, sequence length, dtype (fp32 on CPU, bf16 on CUDA), optimizer (training.make_optimizer:
AdamW, the same groups and settings), gradient clipping and data (random tokens, the first eighth of every row
masked with -100 as a prompt would be). The two implementations alternate over the measured steps (A B, then
B A, ...) so that machine noise hits both alike, and both take exactly the same number of optimizer steps: the
losses of their last step must agree within LOSS_TOLERANCE, or the comparison would not be fair.

Each row carries, per implementation: tokens/s, peak memory (MemoryTracker: exact bytes by category; on CUDA
also the allocator's peak, less the other implementation's resident bytes), FLOPs (counted) and MFU (model
FLOPs by formula over the device's peak for the compute dtype: measure.mfu), the loss; and the ratios
`tokens_per_s_ratio` and `peak_memory_ratio` (minillama / HF). A row whose package is missing is skipped with
a message; a row that runs out of memory is recorded with the memory model's prediction.
"""

from __future__ import annotations

import gc
import importlib.util
import json
import math
import statistics
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional, Union

import torch

from ..config import dtype_name, get_preset, parse_dtype
from ..files import atomic_write_text
from ..kernels import enable_kernels
from ..model import create_model
from .measure import (alternate_times, count_flops, device_name, device_peak_flops, mfu,
                      model_flops_per_token, track_memory)
from .memory import estimate_memory, kv_cache_bytes
from .report import UNKNOWN, mib, percent, plot_bars, table, where_measured, write_csv

IMPLS = ("minillama", "hf")
# |loss_minillama / loss_hf - 1| after the same steps: fp32 differs only by the order of additions; bf16 and
# the 4-bit base by rounding at every op (each implementation rounds at other places).
LOSS_TOLERANCE = {"fp32": 1e-4, "bf16": 2e-2, "fp16": 2e-2}
QUANT_LOSS_TOLERANCE = 1e-2


@dataclass(frozen=True)
class Row:
    """One compared configuration."""
    name: str
    kind: str = "train"                          # "train" or "inference"
    targets: Union[tuple, str, None] = ("wq", "wv")  # LoRA targets (Meta names or "all"); None: full fine-tuning
    checkpointing: bool = False                  # every block recomputed in the backward pass
    quant: bool = False                          # NF4 base (QLoRA)
    long: bool = False                           # Settings.long_seq_len instead of seq_len, batch 1
    compiled: bool = False                       # minillama's blocks torch.compiled (training.compile_blocks)
    kernels: bool = True                         # minillama's hand-written backward passes (train rows, as train's default)
    needs: tuple = ("transformers", "peft")


# In order of importance (benchmarks/gpu_lab.py runs them in this order while time and memory last).
ROWS = {r.name: r for r in (
    Row("lora-qv"),
    Row("lora-all", targets="all"),
    Row("full", targets=None, needs=("transformers",)),
    Row("inference", kind="inference", targets=None, needs=("transformers",)),
    Row("qlora-qv", quant=True, needs=("transformers", "peft", "bitsandbytes")),
    Row("lora-qv-long", long=True),
    Row("lora-qv-ckpt", checkpointing=True),
    Row("lora-all-ckpt", targets="all", checkpointing=True),
    # torch.compile: the same rows with minillama's blocks compiled (HF eager unless Settings.compile_hf)
    Row("lora-qv-compiled", compiled=True),
    Row("lora-all-compiled", targets="all", compiled=True),
    Row("full-compiled", targets=None, compiled=True, needs=("transformers",)),
)}


@dataclass
class Settings:
    """What every row shares. `defaults(preset, device)` gives the sizes for the CPU and the GPU lab."""
    preset: str = "tiny"
    device: str = "cpu"
    dtype: Optional[str] = None   # None: fp32 on CPU, bf16 on CUDA
    batch: int = 4
    seq_len: int = 128
    long_seq_len: int = 256
    r: int = 16                   # LoRA rank (alpha = 2r)
    lr: float = 1e-3
    warmup: int = 1
    repeats: int = 4              # timed steps per implementation (the median is reported)
    new_tokens: int = 32          # inference: tokens generated after the prompt
    full_layers: int = 8          # full fine-tuning runs a smaller shape: at most this many layers
    seed: int = 0
    compile_hf: bool = False      # compiled rows: HF's decoder layers compiled too (default: HF as students run it)

    @classmethod
    def defaults(cls, preset: str = "tiny", device="cpu", **overrides) -> "Settings":
        if torch.device(device).type == "cuda":
            base = dict(batch=2, seq_len=512, long_seq_len=2048, new_tokens=64)
        else:
            base = dict(repeats=9)  # a tiny step takes a tenth of a second: more of them steady the median
        return cls(preset=preset, device=str(device), **{**base, **overrides})

    def torch_dtype(self) -> torch.dtype:
        return parse_dtype(self.dtype) or (torch.bfloat16 if torch.device(self.device).type == "cuda"
                                           else torch.float32)


# ---- the reference packages ----------------------------------------------------------------------
def missing_packages(names) -> list[str]:
    """Those of `names` that cannot be imported here."""
    return [n for n in names if importlib.util.find_spec(n) is None]


def _versions() -> dict:
    out = {"torch": torch.__version__}
    for name in ("transformers", "peft", "bitsandbytes"):
        if importlib.util.find_spec(name) is not None:
            out[name] = getattr(__import__(name), "__version__", "?")
    return out


# ---- the twin models ----------------------------------------------------------------------------
def hf_twin(model) -> torch.nn.Module:
    """transformers' LlamaForCausalLM holding a copy of `model`'s weights (names and q/k rows converted by
    checkpoints.weights.hf_state_dict), on the same device, in the same dtype, with SDPA attention."""
    import transformers

    from ..checkpoints.weights import args_to_hf_config, hf_state_dict

    w = model.tok_embeddings.weight
    try:
        config = transformers.LlamaConfig(**args_to_hf_config(model.args, w.dtype))
    except Exception as e:  # a setting transformers' LlamaConfig refuses
        raise ValueError(f"transformers {transformers.__version__} cannot build LlamaForCausalLM for this model "
                         f"({type(e).__name__}: {e}).") from None
    with torch.device(w.device):
        hf = transformers.LlamaForCausalLM._from_config(config, attn_implementation="sdpa", dtype=w.dtype)
    hf.load_state_dict(hf_state_dict(model.state_dict(), model.args))
    hf.generation_config.eos_token_id = None  # generate exactly max_new_tokens, as minillama's generate does
    return hf


def hf_quantize(hf, compute_dtype: torch.dtype) -> None:
    """The seven linears of every HF layer -> bitsandbytes.nn.Linear4bit (NF4, blocksize 64), as
    transformers' load_in_4bit does (embeddings, norms and lm_head stay)."""
    from ..quant import quantize_linear

    for layer in hf.model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name, lin in list(parent.named_children()):
                if isinstance(lin, torch.nn.Linear):
                    bnb_layer = quantize_linear(lin, backend="bnb", compute_dtype=compute_dtype).layer
                    setattr(parent, name, bnb_layer)
    for p in hf.parameters():
        p.requires_grad_(False)


def peft_twin(model, hf) -> torch.nn.Module:
    """PEFT's LoRA on `hf` with minillama's adapter (the same A and B, rows of B of q/k permuted), through
    the PEFT files save_adapter writes; trainable, everything else frozen."""
    import peft

    from ..lora import save_adapter

    with tempfile.TemporaryDirectory() as tmp:
        save_adapter(model, Path(tmp) / "adapter")
        return peft.PeftModel.from_pretrained(hf, Path(tmp) / "adapter", is_trainable=True)


def build_pair(row: Row, s: Settings):
    """(minillama model, HF model) for a row, with the same weights and techniques; and their ModelArgs."""
    from ..lora import apply_lora
    from ..quant import quantize_model

    args, _, seq = row_shape(row, s)
    args = args.replace(max_seq_len=max(args.max_seq_len, seq + (s.new_tokens if row.kind == "inference" else 0)))
    dtype = s.torch_dtype()
    ours = create_model(args, device=s.device, dtype=dtype, seed=s.seed)
    hf = hf_twin(ours)
    if row.quant:
        quantize_model(ours, quant_type="nf4", blocksize=64, compute_dtype=dtype)
        hf_quantize(hf, dtype)
    if row.kind == "train" and row.targets is not None:
        torch.manual_seed(s.seed)
        apply_lora(ours, r=s.r, alpha=2 * s.r, targets=row.targets)
        hf = peft_twin(ours, hf)
    base = hf.get_base_model() if hasattr(hf, "get_base_model") else hf
    if row.checkpointing:
        ours.set_checkpointing(1)
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if row.kind == "train" and row.kernels:  # after checkpointing (it reads it), before compiling
        enable_kernels(ours)
    if row.compiled:  # after every technique: a module swapped later would make the blocks recompile
        from ..training import compile_blocks

        compile_blocks(ours)
        if s.compile_hf:  # the same in HF: each decoder layer compiled, in place
            for layer in base.model.layers:
                layer.compile()
    return ours, hf, args


def make_batch(vocab: int, batch: int, seq_len: int, seed: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Random token rows and their next-token targets, the first eighth of each row masked with -100."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randint(0, vocab, (batch, seq_len + 1), generator=gen)
    inputs, targets = x[:, :-1].clone(), x[:, 1:].clone()
    targets[:, : seq_len // 8] = -100
    return inputs.to(device), targets.to(device)


# ---- the measured steps -----------------------------------------------------------------------------
def _loss_fns(ours, hf, inputs, targets) -> dict[str, Callable[[], torch.Tensor]]:
    """The mean cross-entropy over the unmasked targets, by each implementation's own code path (HF:
    labels already shifted, passed as shift_labels, so both score the same seq_len positions)."""
    return {"minillama": lambda: ours(inputs, targets),
            "hf": lambda: hf(input_ids=inputs, labels=targets, shift_labels=targets, use_cache=False).loss}


def _train_steps(ours, hf, inputs, targets, s: Settings, last_loss: dict) -> dict:
    """impl -> (model, optimizer, step): forward, backward, clip to norm 1, AdamW step, zero_grad."""
    from ..training import TrainConfig, make_optimizer

    cfg = TrainConfig(lr=s.lr, warmup_steps=0)
    out = {}
    for impl, model in (("minillama", ours), ("hf", hf)):
        model.train()
        opt = make_optimizer(model, cfg)
        params = [p for g in opt.param_groups for p in g["params"]]
        loss_fn = _loss_fns(ours, hf, inputs, targets)[impl]

        def step(loss_fn=loss_fn, opt=opt, params=params, impl=impl):
            loss = loss_fn()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
            last_loss[impl] = loss.detach()

        out[impl] = (model, opt, step)
    return out


def _resident_bytes(model, optimizer) -> int:
    """Bytes of a model's parameters, buffers and optimizer state (each storage once)."""
    seen, total = set(), 0
    tensors = [*model.parameters(), *model.buffers()]
    if optimizer is not None:
        tensors += [v for st in optimizer.state.values() for v in st.values() if isinstance(v, torch.Tensor)]
    for t in tensors:
        st = t.untyped_storage()
        if st.data_ptr() not in seen and t.device.type == "cuda":
            seen.add(st.data_ptr())
            total += st.nbytes()
    return total


def measure_pair(steps: dict, device: torch.device, warmup: int, repeats: int) -> dict:
    """Warm-up, one tracked step, one FLOP-counted step, then `repeats` timed steps of each implementation,
    alternating (A B, B A, ...). steps: impl -> (model, optimizer or None, step_fn). Returns impl -> fields."""
    for _ in range(warmup):
        for _, _, fn in steps.values():
            fn()
    res = {}
    # The tracker and the FLOP counter are dispatch modes, which torch.compile cannot run under: a compiled
    # step would fall back to eager there and stay eager afterwards. So those two steps run eager on purpose
    # (the same arithmetic, so the same FLOPs; the memory is then the eager step's) and the timed ones compiled.
    with torch.compiler.set_stance("force_eager"):
        for impl, (model, opt, fn) in steps.items():
            other = sum(_resident_bytes(m, o) for k, (m, o, _) in steps.items() if k != impl)
            tracker, max_alloc, _ = track_memory(fn, model, opt)
            res[impl] = {"peak_memory_bytes": tracker.peak_bytes, "memory_by_category": tracker.by_category(),
                         # the allocator's peak less what the other implementation keeps resident meanwhile
                         "cuda_peak_bytes": None if max_alloc is None else max_alloc - other}
        for impl, (_, _, fn) in steps.items():
            res[impl]["flops_per_step"] = count_flops(fn)
    times = alternate_times({impl: fn for impl, (_, _, fn) in steps.items()}, device, repeats)
    for impl in steps:
        res[impl]["step_time_s"] = statistics.median(times[impl])
    return res


def _inference_steps(ours, hf, inputs, new_tokens: int) -> tuple[dict, dict, dict]:
    """(prefill fns, generate steps, generated tokens): the prompt through the KV cache (logits of the last
    position only), and greedy generation of new_tokens (minillama.generate vs HF generate)."""
    from ..generate import generate

    bsz, seq = inputs.shape
    out = {}

    @torch.no_grad()
    def ours_prefill():
        ours.setup_cache(bsz, seq + new_tokens)
        ours(inputs, last_only=True)
        ours.clear_cache()

    @torch.no_grad()
    def hf_prefill():
        hf(input_ids=inputs, use_cache=True, logits_to_keep=1)

    def ours_generate():
        out["minillama"] = generate(ours, inputs.tolist(), new_tokens)

    def hf_generate():
        ids = hf.generate(inputs, attention_mask=torch.ones_like(inputs), max_new_tokens=new_tokens,
                          do_sample=False, pad_token_id=0)
        out["hf"] = ids[:, seq:].tolist()

    ours.eval(), hf.eval()
    prefill = {"minillama": ours_prefill, "hf": hf_prefill}
    steps = {"minillama": (ours, None, ours_generate), "hf": (hf, None, hf_generate)}
    return prefill, steps, out


def _impl_fields(res: dict, tokens: int, flops_per_token: int, peak_flops: Optional[float]) -> dict:
    """Flat per-implementation fields (prefixed minillama_ / hf_) from measure_pair's results; MFU by
    measure.mfu (model FLOPs per token by formula, the same for both implementations)."""
    row = {}
    for impl, r in res.items():
        row[f"{impl}_tokens_per_s"] = tokens / r["step_time_s"]
        row[f"{impl}_step_time_s"] = r["step_time_s"]
        row[f"{impl}_peak_memory_bytes"] = r["peak_memory_bytes"]
        row[f"{impl}_memory_by_category"] = r["memory_by_category"]
        row[f"{impl}_cuda_peak_bytes"] = r["cuda_peak_bytes"]
        row[f"{impl}_flops_per_step"] = r["flops_per_step"]
        row[f"{impl}_mfu"] = mfu(flops_per_token, tokens, r["step_time_s"], peak_flops)
    row["tokens_per_s_ratio"] = row["minillama_tokens_per_s"] / row["hf_tokens_per_s"]
    row["peak_memory_ratio"] = row["minillama_peak_memory_bytes"] / row["hf_peak_memory_bytes"]
    if row["hf_cuda_peak_bytes"]:
        row["cuda_peak_memory_ratio"] = row["minillama_cuda_peak_bytes"] / row["hf_cuda_peak_bytes"]
    return row


def _losses(row: dict, ours_loss: float, hf_loss: float, tolerance: float) -> None:
    row.update(minillama_loss=ours_loss, hf_loss=hf_loss, loss_tolerance=tolerance,
               loss_rel_diff=abs(ours_loss / hf_loss - 1) if hf_loss else math.inf)
    row["losses_agree"] = bool(row["loss_rel_diff"] <= tolerance)


def _prediction(row: Row, args, s: Settings, batch: int, seq: int) -> int:
    """The memory model's peak for minillama's side of the row (estimate_memory; + the KV cache for inference)."""
    device, dtype = torch.device(s.device).type, dtype_name(s.torch_dtype())
    if row.kind == "inference":
        est = estimate_memory(args, batch=batch, seq_len=seq, mode="inference", device=device, param_dtype=dtype)
        return est.peak_bytes + kv_cache_bytes(args, batch=batch, length=seq + s.new_tokens, param_dtype=dtype)
    lora = None if row.targets is None else {"r": s.r, "targets": row.targets}
    quant4 = {"quant_type": "nf4", "double_quant": False, "blocksize": 64} if row.quant else None
    return estimate_memory(args, batch=batch, seq_len=seq, mode="train", device=device, param_dtype=dtype,
                           lora=lora, quant4=quant4, checkpointing=row.checkpointing, kernels=row.kernels).peak_bytes


def row_shape(row: Row, s: Settings) -> tuple:
    """(ModelArgs, batch, seq_len) of a row, without building anything."""
    args = get_preset(s.preset)
    if row.targets is None and row.kind == "train":
        args = args.replace(n_layers=min(args.n_layers, s.full_layers))
    return args, (1 if row.long else s.batch), (s.long_seq_len if row.long else s.seq_len)


def predicted_peak(row: Row, s: Settings) -> Optional[int]:
    """The memory model's prediction for one implementation of the row (None if it cannot say)."""
    args, batch, seq = row_shape(row, s)
    try:
        return _prediction(row, args.replace(max_seq_len=max(args.max_seq_len, seq + s.new_tokens)), s, batch, seq)
    except ValueError:
        return None


def run_row(row: Row, s: Settings) -> dict:
    """Measure one row with both implementations; the fields of the result are described in the module doc."""
    _, batch, seq = row_shape(row, s)
    device = torch.device(s.device)
    ours, hf, args = build_pair(row, s)
    inputs, targets = make_batch(args.vocab_size, batch, seq, s.seed, device)
    out = {"batch": batch, "seq_len": seq, "params": sum(p.numel() for p in ours.parameters()),
           "trainable_params": sum(p.numel() for p in ours.parameters() if p.requires_grad)}
    peak_flops = device_peak_flops(device, s.torch_dtype())  # the dtype both implementations compute in
    tolerance = QUANT_LOSS_TOLERANCE if row.quant else LOSS_TOLERANCE[dtype_name(s.torch_dtype())]
    if row.kind == "train":
        last: dict = {}
        steps = _train_steps(ours, hf, inputs, targets, s, last)
        res = measure_pair(steps, device, s.warmup, s.repeats)
        kind = "full" if row.targets is None else "lora"
        per_token = model_flops_per_token(args, seq, kind)
        out.update(model_flops_per_step=per_token * batch * seq,
                   **_impl_fields(res, batch * seq, per_token, peak_flops))
        _losses(out, float(last["minillama"]), float(last["hf"]), tolerance)
        out["optimizer_steps"] = s.warmup + 2 + s.repeats
    else:
        out.update(_inference_row(ours, hf, inputs, targets, s, peak_flops))
        _losses(out, *out.pop("_losses"), tolerance)
    out["predicted_peak_memory_bytes"] = _prediction(row, args, s, batch, seq)
    return out


def _inference_row(ours, hf, inputs, targets, s: Settings, peak_flops) -> dict:
    """Decode tokens/s (generation minus prefill), prefill tokens/s, memory of one generation, and the loss of
    both on the batch (a no-grad forward) and whether their greedy tokens agree."""
    device = torch.device(s.device)
    bsz, seq = inputs.shape
    prefill, steps, generated = _inference_steps(ours, hf, inputs, s.new_tokens)
    res = measure_pair(steps, device, s.warmup, s.repeats)
    pre = alternate_times(prefill, device, s.repeats)
    args = ours.args
    per_token = model_flops_per_token(args, seq + s.new_tokens // 2, "inference")
    decode_flops = per_token * bsz * (s.new_tokens - 1)
    for impl in IMPLS:  # decode = generation minus its prefill
        res[impl]["prefill_s"] = statistics.median(pre[impl])
        res[impl]["step_time_s"] = max(res[impl]["step_time_s"] - res[impl]["prefill_s"], 1e-9)
    out = _impl_fields(res, bsz * (s.new_tokens - 1), per_token, peak_flops)
    for impl in IMPLS:
        out[f"{impl}_prefill_tokens_per_s"] = bsz * seq / res[impl]["prefill_s"]
    out["prefill_tokens_per_s_ratio"] = out["minillama_prefill_tokens_per_s"] / out["hf_prefill_tokens_per_s"]
    out["new_tokens"] = s.new_tokens
    out["model_flops_per_step"] = decode_flops
    same = sum(a == b for x, y in zip(generated["minillama"], generated["hf"]) for a, b in zip(x, y))
    out["generated_tokens_agree"] = same / (bsz * s.new_tokens)
    with torch.no_grad():
        out["_losses"] = [float(f()) for f in _loss_fns(ours, hf, inputs, targets).values()]
    return out


# ---- the whole comparison ---------------------------------------------------------------------------
def is_out_of_memory(e: BaseException) -> bool:
    """CUDA's OutOfMemoryError, Python's MemoryError, or the CPU allocator's RuntimeError."""
    return isinstance(e, (torch.OutOfMemoryError, MemoryError)) or (
        isinstance(e, RuntimeError) and "can't allocate memory" in str(e))


def row_header(row: Row, s: Settings) -> dict:
    """What every result row says about itself, measured or not."""
    device = torch.device(s.device)
    return {"name": row.name, "kind": row.kind, "preset": s.preset, "device": str(device),
            "device_name": device_name(device), "dtype": dtype_name(s.torch_dtype()),
            "lora_r": s.r if row.kind == "train" and row.targets is not None else 0,
            "lora_targets": row.targets if isinstance(row.targets, str) or row.targets is None else ",".join(row.targets),
            "checkpointing": row.checkpointing, "quant": "nf4" if row.quant else "none",
            "compiled": compiled_side(row, s), "kernels": row.kind == "train" and row.kernels, **_versions()}


def compiled_side(row: Row, s: Settings) -> str:
    """Which implementations a row compiles: "none", "minillama" or "both"."""
    return ("both" if s.compile_hf else "minillama") if row.compiled else "none"


def compare_row(row: Row, s: Settings) -> dict:
    """run_row, or a row that says why it was skipped (a missing package) or failed (out of memory)."""
    out = row_header(row, s)
    missing = missing_packages(row.needs)
    if missing:
        out["skipped"] = f"needs {', '.join(missing)}, which is not installed here (pip install {' '.join(missing)})"
        return out
    if row.compiled:
        from ..training.techniques import compile_problem

        if problem := compile_problem(s.device):
            out["skipped"] = problem
            return out
    try:
        out.update(run_row(row, s))
        out["status"] = "ok"
    except Exception as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        if is_out_of_memory(e):
            out["error"] = f"out of memory: {first}"
            out["predicted_peak_memory_bytes"] = predicted_peak(row, s)
        elif row.compiled:  # the compiler's own failure (a Triton or C++ build error) costs this row only
            out["error"] = f"torch.compile failed: {type(e).__name__}: {first[:300]}"
        else:
            raise
    finally:
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return out


def select_rows(names=None) -> list[Row]:
    """ROWS by name (comma-separated string or list), in ROWS' order; None: all of them."""
    if names is None:
        return list(ROWS.values())
    wanted = [n.strip() for n in (names.split(",") if isinstance(names, str) else names) if n.strip()]
    unknown = [n for n in wanted if n not in ROWS]
    if unknown or not wanted:
        raise ValueError(f"--rows {','.join(wanted)!r}: unknown row(s) {unknown}; expected some of {list(ROWS)}.")
    return [r for r in ROWS.values() if r.name in wanted]


def run_compare(s: Settings, rows=None, *, out_dir=None, progress: Callable[[str], None] = print) -> list[dict]:
    """Every selected row, in order; writes results to out_dir when given. Missing packages skip rows."""
    if "transformers" in missing_packages(["transformers"]):
        progress("transformers is not installed: every compared row needs it, so each is recorded as skipped.")
    results = []
    for row in select_rows(rows):
        r = compare_row(row, s)
        results.append(r)
        progress(format_compare([r], "text", header=not results[:-1]))
    if out_dir is not None:
        write_compare(results, out_dir, s)
    return results


# ---- tables (drawn by measuring.report) -----------------------------------------------------------
def _num(fmt: str):
    return lambda v: "" if v is None else format(v, fmt)


def _mfu(v) -> str:
    return UNKNOWN if v is None else percent(v)  # no published peak for this device (a CPU): dropped if all are


COMPARE_COLUMNS = [  # (header, key, formatter)
    ("row", "name", str),
    ("tok/s minillama", "minillama_tokens_per_s", _num(".0f")),
    ("tok/s HF", "hf_tokens_per_s", _num(".0f")),
    ("speed x", "tokens_per_s_ratio", _num(".2f")),
    ("peak MiB minillama", "minillama_peak_memory_bytes", lambda v: mib(v, 1)),
    ("peak MiB HF", "hf_peak_memory_bytes", lambda v: mib(v, 1)),
    ("memory x", "peak_memory_ratio", _num(".2f")),
    ("predicted MiB", "predicted_peak_memory_bytes", lambda v: mib(v, 1)),
    ("MFU minillama", "minillama_mfu", _mfu),
    ("MFU HF", "hf_mfu", _mfu),
    ("loss minillama", "minillama_loss", _num(".5f")),
    ("loss HF", "hf_loss", _num(".5f")),
    ("losses agree", "losses_agree", lambda v: "" if v is None else ("yes" if v else "NO")),
]


def _cells(r: dict) -> list[str]:
    if "skipped" in r or "error" in r:
        note = r.get("skipped") or r["error"]
        return [r["name"], f"skipped: {note}" if "skipped" in r else note] + [""] * 5 + [
            mib(r.get("predicted_peak_memory_bytes"), 1)] + [""] * 5
    return [f(r.get(key)) for _, key, f in COMPARE_COLUMNS]


def describe_compare(rows: list[dict], s: Optional[Settings] = None) -> str:
    """One line above the table: where, the packages' versions, the sizes, which rows use kernels or compile."""
    r = rows[0] if rows else {}
    parts = [where_measured(rows), f"transformers {r.get('transformers', '-')}, peft {r.get('peft', '-')}, "
                                   f"bitsandbytes {r.get('bitsandbytes', '-')}"]
    if s:
        parts.append(f"batch {s.batch} x seq {s.seq_len} (long: 1 x {s.long_seq_len}), LoRA r{s.r}")
    if any(x.get("kernels") for x in rows):  # their peak is not the plain autograd model's
        parts.append("train rows: minillama with minillama.kernels, HF by autograd")
    compiled = next((x["compiled"] for x in rows if x.get("compiled", "none") != "none"), "none")
    if compiled != "none":  # not the stack as students run it; memory counted in an eager step
        parts.append("*-compiled: minillama's blocks" + (" and HF's layers" if compiled == "both" else ", HF eager"))
    return " | ".join(parts + ["MiB = 1024**2 bytes, ratios minillama / HF"])


def format_compare(rows: list[dict], fmt: str = "md", header: bool = True, settings: Optional[Settings] = None) -> str:
    """The compared rows as a markdown or plain-text table (header=False in text: the rows only)."""
    if fmt not in ("md", "text"):
        raise ValueError(f"Table format {fmt!r} is unknown: expected 'md' or 'text'.")
    above = describe_compare(rows, settings) if header else ""
    text = table([h for h, _, _ in COMPARE_COLUMNS], [_cells(r) for r in rows], fmt, above=above, name_width=14)
    return text if header or fmt != "text" else "\n".join(text.splitlines()[1:])


def write_compare(rows: list[dict], out_dir, s: Optional[Settings] = None) -> dict[str, Path]:
    """results.json (with the settings), results.csv, table.md, speed.png and memory.png in out_dir."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {k: out / v for k, v in (("json", "results.json"), ("csv", "results.csv"), ("md", "table.md"),
                                       ("speed", "speed.png"), ("memory", "memory.png"))}
    doc = {"settings": asdict(s) if s else None, "rows": rows}
    atomic_write_text(paths["json"], json.dumps(doc, indent=2, default=str))
    write_csv(rows, paths["csv"])
    atomic_write_text(paths["md"], format_compare(rows, "md", settings=s) + "\n")
    measured = [r for r in rows if "tokens_per_s_ratio" in r]
    if measured:
        names = [r["name"] for r in measured]
        plot_bars(measured, "tokens_per_s_ratio", 1, "tokens/s, minillama / HF (>1: minillama faster)", paths["speed"],
                  labels=names)
        plot_bars(measured, "peak_memory_ratio", 1, "peak memory, minillama / HF (<1: minillama smaller)",
                  paths["memory"], labels=names)
    return paths
