"""4-bit weights (QLoRA, Dettmers et al. 2023): blockwise NF4 / FP4 with double quantisation, by hand.

A weight W is cut into blocks of `blocksize` consecutive values (row-major order, the last block may be
shorter). Each block is scaled by its absolute maximum, and each scaled value in [-1, 1] is replaced by the
index of the nearest of 16 levels (the code book):

    absmax_b = max_i |W_i|                           over the block b that holds element i
    idx_i    = argmin_j |W_i / absmax_b - code_j|    (4 bits; a tie goes to the lower level)
    W_i     ~= code[idx_i] * absmax_b                (dequantisation)

Two code books: NF4, the QLoRA paper's NormalFloat (levels at quantiles of a standard normal, so that
normally distributed weights use every level about equally often; one exact zero), and FP4, a 4-bit float
with 1 sign, 2 exponent and 1 mantissa bit as bitsandbytes defines it. Two indices share a byte, the first
element in the high nibble; an odd element count is padded with the index of 0.0. The packed bytes have
bitsandbytes' shape [(numel + 1) // 2, 1].

Double quantisation (QLoRA's second trick) stores the fp32 absmax constants themselves in 8 bits: their mean
is subtracted, and the rest is quantised blockwise (blocks of 256) with bitsandbytes' signed 8-bit "dynamic"
map. Constants then cost 8/64 + 32/(64 * 256) = 0.127 bits per weight instead of 32/64 = 0.5.

`quantize_4bit` agrees with bitsandbytes 0.50.2 (`bitsandbytes.functional.quantize_4bit`) to the bit on CPU:
the same packed bytes (NF4), the same code values (FP4, whose zero has two codes) and the same absmax; with
double quantisation the 8-bit constants differ in about 0.2% of blocks (see _double_quantize). The state object names its parts as bitsandbytes' `QuantState.as_dict` does, so a checkpoint
can hold them under transformers' keys (`weight.absmax`, `weight.quant_map`, `weight.nested_absmax`,
`weight.nested_quant_map`, `weight.quant_state.bitsandbytes__nf4`).

`Linear4bit` is a frozen linear layer holding the packed weight; it dequantises per forward (and again in
backward, so the 16-bit weight never stays alive). `quantize_model` swaps the attention and feed-forward
linears of a Transformer for it (or for bitsandbytes' own `Linear4bit` with backend="bnb"). LoRA adapters
go on top (`minillama.lora.apply_lora`), which is QLoRA.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .config import parse_dtype

QUANT_TYPES = ("nf4", "fp4")
BACKENDS = ("minillama", "bnb")
NESTED_BLOCKSIZE = 256  # double quantisation: blocks of 256 absmax values, as in QLoRA and bitsandbytes
QUANTIZE_CHUNK = 1 << 20  # quantize_4bit works on this many values at a time (bounds its temporaries to ~26 MB)
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# The linears that get 4 bits, by parent module (Meta's names; the same seven LoRA can target).
QUANTIZED_LINEARS = {"attention": ("wq", "wk", "wv", "wo"), "feed_forward": ("w1", "w2", "w3")}

# NF4 (QLoRA paper, appendix; bitsandbytes' get_4bit_type("nf4")): 7 negative levels at the normal quantiles of
# linspace(0.9677083, 0.5, 8)[:-1], 8 positive ones at those of linspace(0.9677083, 0.5, 9)[:-1], and an exact
# zero, divided by the largest. Asymmetric so that 0 is a level and all 16 codes are used.
NF4_CODE = (-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
            -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
            0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
            0.7229568362236023, 1.0)
# FP4 as bitsandbytes defines it, listed by bit pattern: the high bit is the sign, the three others exponent
# (2 bits, bias 2) and mantissa (1 bit): 000 -> 0, 001 -> 0.0625 (subnormal), 010 -> 8, 011 -> 12, 100 -> 4,
# 101 -> 6, 110 -> 2, 111 -> 3; then divided by 12 so the largest is 1. Code 8 (sign bit, zero) is +0 as well.
_FP4_MAGNITUDES = (0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0)
FP4_CODE = tuple(v / 12.0 for v in _FP4_MAGNITUDES) + tuple(-v / 12.0 if v else 0.0 for v in _FP4_MAGNITUDES)


def codebook(quant_type: str, device=None) -> torch.Tensor:
    """The 16 levels (fp32, in code order) of "nf4" or "fp4"."""
    _check_quant_type(quant_type)
    return torch.tensor(NF4_CODE if quant_type == "nf4" else FP4_CODE, dtype=torch.float32, device=device)


def dynamic_map(device=None) -> torch.Tensor:
    """bitsandbytes' signed 8-bit dynamic map (Dettmers 2015), 256 sorted levels in [-1, 1]: for each exponent
    i = 0..6, 2**i values 10**(i - 6) * m, where m are the midpoints of 2**i equal steps of [0.1, 1], with
    both signs; plus 0 and 1. Fine near zero, coarse near one: suits values of any magnitude."""
    values = [torch.tensor([0.0, 1.0])]
    for i in range(7):
        edges = torch.linspace(0.1, 1, 2 ** i + 1)
        mids = (edges[:-1] + edges[1:]) / 2
        values += [10.0 ** (i - 6) * mids, -(10.0 ** (i - 6)) * mids]
    return torch.sort(torch.cat(values)).values.to(device)


# ---------------------------------------------------------------------------------------------
# The state of a quantised tensor
# ---------------------------------------------------------------------------------------------
@dataclass
class QuantState:
    """What dequantisation needs besides the packed codes; field names follow bitsandbytes' QuantState.

    absmax: fp32 [n_blocks], or with double quantisation the uint8 codes of (absmax - nested_offset).
    code: the 16 levels ("quant_map"). shape, dtype: of the original tensor. nested_*: the double
    quantisation (absmax of each block of 256 constants, the 256-level dynamic map, the mean subtracted).
    """

    absmax: torch.Tensor
    shape: torch.Size
    dtype: torch.dtype
    blocksize: int
    quant_type: str
    code: torch.Tensor
    nested_absmax: Optional[torch.Tensor] = None
    nested_code: Optional[torch.Tensor] = None
    nested_offset: Optional[float] = None
    nested_blocksize: int = NESTED_BLOCKSIZE

    @property
    def double_quant(self) -> bool:
        return self.nested_absmax is not None

    def float_absmax(self) -> torch.Tensor:
        """The fp32 absmax of every block (undoing double quantisation: dequantised codes + offset)."""
        if not self.double_quant:
            return self.absmax
        centred = dequantize_blocks(self.absmax, self.nested_absmax, self.nested_code, self.nested_blocksize,
                                    torch.float32)
        return centred + self.nested_offset

    def as_dict(self, packed: bool = False) -> dict:
        """bitsandbytes' names: tensors "absmax", "quant_map" (+ "nested_absmax", "nested_quant_map") and the
        rest (quant_type, blocksize, dtype, shape, nested_*) as plain values; with packed=True the plain values
        go into one uint8 tensor holding their JSON, key "quant_state.bitsandbytes__<quant_type>", as
        transformers writes 4-bit checkpoints (prefix every key with "<module>.weight.")."""
        tensors = {"absmax": self.absmax, "quant_map": self.code}
        meta = {"quant_type": self.quant_type, "blocksize": self.blocksize,
                "dtype": str(self.dtype).removeprefix("torch."), "shape": list(self.shape)}
        if self.double_quant:
            tensors.update(nested_absmax=self.nested_absmax, nested_quant_map=self.nested_code)
            meta.update(nested_blocksize=self.nested_blocksize, nested_dtype="float32",
                        nested_offset=float(self.nested_offset))
        if not packed:
            return {**tensors, **meta}
        blob = torch.tensor(list(json.dumps(meta).encode()), dtype=torch.uint8)
        return {**tensors, f"quant_state.bitsandbytes__{self.quant_type}": blob}

    @classmethod
    def from_dict(cls, d: dict) -> "QuantState":
        """Inverse of as_dict (packed or not; keys may carry a "<module>.weight." prefix)."""
        d = dict(d)
        for k in [k for k in d if "quant_state.bitsandbytes__" in k]:  # the JSON blob of plain values
            d.update(json.loads(bytes(d.pop(k).cpu().tolist()).decode()))
        d = {k.split(".")[-1]: v for k, v in d.items()}  # drop a "<module>.weight." prefix
        nested = "nested_absmax" in d
        return cls(absmax=d["absmax"], shape=torch.Size(d["shape"]), dtype=getattr(torch, d["dtype"]),
                   blocksize=int(d["blocksize"]), quant_type=d["quant_type"], code=d["quant_map"],
                   nested_absmax=d.get("nested_absmax"), nested_code=d.get("nested_quant_map"),
                   nested_offset=float(d["nested_offset"]) if nested else None,
                   nested_blocksize=int(d.get("nested_blocksize", NESTED_BLOCKSIZE)))


# ---------------------------------------------------------------------------------------------
# Blockwise quantisation (assignment 4)
# ---------------------------------------------------------------------------------------------
def nearest_code(x: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    """For each value of x (in [-1, 1]), the index into `code` (any order) of the nearest level; a value
    exactly halfway between two levels gets the lower one. Computed by sorting the levels and looking x up
    among the midpoints of neighbours (torch.bucketize), as bitsandbytes' CPU code does."""
    order = torch.argsort(code, stable=True)
    levels = code[order]
    midpoints = (levels[:-1] + levels[1:]) / 2
    return order[torch.bucketize(x, midpoints, out_int32=True)]


