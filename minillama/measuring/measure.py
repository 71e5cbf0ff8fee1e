"""How the course measures a technique: peak memory by category, step time, tokens/s, FLOPs, MFU.

    tracker = MemoryTracker(model, optimizer)
    with tracker:
        train_step()
    tracker.peak_bytes, tracker.by_category()    # exact bytes, the same on every run

    m = measure(train_step, model=model, optimizer=optimizer, tokens_per_step=B * T, name="lora r8")
    m.to_row()                                   # one flat, JSON-able row of a benchmark table

Memory is counted by `MemoryTracker`, a TorchDispatchMode that watches every tensor storage that
PyTorch operators allocate. It gives exact, deterministic numbers on CPU and on CUDA and says *what*
the memory at the peak was (parameters, gradients, optimizer state, activations, temporaries).
On CUDA, `measure` also reports `torch.cuda.max_memory_allocated` / `max_memory_reserved` for the
same step, so a table can show how far the allocator's real footprint is from the tensors' bytes.
"""

from __future__ import annotations

import gc
import platform
import re
import statistics
import time
import weakref
from dataclasses import dataclass, field
from typing import Callable, Iterable, Optional

import torch
from torch.utils._python_dispatch import TorchDispatchMode, is_traceable_wrapper_subclass
from torch.utils._pytree import tree_leaves
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count
from torch.utils.weak import WeakIdKeyDictionary

CATEGORIES = ("parameters", "gradients", "optimizer_state", "activations", "temporary")

# Dense (no sparsity) peak FLOP/s by compute dtype, from NVIDIA's data sheets (the sparse figures they print first
# are halved): "bf16"/"fp16" tensor cores, "tf32" tensor cores (fp32 matmuls when torch allows TF32), "fp32"
# without tensor cores. Keyed by a regular expression matched against the device name, first match wins, so
# specific names come first; None: the card has no such unit (T4 and V100 have no bf16, T4 no TF32).
#   A100 (SXM and PCIe, 40 and 80 GB): A100 data sheet. H100 SXM / PCIe / NVL, H200 SXM / NVL: H100 and H200 data
#   sheets. L4, T4, A10G, V100, RTX 4090: their data sheets (4090: fp16/bf16 with fp32 accumulation).
PEAK_FLOPS: dict[str, dict[str, Optional[float]]] = {
    r"H200.*NVL": dict(bf16=835.5e12, fp16=835.5e12, tf32=417.5e12, fp32=60e12),
    r"H200": dict(bf16=989.5e12, fp16=989.5e12, tf32=494.5e12, fp32=67e12),  # SXM ("NVIDIA H200")
    r"H100.*NVL": dict(bf16=835.5e12, fp16=835.5e12, tf32=417.5e12, fp32=60e12),
    r"H100.*PCIe": dict(bf16=756e12, fp16=756e12, tf32=378e12, fp32=51e12),
    r"H100": dict(bf16=989.5e12, fp16=989.5e12, tf32=494.5e12, fp32=67e12),  # SXM ("NVIDIA H100 80GB HBM3")
    r"A100": dict(bf16=312e12, fp16=312e12, tf32=156e12, fp32=19.5e12),  # SXM and PCIe, 40 and 80 GB alike
    r"A10G": dict(bf16=125e12, fp16=125e12, tf32=62.5e12, fp32=31.2e12),
    r"\bL4\b": dict(bf16=121e12, fp16=121e12, tf32=60e12, fp32=30.3e12),  # not L40 / L40S
    r"RTX 4090": dict(bf16=165.2e12, fp16=165.2e12, tf32=82.6e12, fp32=82.6e12),
    r"V100": dict(bf16=None, fp16=125e12, tf32=None, fp32=15.7e12),
    r"\bT4\b": dict(bf16=None, fp16=65e12, tf32=None, fp32=8.1e12),
}
# Streaming multiprocessors of the whole GPU, for MIG slices (a slice's peak is its share of the SMs)
FULL_SMS = {r"H200": 132, r"H100.*PCIe": 114, r"H100": 132, r"A100": 108}
MIG_SLICES = 7  # a MIG profile "<g>g.<mem>gb" has g of the GPU's 7 compute slices


