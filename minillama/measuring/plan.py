"""`minillama plan`: will this fine-tuning fit on my GPU, and if not, what do I turn on?

The planner runs the analytic memory model (`memory.estimate_memory`) over the course's techniques and
keeps the configurations whose predicted peak fits the device, cheapest first:

    rows = plan(get_preset("llama2-7b"), gpu_mem=24 * GiB, seq_len=2048, batch=4)
    print(format_plan(rows))

The techniques, each one knob of the memory model:
  method          full fine-tuning, LoRA (r, on wq/wv or all linears), QLoRA (LoRA on an NF4 base)
  weights         "bf16" (16-bit weights, the usual GPU setting) or "fp32+amp" (fp32 master weights, bf16
                  autocast); full fine-tuning in pure bf16 weights is listed too (torch AdamW on bf16 weights)
  optimizer       torch AdamW, or bitsandbytes' paged 8-bit AdamW
  checkpointing   recompute every block's activations in the backward pass
  accumulation    the batch split into k micro-batches (same gradient, k smaller steps)
  gpus            FSDP shards full fine-tuning's weights, gradients and optimizer state across the GPUs;
                  LoRA/QLoRA use DDP (every rank holds the whole frozen base) and split the batch

Cost in compute, per token, in units of N (the model's parameters), the usual 2N-per-forward count:
  forward 2N; backward 4N with weight gradients (full fine-tuning), 2N without (a frozen base: only the
  activation gradients flow); checkpointing adds one more forward (2N). Accumulation does not change the
  FLOPs but runs k smaller steps (less efficient on a GPU); 4-bit adds dequantisation time, not FLOPs.
Order: least compute first, then fewest micro-steps, then no 4-bit, then torch AdamW, then lowest peak.

What the model does not count on a GPU: the CUDA context and kernels' workspaces (`reserve`, default
1 GiB) and allocator fragmentation (`headroom`, default 10% of the device): a configuration fits when
peak <= (gpu_mem - reserve) * (1 - headroom). FSDP is modelled as: the sharded static bytes / gpus plus
one block's gathered parameters (and gradients) at a time; its communication buffers are not counted.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Optional

from ..config import ModelArgs
from .memory import GiB, MiB, effective_amp, estimate_memory, format_bytes

METHODS = ("full", "lora", "qlora")
QLORA_QUANT = {"quant_type": "nf4", "double_quant": True, "blocksize": 64}  # the QLoRA paper's setting


@dataclass
class PlanRow:
    method: str
    weights: str  # "bf16" | "fp32+amp"
    optimizer: str
    checkpointing: bool
    accum: int  # micro-steps per optimizer step
    micro_batch: int  # rows per micro-step on one GPU
    gpus: int
    strategy: str  # "single" | "ddp" | "fsdp"
    peak_bytes: int
    at_peak: dict = field(default_factory=dict)
    compute_per_token: int = 0  # in units of N (parameters): 6 = forward + full backward
    fits: bool = False
    lora_r: int = 0
    lora_targets: str = "wq,wv"

    def label(self) -> str:
        parts = [self.method if not self.lora_r else f"{self.method} r={self.lora_r} ({self.lora_targets})",
                 self.weights, self.optimizer]
        if self.checkpointing:
            parts.append("checkpointing")
        if self.accum > 1:
            parts.append(f"accum {self.accum} (micro-batch {self.micro_batch})")
        if self.gpus > 1:
            parts.append(f"{self.strategy} x{self.gpus}")
        return ", ".join(parts)

    def bench_config(self, seq_len: int) -> dict:
        """The `minillama bench` configuration that measures this row on one device (gpus == 1)."""
        cfg = {"mode": "train", "batch": self.micro_batch * self.accum, "seq_len": seq_len,
               "lora": self.lora_r, "optimizer": self.optimizer, "accum": self.accum,
               "checkpointing": int(self.checkpointing), "amp": "bf16" if self.weights == "fp32+amp" else "off"}
        if self.method == "qlora":
            cfg["quant"] = "nf4+dq"
        if self.lora_r:
            cfg["lora_targets"] = self.lora_targets
        return cfg


def compute_per_token(method: str, checkpointing: bool) -> int:
    """FLOPs per token in units of N: forward 2, backward 4 (full) or 2 (frozen base), recompute +2."""
    return 2 + (4 if method == "full" else 2) + (2 if checkpointing else 0)


def _fsdp_peak(args: ModelArgs, est, gpus: int) -> int:
    """FSDP (full fine-tuning): parameters, gradients and optimizer state sharded over `gpus`, plus one
    block's parameters and gradients gathered at a time; activations and temporaries per rank as before."""
    static = est.by_category["parameters"] + est.by_category["gradients"] + est.by_category["optimizer_state"]
    block_share = (est.by_category["parameters"] + est.by_category["gradients"]) / max(args.n_layers, 1)
    others = est.peak_bytes - sum(est.at_peak.get(c, 0) for c in ("parameters", "gradients", "optimizer_state"))
    return int(static / gpus + block_share + others)