def quantize_blocks(w: torch.Tensor, code: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Blockwise absmax quantisation of w (any shape, read in row-major order) to indices into `code`.

    Returns (idx, absmax): idx, uint8 [numel], the index of the nearest level of code (nearest_code) to
    w_i / absmax_b; absmax, fp32 [ceil(numel / blocksize)], the largest |w| of each block. Block b holds the
    elements b*blocksize ... (b+1)*blocksize - 1; the last block may be shorter (pad it with zeros: they
    change no maximum). Compute in fp32; scale by multiplying with 1 / absmax (as bitsandbytes does), except
    in a shorter last block, which bitsandbytes' CPU code divides by absmax (the two can differ in the last
    bit, enough to move a value sitting on a midpoint); clamp to [-1, 1]. An all-zero block has absmax 0:
    use max(absmax, 1e-38) instead.
    """
    # BEGIN SOLUTION a4
    flat = w.reshape(-1).float()
    n = flat.numel()
    n_blocks = -(-n // blocksize)
    blocks = F.pad(flat, (0, n_blocks * blocksize - n)).view(n_blocks, blocksize)
    absmax = blocks.abs().amax(dim=1)
    safe = absmax.clamp(min=1e-38)
    scaled = blocks * (1.0 / safe)[:, None]
    if n % blocksize:
        scaled[-1] = blocks[-1] / safe[-1]
    scaled = scaled.clamp(-1, 1)
    idx = nearest_code(scaled, code).reshape(-1)[:n]
    return idx.to(torch.uint8), absmax
    # END SOLUTION


def dequantize_blocks(idx: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, blocksize: int,
                      dtype: torch.dtype) -> torch.Tensor:
    """The inverse of quantize_blocks: the flat tensor code[idx_i] * absmax[i // blocksize], computed in fp32
    and then cast to `dtype` (one rounding, as bitsandbytes does). idx: integer indices (uint8 or int64)."""
    # BEGIN SOLUTION a4
    n = idx.numel()
    # index_select is a plain gather: on the CPU 2.5x faster than code[idx]'s advanced indexing, and this runs
    # twice per 4-bit linear per training step (forward and backward). It takes int32 or int64 indices, not
    # uint8: int32, the smaller copy.
    values = code.index_select(0, idx.int())
    n_blocks = absmax.numel()
    if n != n_blocks * blocksize:  # a last, shorter block: pad it (F.pad copies, so only when needed)
        values = F.pad(values, (0, n_blocks * blocksize - n))
    blocks = values.view(n_blocks, blocksize)
    return (blocks * absmax[:, None].float()).reshape(-1)[:n].to(dtype)
    # END SOLUTION


def pack_4bit(idx: torch.Tensor, pad: int) -> torch.Tensor:
    """Two 4-bit indices (uint8) per byte, the first in the high nibble: byte_k = idx_2k * 16 + idx_2k+1. An odd
    count is padded with the index `pad` (that of 0.0). Returns uint8 of shape [(n + 1) // 2, 1] (bitsandbytes')."""
    # BEGIN SOLUTION a4
    if idx.numel() % 2:
        idx = torch.cat([idx, idx.new_full((1,), pad)])
    pairs = idx.view(-1, 2)
    return ((pairs[:, 0] << 4) | pairs[:, 1]).unsqueeze(1)
    # END SOLUTION


def unpack_4bit(packed: torch.Tensor, n: int) -> torch.Tensor:
    """The inverse of pack_4bit: the first n indices (uint8), high nibble first."""
    # BEGIN SOLUTION a4
    flat = packed.reshape(-1)
    return torch.stack([flat >> 4, flat & 0x0F], dim=1).reshape(-1)[:n]
    # END SOLUTION


# ---------------------------------------------------------------------------------------------
# The public functions
# ---------------------------------------------------------------------------------------------
def quantize_4bit(w: torch.Tensor, blocksize: int = 64, quant_type: str = "nf4", double_quant: bool = False, *,
                  name: str = "weight") -> tuple[torch.Tensor, QuantState]:
    """Quantise w (fp32, fp16 or bf16; any shape, any device) to 4 bits in blocks of `blocksize` values.

    Returns (packed uint8 [(numel + 1) // 2, 1], QuantState); dequantize_4bit inverts it. double_quant=True
    stores the absmax in 8 bits too (mean subtracted, blocks of 256, the dynamic map). `name` names the
    tensor in error messages (e.g. "layers.0.attention.wq.weight").

    The work goes QUANTIZE_CHUNK values at a time (whole blocks, so the result is the same as in one go):
    quantize_blocks' fp32 and index temporaries take about 26 bytes per value, 13x a bf16 weight, and a
    loader that streams a 7B model layer by layer should not need 1 GB of them for one 11008 x 4096 matrix.
    """
    _check_blocksize(blocksize)
    _check_weight(w, name)
    code = codebook(quant_type, w.device)
    pad = int(nearest_code(code.new_zeros(1), code))
    flat, n = w.reshape(-1), w.numel()
    step = max(1, QUANTIZE_CHUNK // blocksize) * blocksize  # a multiple of the block size, so even
    packed = torch.empty(((n + 1) // 2, 1), dtype=torch.uint8, device=w.device)
    absmax = torch.empty(-(-n // blocksize), dtype=torch.float32, device=w.device)
    for start in range(0, n, step):  # only the last chunk can end in a shorter block
        idx, chunk_absmax = quantize_blocks(flat[start:start + step], code, blocksize)
        packed[start // 2:(start + idx.numel() + 1) // 2] = pack_4bit(idx, pad)
        absmax[start // blocksize:start // blocksize + chunk_absmax.numel()] = chunk_absmax
    state = QuantState(absmax=absmax, shape=w.shape, dtype=w.dtype, blocksize=blocksize, quant_type=quant_type,
                       code=code)
    return packed, (_double_quantize(state) if double_quant else state)


def _double_quantize(state: QuantState) -> QuantState:
    """Replace the fp32 absmax by the uint8 codes of (absmax - mean) in blocks of 256 (the dynamic map).

    bitsandbytes' CPU kernel for this step (its C++ quantize_blockwise) sometimes picks a level next to the
    nearest one (about 0.2% of the constants); ours is always the nearest, so our constants are never
    further from the true absmax than bitsandbytes' (tests/test_quant.py measures both)."""
    offset = state.absmax.mean()
    code = dynamic_map(state.absmax.device)
    idx, nested_absmax = quantize_blocks(state.absmax - offset, code, NESTED_BLOCKSIZE)
    return QuantState(absmax=idx, shape=state.shape, dtype=state.dtype, blocksize=state.blocksize,
                      quant_type=state.quant_type, code=state.code, nested_absmax=nested_absmax, nested_code=code,
                      nested_offset=float(offset))


def dequantize_4bit(packed: torch.Tensor, state: QuantState, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """code[idx] * absmax for every element, in `dtype` (default: the original tensor's), with its shape.

    (bitsandbytes 0.50.2's own CPU dequantize_4bit departs from this formula when the block size does not
    divide the last dimension; tests/test_quant.py measures it.)"""
    n = state.shape.numel()
    idx = unpack_4bit(packed, n)
    out = dequantize_blocks(idx, state.float_absmax(), state.code, state.blocksize, dtype or state.dtype)
    return out.view(state.shape)


def default_compute_dtype(device) -> torch.dtype:
    """bf16 on a GPU, fp32 on the CPU (where bf16 matmuls are slow on most processors)."""
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32


# ---------------------------------------------------------------------------------------------
# Checks (one clear sentence each)
# ---------------------------------------------------------------------------------------------
def _check_blocksize(blocksize) -> None:
    ok = isinstance(blocksize, int) and not isinstance(blocksize, bool) and 32 <= blocksize <= 4096
    if not ok or blocksize & (blocksize - 1):
        raise ValueError(f"blocksize={blocksize!r} is invalid: expected a power of two from 32 to 4096.")


def _check_quant_type(quant_type) -> None:
    if quant_type not in QUANT_TYPES:
        raise ValueError(f"quant_type={quant_type!r} is invalid: expected one of {QUANT_TYPES}.")


def _check_weight(w: torch.Tensor, name: str) -> None:
    if w.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{name} has dtype {w.dtype}: 4-bit quantisation expects fp32, fp16 or bf16.")
    if w.numel() == 0:
        raise ValueError(f"{name} is empty (shape {list(w.shape)}): there is nothing to quantise.")
    lo, hi = torch.aminmax(w)  # NaN propagates and inf is an extreme: one pass, no temporary as big as w
    if bool(torch.isfinite(lo)) and bool(torch.isfinite(hi)):
        return
    bad = ~torch.isfinite(w)
    first = tuple(int(i) for i in bad.nonzero()[0])
    raise ValueError(f"{name} has {int(bad.sum())} NaN or inf values (the first at index {first}): "
                     f"4-bit quantisation needs finite weights.")


def _check_backend(backend) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} is invalid: expected one of {BACKENDS}.")


# ---------------------------------------------------------------------------------------------
# The 4-bit linear layer
# ---------------------------------------------------------------------------------------------
class Matmul4bit(torch.autograd.Function):
    """y = x W^T with W dequantised from a Linear4bit; backward dequantises W again, so autograd keeps only
    the packed weight (not a 16-bit copy of every layer until the backward pass)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, layer: "Linear4bit", dtype: torch.dtype) -> torch.Tensor:
        """Save the layer and dtype on ctx; return x @ layer.dequantized_weight(dtype).T (x is already in dtype)."""
        # BEGIN SOLUTION a4
        ctx.layer, ctx.dtype = layer, dtype
        return x @ layer.dequantized_weight(dtype).t()
        # END SOLUTION

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor):
        """dL/dx = dL/dy @ W, with W dequantised again in grad_y's dtype (the dtype the forward computed in, as
        bitsandbytes' MatMul4Bit does; the backward runs outside autocast, so nothing casts for us); the layer
        and the dtype get no gradient (None)."""
        # BEGIN SOLUTION a4
        grad_x = grad_y @ ctx.layer.dequantized_weight(grad_y.dtype) if ctx.needs_input_grad[0] else None
        return grad_x, None, None
        # END SOLUTION


class Linear4bit(nn.Module):
    """A frozen linear layer whose weight is stored in 4 bits (buffers: the packed `weight` and the state's
    tensors under bitsandbytes' names), dequantised at every forward to the compute dtype.

    compute_dtype=None: bf16 on a GPU, fp32 on the CPU (default_compute_dtype), chosen from the input's device.
    The output has the input's dtype. `dequantized_weight()` is the hook LoRA's merge uses.
    """

    def __init__(self, packed: torch.Tensor, state: QuantState, bias: Optional[torch.Tensor] = None,
                 compute_dtype=None):
        super().__init__()
        if len(state.shape) != 2:
            raise ValueError(f"Linear4bit needs a 2-D weight [out, in], got shape {list(state.shape)}.")
        self.out_features, self.in_features = (int(s) for s in state.shape)
        self.compute_dtype = parse_dtype(compute_dtype)
        self.register_buffer("weight", packed)
        parts = state.as_dict()
        self._tensor_keys = [k for k, v in parts.items() if isinstance(v, torch.Tensor)]
        for k in self._tensor_keys:
            self.register_buffer(k, parts.pop(k))
        self._meta = parts  # quant_type, blocksize, dtype, shape (+ nested_*): plain values
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    @classmethod
    def from_linear(cls, linear: nn.Linear, quant_type: str = "nf4", double_quant: bool = False,
                    blocksize: int = 64, compute_dtype=None, name: str = "weight") -> "Linear4bit":
        packed, state = quantize_4bit(linear.weight.detach(), blocksize, quant_type, double_quant, name=name)
        return cls(packed, state, linear.bias, compute_dtype)

    @property
    def quant_state(self) -> QuantState:
        return QuantState.from_dict({**self._meta, **{k: getattr(self, k) for k in self._tensor_keys}})

    def dequantized_weight(self, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """The weight [out, in] as code[idx] * absmax, in `dtype` (default: the dtype it was quantised from)."""
        return dequantize_4bit(self.weight, self.quant_state, dtype)

    def matmul_dtype(self, x: torch.Tensor) -> torch.dtype:
        """The dtype the matmul runs in: under torch.autocast the autocast dtype (what autocast would give any
        linear layer, so W is dequantised straight to bf16/fp16, never to fp32 and then cast); otherwise
        self.compute_dtype, or default_compute_dtype(x.device)."""
        if torch.is_autocast_enabled(x.device.type):
            return torch.get_autocast_dtype(x.device.type)
        return self.compute_dtype or default_compute_dtype(x.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """y = x W^T + b in dtype = self.matmul_dtype(x), with W dequantised by Matmul4bit.apply(x, self, dtype)
        (x cast to dtype first) and the bias (if any) cast to that dtype. The result is cast back to x's dtype,
        except under autocast, where it stays in the autocast dtype, as any linear layer's output does."""
        # BEGIN SOLUTION a4
        dtype = self.matmul_dtype(x)
        y = Matmul4bit.apply(x.to(dtype), self, dtype)
        if self.bias is not None:
            y = y + self.bias.to(dtype)
        return y if torch.is_autocast_enabled(x.device.type) else y.to(x.dtype)
        # END SOLUTION

    def _apply(self, fn, recurse=True):
        # Module.to(dtype) / .half() cast every floating buffer; the 4-bit state must stay fp32, so its
        # tensors only follow the device of the packed weight.
        saved = {k: getattr(self, k) for k in self._tensor_keys}
        super()._apply(fn, recurse)
        for k, t in saved.items():
            self._buffers[k] = t.to(self.weight.device)
        return self

    def extra_repr(self) -> str:
        m = self._meta
        dq = ", double_quant" if "nested_offset" in m else ""
        return (f"in_features={self.in_features}, out_features={self.out_features}, {m['quant_type']}, "
                f"blocksize={m['blocksize']}{dq}, bias={self.bias is not None}")


class BnbLinear4bit(nn.Module):
    """bitsandbytes' own `bitsandbytes.nn.Linear4bit` (backend="bnb") behind Linear4bit's small interface
    (in_features, out_features, weight, bias, dequantized_weight), so LoRA and merge_lora treat both alike."""

    def __init__(self, linear: nn.Linear, quant_type: str = "nf4", double_quant: bool = False,
                 blocksize: int = 64, compute_dtype=None):
        super().__init__()
        bnb = _import_bnb(linear.weight.device, quant_type, blocksize)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        device = linear.weight.device
        layer = bnb.nn.Linear4bit(self.in_features, self.out_features, bias=linear.bias is not None,
                                  compute_dtype=parse_dtype(compute_dtype) or default_compute_dtype(device),
                                  compress_statistics=double_quant, quant_type=quant_type, device="meta")
        layer.weight = bnb.nn.Params4bit(linear.weight.detach().clone(), requires_grad=False, blocksize=blocksize,
                                         compress_statistics=double_quant, quant_type=quant_type, module=layer)
        if linear.bias is not None:
            layer.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        self.layer = layer.to(device)  # bitsandbytes quantises when the weight moves to a device

    @property
    def weight(self) -> torch.Tensor:
        return self.layer.weight

    @property
    def bias(self) -> Optional[torch.Tensor]:
        return self.layer.bias

    def dequantized_weight(self, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """bitsandbytes' own dequantisation (the same one its forward uses), cast to `dtype` if given."""
        import bitsandbytes.functional as bnbf
        w = bnbf.dequantize_4bit(self.layer.weight.data, self.layer.weight.quant_state)
        return w if dtype is None else w.to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


def _import_bnb(device, quant_type: str, blocksize: int):
    """bitsandbytes, after checking that it quantises a small tensor to 4 bits on `device`."""
    device = torch.device(device)
    hint = "use backend='minillama' (the hand-written quantiser, same bytes) instead"
    try:
        import bitsandbytes
        import bitsandbytes.functional as bnbf
    except ImportError as e:
        raise ValueError(f"backend='bnb' needs bitsandbytes, which cannot be imported ({e}); {hint}.") from None
    try:
        bnbf.quantize_4bit(torch.zeros(blocksize, device=device), blocksize=blocksize, quant_type=quant_type)
    except Exception as e:  # a build without this device, or without 4-bit kernels for it
        raise ValueError(f"backend='bnb': bitsandbytes {bitsandbytes.__version__} cannot quantise to 4 bits on "
                         f"{device} ({type(e).__name__}: {e}); {hint}.") from None
    return bitsandbytes


def quantize_linear(linear: nn.Linear, quant_type: str = "nf4", double_quant: bool = False, blocksize: int = 64,
                    backend: str = "minillama", compute_dtype=None, name: str = "weight") -> nn.Module:
    """A 4-bit copy of an nn.Linear: Linear4bit (backend="minillama") or BnbLinear4bit (backend="bnb")."""
    _check_backend(backend)
    _check_blocksize(blocksize)
    _check_quant_type(quant_type)
    if backend == "bnb":
        _check_weight(linear.weight, name)
        return BnbLinear4bit(linear, quant_type, double_quant, blocksize, compute_dtype)
    return Linear4bit.from_linear(linear, quant_type, double_quant, blocksize, compute_dtype, name)


def quantize_model(model: nn.Module, quant_type: str = "nf4", double_quant: bool = False, blocksize: int = 64,
                   backend: str = "minillama", compute_dtype=None) -> nn.Module:
    """Replace the attention (wq wk wv wo) and feed-forward (w1 w2 w3) linears of every layer by 4-bit ones,
    in place; freeze every parameter (a 4-bit base is trained only through adapters: apply_lora after this).
    Every option and every weight is checked before anything changes. Returns the model.

    What stays in 16/32 bits, and why (as in QLoRA and transformers' 4-bit loading):
    - the token embeddings and the output head: they hold the model's largest outliers (rare tokens' rows,
      logit scales), the head's error goes straight into the logits, and a model with tied embeddings
      shares one matrix for both, so quantising the head would quantise the lookup table too;
    - the RMSNorm weights: one scale per channel that multiplies the activations directly;
    - and they weigh little: in Llama-2-7B the two 32000 x 4096 matrices are 262,144,000 of 6,738,415,616
      parameters (3.9%) and the norms 266,240; the seven linears of the 32 layers are the other 96%.
    """
    for value, check in ((blocksize, _check_blocksize), (quant_type, _check_quant_type), (backend, _check_backend)):
        check(value)
    parse_dtype(compute_dtype)
    sites = []
    for i, block in enumerate(model.layers):
        for parent_name, names in QUANTIZED_LINEARS.items():
            parent = getattr(block, parent_name)
            for n in names:
                lin, where = getattr(parent, n), f"layers.{i}.{parent_name}.{n}"
                if type(lin) is not nn.Linear:
                    raise ValueError(f"{where} is a {type(lin).__name__}, not an nn.Linear: quantise the plain "
                                     f"model once, before apply_lora.")
                _check_weight(lin.weight, f"{where}.weight")
                sites.append((parent, n, lin, f"{where}.weight"))
    for parent, n, lin, name in sites:
        setattr(parent, n, quantize_linear(lin, quant_type, double_quant, blocksize, backend, compute_dtype, name))
    for p in model.parameters():
        p.requires_grad_(False)
    return model