# ---- devices ------------------------------------------------------------------------------------
def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def device_name(device) -> str:
    """A name for the tables: "cpu (<processor>)" or the CUDA device name, e.g. "NVIDIA H100 80GB HBM3"."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "cpu":
        return f"cpu ({_cpu_model()})"
    return device.type


def _lookup(table: dict, name: str):
    for pattern, value in table.items():
        if re.search(pattern, name, flags=re.IGNORECASE):
            return value
    return None


def peak_flops_for_name(name: str, dtype: str = "bf16", sm_count: Optional[int] = None) -> Optional[float]:
    """Dense peak FLOP/s of a device by its name, for compute in `dtype` ("bf16", "fp16", "tf32", "fp32");
    None when the name is unknown or the card has no such unit. A MIG slice ("NVIDIA A100-SXM4-40GB MIG
    3g.20gb") gets its share of the GPU: sm_count / the full GPU's SMs when the slice's SM count is given
    (torch.cuda.get_device_properties(...).multi_processor_count), else g / 7 compute slices."""
    if dtype not in ("bf16", "fp16", "tf32", "fp32"):
        raise ValueError(f"peak_flops_for_name(dtype={dtype!r}): expected 'bf16', 'fp16', 'tf32' or 'fp32'.")
    peaks = _lookup(PEAK_FLOPS, name)
    peak = peaks.get(dtype) if peaks else None
    mig = re.search(r"\bMIG\s+(\d+)g\.", name, flags=re.IGNORECASE)
    if peak is None or not mig:
        return peak
    full = _lookup(FULL_SMS, name)
    if sm_count and full:
        return peak * min(sm_count, full) / full
    return peak * int(mig.group(1)) / MIG_SLICES


def compute_dtype_name(dtype: torch.dtype) -> str:
    """Which peak a matmul in `dtype` runs against: bf16, fp16, or for fp32 "tf32" when torch lets fp32
    matmuls use TF32 tensor cores (torch.set_float32_matmul_precision "high"/"medium"), else "fp32"."""
    if dtype in (torch.bfloat16, torch.float16):
        return "bf16" if dtype == torch.bfloat16 else "fp16"
    return "fp32" if torch.get_float32_matmul_precision() == "highest" else "tf32"


def device_peak_flops(device, dtype: torch.dtype = torch.bfloat16) -> Optional[float]:
    """Dense peak FLOP/s of a CUDA device for compute in `dtype` (compute_dtype_name); None for a CPU or an
    unknown device (MFU unknown). MIG slices are scaled by their SMs."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    props = torch.cuda.get_device_properties(device)
    return peak_flops_for_name(props.name, compute_dtype_name(dtype), props.multi_processor_count)


def mfu(model_flops_per_token: float, tokens: int, seconds: float, peak_flops: Optional[float]) -> Optional[float]:
    """Model FLOPs utilisation, the one definition every table uses: model FLOPs per token (by formula,
    model_flops_per_token: checkpointing's recomputation is NOT model FLOPs) x tokens / seconds / the dense peak
    of the device for the compute dtype (device_peak_flops). None when the peak is unknown (a CPU)."""
    if not peak_flops or seconds <= 0:
        return None
    return model_flops_per_token * tokens / seconds / peak_flops


# ---- memory -------------------------------------------------------------------------------------
class _Record:
    """One live tensor storage: its size and what it turned out to be."""

    __slots__ = ("nbytes", "category", "finalizer")

    def __init__(self, nbytes: int, category: str):
        self.nbytes, self.category, self.finalizer = nbytes, category, None


def _storages(tensors: Iterable) -> Iterable[torch.UntypedStorage]:
    """The untyped storages behind some tensors (non-tensors are skipped)."""
    for t in tensors:
        if not isinstance(t, torch.Tensor):
            continue
        if is_traceable_wrapper_subclass(t):  # a tensor subclass that wraps inner tensors (e.g. an NF4 tensor)
            yield from _storages(getattr(t, name) for name in t.__tensor_flatten__()[0])
            continue
        try:
            yield t.untyped_storage()
        except (RuntimeError, NotImplementedError):  # sparse / nested tensors have no single storage
            pass


def _attached_tensors(obj, depth: int = 3) -> Iterable[torch.Tensor]:
    """Tensors hanging off a parameter as Python attributes: bitsandbytes keeps the 4-bit constants
    in `weight.quant_state` (absmax, code, and a nested `state2`) and 8-bit scales in `weight.SCB`."""
    for value in getattr(obj, "__dict__", {}).values():
        if isinstance(value, torch.Tensor):
            yield value
        elif depth > 1 and hasattr(value, "__dict__") and not isinstance(value, (torch.nn.Module, type)):
            yield from _attached_tensors(value, depth - 1)


def _model_tensors(model: torch.nn.Module) -> Iterable[torch.Tensor]:
    """Parameters, buffers and the tensors attached to parameters: all counted as "parameters"."""
    for p in model.parameters():
        yield p
        yield from _attached_tensors(p)
    yield from model.buffers()


def _optimizer_tensors(optimizer: Optional[torch.optim.Optimizer]) -> Iterable[torch.Tensor]:
    if optimizer is None:
        return
    for state in optimizer.state.values():
        yield from (v for v in state.values() if isinstance(v, torch.Tensor))


def model_bytes(model: torch.nn.Module) -> int:
    """Bytes the model already holds: its parameters, buffers and the 4-bit constants attached to them, each
    storage once (what MemoryTracker counts as "parameters" on entering)."""
    seen = {}
    for storage in _storages(_model_tensors(model)):
        seen[(str(storage.device), storage.data_ptr())] = storage.nbytes()
    return sum(seen.values())


def _model_device(model: torch.nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


class MemoryTracker(TorchDispatchMode):
    """Exact, deterministic bytes of tensor storages by category, and the peak. Works on CPU and CUDA.

    How it counts:

    - On entering, the storages that already live are counted: parameters and buffers of `model`
      ("parameters"), existing `.grad` tensors ("gradients"), the optimizer's state ("optimizer_state").
    - Every PyTorch operator passes through `__torch_dispatch__`. An output whose storage we have not
      seen, and that is not the storage of one of the op's inputs, is a new allocation: we keep a small
      record of its bytes (category "temporary" to begin with) and a weakref finalizer that subtracts it
      when the storage is freed. Views and in-place ops share their input's storage, so nothing is
      counted twice. Each time the live total passes the peak, we keep the list of live records.
    - A tensor that autograd saves for the backward pass (a saved_tensors_hooks pack hook) becomes
      "activations". When a gradient is accumulated into `p.grad` it becomes "gradients"; after
      `optimizer.step()` the optimizer's state is "optimizer_state". On exit every storage that is then
      a parameter, a gradient or optimizer state gets that category. The peak keeps record *objects*,
      not addresses, so its categories say what each storage turned out to be.

    What it does NOT see: memory outside tensor storages made by operators. On CUDA that is the
    caching allocator's rounding, cached free blocks and fragmentation, the CUDA context, cuBLAS/cuDNN
    workspaces and NCCL buffers (compare `torch.cuda.max_memory_allocated` and `max_memory_reserved`,
    which `measure` reports next to the tracker's peak). Nor does it count storages that existed before
    entering and are not model or optimizer state (an input batch made earlier, say), memory made
    outside the dispatcher (`torch.from_numpy`, bitsandbytes' paged optimizer buffers, a direct
    `UntypedStorage.resize_`), or storages on another device than the model's (a non-fused AdamW keeps
    its `step` counters on the CPU when the model is on CUDA; the trainer's fused AdamW keeps them on the
    parameters' device, where they are counted). Tensors saved under someone else's saved-tensor
    hooks (activation checkpointing, CPU offload) are not marked "activations": recomputed ones show
    as "temporary".

    The Python garbage collector is paused while tracking, so storages held in reference cycles are
    freed at the same moment on every run: the numbers are deterministic.
    """

    def __init__(self, model: torch.nn.Module, optimizer: Optional[torch.optim.Optimizer] = None,
                 device=None):
        super().__init__()
        self.model, self.optimizer = model, optimizer
        self.device = torch.device(device) if device is not None else _model_device(model)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.peak_bytes = 0
        self.current_bytes = 0
        self._peak_records: list[_Record] = []
        self._end_records: list[_Record] = []

    # -- the counting ---------------------------------------------------------------------------
    def _on_this_device(self, storage: torch.UntypedStorage) -> bool:
        d = storage.device
        return d.type == self.device.type and (d.index is None or d.index == self.device.index)

    def _add(self, storage: torch.UntypedStorage, category: str) -> _Record:
        """Start counting a storage that we see for the first time."""
        record = _Record(storage.nbytes(), category)
        record.finalizer = weakref.finalize(storage, self._free, record)
        self._records[storage] = record
        self._live.add(record)
        self.current_bytes += record.nbytes
        if self.current_bytes > self.peak_bytes:
            self.peak_bytes = self.current_bytes
            self._peak_records = list(self._live)
        return record

    def _free(self, record: _Record) -> None:
        """Called by the weakref finalizer when a storage is freed."""
        self._live.discard(record)
        self.current_bytes -= record.nbytes

    def _mark(self, tensors: Iterable, category: str) -> None:
        """Give these tensors' storages a category (counting them if they were not counted yet)."""
        for storage in _storages(tensors):
            if not self._on_this_device(storage):
                continue
            record = self._records.get(storage)
            if record is None:
                self._add(storage, category)
            else:
                record.category = category

    def _mark_model_state(self) -> None:
        self._mark(_model_tensors(self.model), "parameters")
        self._mark((p.grad for p in self.model.parameters() if p.grad is not None), "gradients")
        self._mark(_optimizer_tensors(self.optimizer), "optimizer_state")

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = list(_storages(tree_leaves((args, kwargs))))
        input_ids = {id(s) for s in inputs}
        # torch.tensor(...) fills its data outside the dispatcher and then hands it to aten.lift_fresh:
        # the one place we see that allocation, although it arrives as an "input".
        fresh = func in (torch.ops.aten.lift_fresh.default, torch.ops.aten.lift_fresh_copy.default)
        for storage in _storages(tree_leaves(out)):
            if not self._on_this_device(storage):
                continue
            record = self._records.get(storage)
            if record is None:
                if fresh or id(storage) not in input_ids:  # else: an input we never counted, e.g. the batch
                    self._add(storage, "temporary")
            elif record.nbytes != storage.nbytes():  # resized by an out= op: new buffer first, then the old freed
                self._add(storage, record.category)
                record.finalizer()
        return out

    def _pack(self, tensor: torch.Tensor):
        """saved_tensors_hooks pack hook: a tensor kept for backward is an activation."""
        for storage in _storages([tensor]):
            record = self._records.get(storage)
            if record is not None and record.category == "temporary":
                record.category = "activations"
        # detach(): the same storage, without the grad_fn. Saving `tensor` itself would make a
        # reference cycle (output -> grad_fn -> saved output) that only the garbage collector frees.
        return tensor.detach()

    # -- entering and leaving -------------------------------------------------------------------
    def __enter__(self):
        gc.collect()  # free what is already garbage, then keep the collector out of the measurement
        self._gc_was_enabled = gc.isenabled()
        gc.disable()
        self._records = WeakIdKeyDictionary()  # storage -> _Record, for storages we count
        self._live: set[_Record] = set()
        self.peak_bytes = self.current_bytes = 0
        self._peak_records = []
        self._mark_model_state()  # the peak so far is what already lives
        self._handles = [p.register_post_accumulate_grad_hook(lambda p: self._mark([p.grad], "gradients"))
                         for p in self.model.parameters() if p.requires_grad]
        if self.optimizer is not None:
            self._handles.append(self.optimizer.register_step_post_hook(
                lambda *_: self._mark(_optimizer_tensors(self.optimizer), "optimizer_state")))
        self._saved_hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        self._saved_hooks.__enter__()
        return super().__enter__()

    def __exit__(self, *exc):
        result = super().__exit__(*exc)
        self._saved_hooks.__exit__(*exc)
        for handle in self._handles:
            handle.remove()
        self._mark_model_state()  # what each storage turned out to be, also for the peak's records
        self._end_records = list(self._live)
        for record in self._live:  # stop listening: later frees are no business of this tracker
            record.finalizer.detach()
        self._live, self._records = set(), WeakIdKeyDictionary()
        if self._gc_was_enabled:
            gc.enable()
        return result

    def by_category(self, at: str = "peak") -> dict[str, int]:
        """Bytes per category (keys: CATEGORIES) at the peak (they sum to peak_bytes), or, with
        at="end", of the storages still alive when the tracker was left."""
        if at not in ("peak", "end"):
            raise ValueError(f"by_category(at={at!r}): expected 'peak' or 'end'.")
        out = dict.fromkeys(CATEGORIES, 0)
        for record in self._peak_records if at == "peak" else self._end_records:
            out[record.category] += record.nbytes
        return out


# ---- FLOPs --------------------------------------------------------------------------------------
# FlopCounterMode knows the CUDA attention kernels but not the CPU one; count it with the same formulas
# so that a step has the same FLOPs on every device. (FlopCounterMode passes shapes, not tensors.)
def _cpu_sdpa_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _cpu_sdpa_backward_flops(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None,
                             **kwargs) -> int:
    return sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


_CPU_SDPA_FLOPS = {
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa_flops,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_sdpa_backward_flops,
}


def count_flops(fn: Callable[[], object]) -> int:
    """FLOPs of one call of fn() (matrix products and attention, forward and backward), counted by
    torch.utils.flop_counter.FlopCounterMode: a multiply-add is 2 FLOPs; element-wise ops count 0;
    attention is counted as if unmasked (causal masking is not subtracted)."""
    with FlopCounterMode(display=False, custom_mapping=_CPU_SDPA_FLOPS) as counter:
        fn()
    return counter.get_total_flops()


def model_flops_per_token(args, seq_len: int, kind: str = "full") -> int:
    """FLOPs per token by formula (the PaLM / nanoGPT convention for MFU; recomputation not counted).

    N = the parameters of the matrix products (the seven linears of every block and the output head;
    embeddings are a lookup). A multiply-add is 2 FLOPs, so the forward is 2N; the backward is 2N for the
    gradient of the activations and 2N for the weights' gradients. kind="full": 6N (everything trains);
    "lora": 4N (a frozen base has no weight gradients; the adapters are a rounding error); "inference": 2N.
    Attention adds 2 * 2 * seq_len * (n_heads * head_dim) per layer in the forward (q k^T and p v, unmasked,
    as count_flops counts it), three times that in training.
    """
    if kind not in ("full", "lora", "inference"):
        raise ValueError(f"model_flops_per_token(kind={kind!r}): expected 'full', 'lora' or 'inference'.")
    n = sum(o * i for o, i in args.linear_shapes().values()) * args.n_layers + args.vocab_size * args.dim
    attention = 4 * seq_len * args.n_heads * args.head_dim * args.n_layers
    if kind == "inference":
        return 2 * n + attention
    return (6 if kind == "full" else 4) * n + 3 * attention


# ---- one measurement ----------------------------------------------------------------------------
@dataclass
class Measurement:
    name: str
    peak_memory_bytes: int  # MemoryTracker's peak
    memory_by_category: dict[str, int]  # at the peak; sums to peak_memory_bytes
    step_time_s: float  # median over the timed repeats
    tokens_per_s: float
    flops_per_step: int
    mfu: Optional[float]  # mfu(): model FLOPs (formula) / step_time_s / dtype-matched device peak; None if unknown
    cuda_max_allocated_bytes: Optional[int]  # torch.cuda.max_memory_allocated during the tracked step
    cuda_max_reserved_bytes: Optional[int]
    meta: dict = field(default_factory=dict)

    def to_row(self) -> dict:
        """One flat, JSON-able dict: the measured fields, then every meta key (a meta key never
        overrides a measured field)."""
        row = {
            "name": self.name,
            "peak_memory_bytes": self.peak_memory_bytes,
            "memory_by_category": dict(self.memory_by_category),
            "step_time_s": self.step_time_s,
            "tokens_per_s": self.tokens_per_s,
            "flops_per_step": self.flops_per_step,
            "mfu": self.mfu,
            "cuda_max_allocated_bytes": self.cuda_max_allocated_bytes,
            "cuda_max_reserved_bytes": self.cuda_max_reserved_bytes,
        }
        row.update({k: _jsonable(v) for k, v in self.meta.items() if k not in row})
        return row


def _jsonable(v):
    if isinstance(v, (torch.dtype, torch.device)):
        return str(v).removeprefix("torch.")
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    return str(v)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def alternate_times(fns: dict[str, Callable], device, repeats: int, warmup: int = 0) -> dict[str, list[float]]:
    """Seconds of `repeats` calls of every function, alternating their order (A B C, C B A, ...) so that a change
    in the machine's load hits every function alike, after `warmup` untimed calls of each. CUDA is synchronised
    before and after every timed call (no-op on the CPU): a GPU only queues kernels, and without the first
    sync a timing would absorb the previous call's unfinished work (an optimizer step's kernels, say).
    Returns {name: [seconds per repeat]}. The one alternating timer: bench --compare and the notebooks use it."""
    device = torch.device(device)
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times = {k: [] for k in fns}
    order = list(fns)
    for i in range(repeats):
        for k in order if i % 2 == 0 else order[::-1]:
            _sync(device)
            t0 = time.perf_counter()
            fns[k]()
            _sync(device)
            times[k].append(time.perf_counter() - t0)
    return times


def track_memory(step_fn: Callable[[], object], model: torch.nn.Module,
                 optimizer: Optional[torch.optim.Optimizer] = None) -> tuple[MemoryTracker, Optional[int], Optional[int]]:
    """One call of step_fn() under a MemoryTracker; on CUDA also torch.cuda.max_memory_allocated and
    max_memory_reserved of that call (None on other devices). Returns (tracker, max_allocated, max_reserved)."""
    device = _model_device(model)
    if device.type == "cuda":
        gc.collect()  # garbage from the warm-up would otherwise count in max_memory_allocated
        torch.cuda.reset_peak_memory_stats(device)
    tracker = MemoryTracker(model, optimizer)
    with tracker:
        step_fn()
        _sync(device)
    if device.type != "cuda":
        return tracker, None, None
    return tracker, torch.cuda.max_memory_allocated(device), torch.cuda.max_memory_reserved(device)


def measure(step_fn: Callable[[], object], *, model: torch.nn.Module,
            optimizer: Optional[torch.optim.Optimizer] = None, tokens_per_step: int, name: str = "",
            warmup: int = 1, repeats: int = 3, meta: Optional[dict] = None,
            model_flops_per_token: Optional[float] = None, compute_dtype: Optional[torch.dtype] = None
            ) -> Measurement:
    """Measure one step of training (or inference) of `model`.

    step_fn() runs one whole step, e.g. forward + backward + optimizer.step() + zero_grad(set_to_none=True),
    or a no-grad forward. In order: `warmup` untracked calls (so the optimizer state exists, as in a
    real run); one call under MemoryTracker (on CUDA also max_memory_allocated/reserved, after
    reset_peak_memory_stats); one call under count_flops; `repeats` timed calls without any tracker
    (it slows things down), synchronising CUDA around each. step_time_s is their median.

    meta gets device, device_name, torch (version), dtype (of the model's first parameter), params,
    trainable_params, warmup, repeats (and threads on CPU); keys in the caller's `meta` take precedence.
    mfu: given the model FLOPs per token (model_flops_per_token(args, seq_len, kind), no recomputation) and the
    dtype the matmuls run in (default: the first parameter's; the autocast dtype under AMP), mfu(); else None.
    flops_per_step stays what count_flops counted, recomputation included.
    """
    if repeats < 1 or warmup < 0:
        raise ValueError(f"measure(): repeats={repeats} must be >= 1 and warmup={warmup} >= 0.")
    if tokens_per_step <= 0:
        raise ValueError(f"measure(): tokens_per_step={tokens_per_step} must be a positive integer.")
    device = _model_device(model)
    for _ in range(warmup):
        step_fn()
    _sync(device)

    tracker, max_allocated, max_reserved = track_memory(step_fn, model, optimizer)
    flops = count_flops(step_fn)

    times = []
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        step_fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    step_time = statistics.median(times)

    first = next(model.parameters(), None)
    dtype = compute_dtype or (first.dtype if first is not None else torch.float32)
    peak_flops = device_peak_flops(device, dtype)
    info = {
        "device": str(device),
        "device_name": device_name(device),
        "torch": torch.__version__,
        "dtype": str(first.dtype).removeprefix("torch.") if first is not None else None,
        "params": sum(p.numel() for p in model.parameters()),
        "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "warmup": warmup,
        "repeats": repeats,
        "step_times_s": times,  # every timed repeat, in order: the spread says what a time difference is worth
        "peak_flops": peak_flops,  # the dense peak MFU is taken against (dtype-matched), None where unknown
    }
    if device.type == "cpu":
        info["threads"] = torch.get_num_threads()
    info.update(meta or {})
    return Measurement(
        name=name,
        peak_memory_bytes=tracker.peak_bytes,
        memory_by_category=tracker.by_category(),
        step_time_s=step_time,
        tokens_per_s=tokens_per_step / step_time,
        flops_per_step=flops,
        mfu=mfu(model_flops_per_token, tokens_per_step, step_time, peak_flops) if model_flops_per_token else None,
        cuda_max_allocated_bytes=max_allocated,
        cuda_max_reserved_bytes=max_reserved,
        meta=info,
    )