def _candidates(method: str, batch: int, gpus: int, lora_r: int, device: str):
    """Every combination of the knobs that makes sense for a method."""
    weights = ("bf16", "fp32+amp")
    optimizers = ("adamw", "paged_adamw8bit")
    per_gpu = batch // gpus  # DDP and FSDP both split the batch over the ranks
    accums = [k for k in (1, 2, 4, 8, 16, 32, 64) if per_gpu % k == 0]
    targets = ("wq,wv", "all") if method != "full" else ("",)
    for w, opt, ckpt, k, tg in itertools.product(weights, optimizers, (False, True), accums, targets):
        if method == "qlora" and w == "fp32+amp" and device == "cuda":
            continue  # QLoRA computes in bf16 on a GPU; fp32 compute would only cost memory
        yield dict(weights=w, optimizer=opt, checkpointing=ckpt, accum=k, micro_batch=per_gpu // k,
                   lora_targets=tg)


def _estimate(args: ModelArgs, method: str, c: dict, seq_len: int, lora_r: int, device: str):
    """The memory model's estimate of one candidate on one GPU (before FSDP sharding)."""
    lora = None if method == "full" else {"r": lora_r, "targets": ("wq", "wv") if c["lora_targets"] == "wq,wv"
                                          else "all"}
    return estimate_memory(args, batch=c["micro_batch"], seq_len=seq_len, mode="train",
                           param_dtype="bf16" if c["weights"] == "bf16" else "fp32",
                           amp="bf16" if c["weights"] == "fp32+amp" else None, lora=lora,
                           quant4=dict(QLORA_QUANT) if method == "qlora" else None, optimizer=c["optimizer"],
                           checkpointing=c["checkpointing"], grad_accum=c["accum"], device=device)


def check_plan_inputs(gpu_mem, seq_len, batch, gpus, lora_r, methods) -> None:
    for name, v in (("gpu_mem", gpu_mem), ("seq_len", seq_len), ("batch", batch), ("gpus", gpus),
                    ("lora_r", lora_r)):
        if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
            raise ValueError(f"plan: {name}={v!r} is invalid: expected a positive integer.")
    if batch % gpus:
        raise ValueError(f"plan: batch={batch} is not divisible by gpus={gpus}: every GPU needs the same rows.")
    bad = [m for m in methods if m not in METHODS]
    if bad:
        raise ValueError(f"plan: unknown method(s) {bad}: expected some of {METHODS}.")


def usable_bytes(gpu_mem: int, device: str = "cuda", reserve: Optional[int] = None,
                 headroom: Optional[float] = None) -> float:
    """What of a device's gpu_mem bytes a step's predicted peak may use: (gpu_mem - reserve) * (1 - headroom);
    on CUDA by default 1 GiB for the context and kernels' workspaces and 10% for fragmentation, nothing on CPU."""
    reserve = (1 * GiB if device == "cuda" else 0) if reserve is None else reserve
    headroom = (0.10 if device == "cuda" else 0.0) if headroom is None else headroom
    return (gpu_mem - reserve) * (1 - headroom)


def plan(args: ModelArgs, *, gpu_mem: int, seq_len: int = 2048, batch: int = 4, gpus: int = 1, lora_r: int = 16,
         methods=METHODS, device: str = "cuda", reserve: Optional[int] = None, headroom: Optional[float] = None
         ) -> list[PlanRow]:
    """Every candidate configuration with its predicted peak per GPU, fitting ones first, best first."""
    check_plan_inputs(gpu_mem, seq_len, batch, gpus, lora_r, methods)
    if seq_len > args.max_seq_len:
        raise ValueError(f"plan: seq_len={seq_len} is longer than the model's max_seq_len={args.max_seq_len}: "
                         f"extend the context first (RoPE scaling, notebook 07).")
    usable = usable_bytes(gpu_mem, device, reserve, headroom)
    rows = []
    for method in methods:
        for c in _candidates(method, batch, gpus, lora_r, device):
            est = _estimate(args, method, c, seq_len, lora_r, device)
            strategy = "single" if gpus == 1 else ("fsdp" if method == "full" else "ddp")
            peak = _fsdp_peak(args, est, gpus) if strategy == "fsdp" else est.peak_bytes
            rows.append(PlanRow(method=method, gpus=gpus, strategy=strategy, peak_bytes=peak, at_peak=est.at_peak,
                                compute_per_token=compute_per_token(method, c["checkpointing"]),
                                fits=peak <= usable, lora_r=0 if method == "full" else lora_r, **c))
    rows.sort(key=_rank)
    return rows


def _rank(r: PlanRow):
    return (not r.fits, r.compute_per_token, r.accum, r.method == "qlora", r.optimizer != "adamw", r.peak_bytes)


def best_per_method(rows: list[PlanRow]) -> list[PlanRow]:
    """The first fitting row of each method (rows are sorted best first)."""
    seen, out = set(), []
    for r in rows:
        if r.fits and r.method not in seen:
            seen.add(r.method)
            out.append(r)
    return out


def format_plan(rows: list[PlanRow], *, gpu_mem: int, top: int = 8) -> str:
    """The answer as text: the best configuration of each method, then the other fitting ones, or a plain no."""
    fitting = [r for r in rows if r.fits]
    lines = [f"{'peak/GPU':>10}  {'compute':>8}  configuration"]

    def line(r):
        return f"{format_bytes(r.peak_bytes):>10}  {r.compute_per_token:>6}N  {r.label()}"

    if not fitting:
        smallest = min(rows, key=lambda r: r.peak_bytes)
        return (f"Nothing fits in {format_bytes(gpu_mem)}: the smallest predicted peak is "
                f"{format_bytes(smallest.peak_bytes)} ({smallest.label()}); use more GPUs, a shorter sequence, "
                f"a smaller batch or a smaller model.")
    best = best_per_method(rows)
    lines += ["best per method:"] + [line(r) for r in best]
    rest = [r for r in fitting if r not in best][: max(top - len(best), 0)]
    if rest:
        lines += ["other fitting configurations:"] + [line(r) for r in rest]
    lines.append(f"{len(fitting)} of {len(rows)} configurations fit in {format_bytes(gpu_mem)}; compute is "
                 f"FLOPs per token in units of N parameters (2N forward, 4N/2N backward, +2N checkpointing).")
    return "\n".join(lines)


def parse_size(text: str) -> int:
    """'24GiB', '80GB', '512MiB', '24' (GiB) -> bytes. GB/MB are decimal, GiB/MiB binary."""
    units = {"gib": GiB, "mib": MiB, "kib": 1024, "gb": 10**9, "mb": 10**6, "kb": 10**3, "b": 1, "": GiB}
    t = str(text).strip().lower().replace(" ", "")
    num = t.rstrip("abcdefghijklmnopqrstuvwxyz")
    unit = t[len(num):]
    try:
        value = float(num)
    except ValueError:
        value = -1
    if unit not in units or value <= 0:
        raise ValueError(f"--gpu-mem {text!r} is invalid: expected a size like 24GiB, 80GB or 512MiB.")
    return int(value * units[unit])


# ---- the pre-flight check of `minillama train` ------------------------------------------------------
PREFLIGHT_HEADROOM = 0.10  # allocator fragmentation, as the planner's default headroom


def train_step_need(args: ModelArgs, *, batch: int, seq_len: int, param_dtype, amp: str = "off", lora=None,
                    quant4=None, optimizer: str = "adamw", checkpointing: bool = False, grad_accum: int = 1,
                    device: str = "cuda", strategy: str = "single", gpus: int = 1, kernels: bool = True):
    """The memory model's peak of one training step on one rank, as `minillama train` runs it: batch is the
    micro-batch; AMP as memory.effective_amp says (autocast over fp32 master weights; 16-bit weights already
    compute in 16 bits); FSDP shards full fine-tuning's static bytes over `gpus`
    (_fsdp_peak). Returns the MemoryEstimate with its peak_bytes replaced by the per-rank peak."""
    from dataclasses import replace

    est = estimate_memory(args, batch=batch, seq_len=seq_len, mode="train", param_dtype=param_dtype,
                          amp=effective_amp(amp, param_dtype), lora=lora, quant4=quant4,
                          optimizer=optimizer, checkpointing=checkpointing, grad_accum=grad_accum, device=device,
                          kernels=kernels)
    if strategy == "fsdp" and gpus > 1:
        est = replace(est, peak_bytes=_fsdp_peak(args, est, gpus))
    return est


def preflight_message(need: int, *, free_bytes: int, loaded_bytes: int, where: str,
                      headroom: float = PREFLIGHT_HEADROOM) -> Optional[str]:
    """None when a step whose whole predicted peak is `need` bytes fits, else the sentence that refuses it.

    The check runs after the weights are loaded: `free_bytes` (the device's free memory then) no longer
    contains them, so the peak, weights included, is compared with free + loaded (`loaded_bytes`: what the
    model already holds on the device), less `headroom` for fragmentation. Counting the weights in the peak
    and against the free memory both would refuse 7B full fine-tuning on an 80 GiB card."""
    budget = (free_bytes + loaded_bytes) * (1 - headroom)
    if need <= budget:
        return None
    return (f"one training step needs about {format_bytes(need)} (predicted, weights included), more than the "
            f"{format_bytes(int(budget))} usable on {where} ({format_bytes(free_bytes)} free + "
            f"{format_bytes(loaded_bytes)} already loaded, less {headroom:.0%} for fragmentation)")
