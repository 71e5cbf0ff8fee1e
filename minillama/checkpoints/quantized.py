"""4-bit checkpoints: load a 16-bit checkpoint straight into 4 bits, and save / load 4-bit models.

Streamed loading (`load_model(path, load_in_4bit=True)`): the model is built on the `meta` device, then the
checkpoint is read one tensor at a time (safetensors with plain reads into a buffer of its own; Meta's .pth
memory-mapped, each weight's pages released once it is quantised); each of the seven linears of a block is
quantised as soon as it is read and its 16-bit copy dropped, so the peak is about the 4-bit model plus one
16-bit tensor (plus the quantiser's temporaries for QUANTIZE_CHUNK values), never the 16-bit model.

Saved layout: the one transformers + bitsandbytes write for a 4-bit model. A quantised linear's
`<module>.weight` is the packed uint8 [(numel + 1) // 2, 1], next to `<module>.weight.absmax`,
`.quant_map` (and with double quantisation `.nested_absmax`, `.nested_quant_map`), and the JSON of the
plain values in `.quant_state.bitsandbytes__nf4` (or `__fp4`); config.json gains a `quantization_config`
as transformers writes it. "hf" uses HF names (`model.layers.0.self_attn.q_proj.weight...`), "native" the
same tensors under Meta names. Such a directory loads back without quantising again.

One difference from the in-memory model, in "hf" format only: HF orders the rows of q_proj/k_proj for its
RoPE convention (see weights.py). Permuting rows of a 4-bit weight is exact (whole blocks move, as long as
the block size divides the row length), but with double quantisation the 8-bit constants are grouped in
blocks of 256 that the permutation mixes: the permuted fp32 constants are double-quantised again on save,
and on load q/k keep fp32 constants (exactly those of the file). Without double quantisation, and in
"native" format always, a save/load round trip is bit-exact.
"""

from __future__ import annotations

import ctypes
import json
import mmap
import os
from pathlib import Path
from typing import Optional

import torch
from safetensors.torch import save_file
from torch import nn

from ..config import ModelArgs, parse_dtype
from ..files import PathLike, atomic_directory, read_json
from ..layout import hf_to_meta_name, meta_to_hf_name, permute_hf_to_meta, permute_meta_to_hf, qk_heads
from ..model import Transformer
from ..quant import (QUANTIZED_LINEARS, Linear4bit, QuantState, _check_backend, _check_blocksize,
                     _check_quant_type, _double_quantize, quantize_linear)
from . import weights
from .hf_tokenizer import save_tokenizer

STATE_KEYS = ("absmax", "quant_map", "nested_absmax", "nested_quant_map", "quant_state.")


def quantization_config(quant_type: str, double_quant: bool, compute_dtype: Optional[torch.dtype]) -> dict:
    """config.json's `quantization_config` as transformers writes it for a bitsandbytes 4-bit model."""
    return {"quant_method": "bitsandbytes", "load_in_4bit": True, "load_in_8bit": False,
            "_load_in_4bit": True, "_load_in_8bit": False, "bnb_4bit_quant_type": quant_type,
            "bnb_4bit_use_double_quant": double_quant, "bnb_4bit_quant_storage": "uint8",
            "bnb_4bit_compute_dtype": str(compute_dtype or torch.float32).removeprefix("torch."),
            "llm_int8_threshold": 6.0, "llm_int8_skip_modules": None,
            "llm_int8_enable_fp32_cpu_offload": False, "llm_int8_has_fp16_weight": False}


def is_4bit_checkpoint(path: PathLike) -> bool:
    cfg = Path(path) / "config.json"
    return cfg.is_file() and isinstance(read_json(cfg).get("quantization_config"), dict)


def _weight_name(key: str) -> tuple[str, str]:
    """("layers.0.attention.wq.weight", ".absmax") for a state key; (key, "") for a weight."""
    i = key.find(".weight.")
    return (key, "") if i < 0 else (key[:i + 7], key[i + 7:])


# ---------------------------------------------------------------------------------------------
# Reading one tensor at a time
# ---------------------------------------------------------------------------------------------
# A safetensors file is an 8-byte little-endian header length N, N bytes of JSON ({name: {"dtype", "shape",
# "data_offsets": [begin, end]}}, plus an optional "__metadata__"), then the raw little-endian bytes, offsets
# counted from the end of the header (little-endian, as on every machine PyTorch runs on). Streaming reads each tensor's bytes with a plain read into a fresh
# buffer: once quantised, the buffer is freed and nothing of the 16-bit weight stays in memory. (safe_open
# memory-maps the file instead; the pages it touches stay resident, as file-backed memory, until the file is
# closed, so a streamed 7B load would end up holding the whole 13 GB checkpoint as well.)
SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                      "U8": torch.uint8, "BOOL": torch.bool}


def safetensors_entries(f: Path) -> dict[str, tuple[torch.dtype, list[int], int, int]]:
    """{name: (dtype, shape, first byte, end byte)} of a safetensors file, offsets from the file's start."""
    def bad(why: str) -> ValueError:
        return ValueError(f"{f} is not a readable safetensors file ({why}); is it truncated or corrupt?")
    size = f.stat().st_size
    with open(f, "rb") as fh:
        n = int.from_bytes(fh.read(8), "little")
        if size < 8 or n > size - 8:
            raise bad(f"its header claims {n:,} bytes of a {size:,}-byte file")
        try:
            header = json.loads(fh.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise bad(f"its header is not JSON: {e}") from None
    out = {}
    for name, e in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (begin, end) = SAFETENSORS_DTYPES[e["dtype"]], list(e["shape"]), e["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise bad(f"tensor {name!r} has the entry {json.dumps(e)[:80]}") from None
        nbytes = torch.Size(shape).numel() * dtype.itemsize
        if not 0 <= begin <= end <= size - 8 - n or end - begin != nbytes:
            raise bad(f"tensor {name!r} has data_offsets {[begin, end]} for {nbytes:,} bytes")
        out[name] = (dtype, shape, 8 + n + begin, 8 + n + end)
    return out


def read_tensor(f: Path, entry: tuple[torch.dtype, list[int], int, int]) -> torch.Tensor:
    """One tensor of a safetensors file (an entry of safetensors_entries), read into memory of its own."""
    dtype, shape, begin, end = entry
    buf = torch.empty(end - begin, dtype=torch.uint8)
    view, done = memoryview(buf.numpy()), 0
    with open(f, "rb", buffering=0) as fh:
        fh.seek(begin)
        while done < len(view):  # one read may return less than asked (e.g. over 2 GB on Linux)
            got = fh.readinto(view[done:])
            if not got:
                raise ValueError(f"{f} ends inside tensor data: is it truncated?")
            done += got
    return buf.view(dtype).reshape(shape)


def release_pages(t: torch.Tensor) -> None:
    """Drop the resident pages of a tensor that is a view into a memory-mapped file (torch.load(mmap=True)),
    once it has been read: the kernel reads them again from the file if they are ever touched, so nothing
    is lost, and resident memory stops growing with every weight read. Only the pages lying wholly inside
    the tensor are dropped (its neighbours may still be in use). Where madvise is missing (Windows), no-op."""
    advice = getattr(mmap, "MADV_DONTNEED", None)
    if advice is None or t.device.type != "cpu" or not t.numel():
        return
    try:
        madvise = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError, TypeError):
        return
    first = -(-t.data_ptr() // mmap.PAGESIZE) * mmap.PAGESIZE
    end = (t.data_ptr() + t.numel() * t.element_size()) // mmap.PAGESIZE * mmap.PAGESIZE
    if end > first:
        madvise(ctypes.c_void_p(first), ctypes.c_size_t(end - first), ctypes.c_int(advice))


def _open_stream(path: Path, fmt: str):
    """(args, config dict, weight names in Meta's naming, get(name) -> one tensor read now, release(name): done
    with it). Safetensors: plain reads of each tensor. Meta's .pth shards: torch.load(mmap=True) maps them,
    and release drops the pages of a weight once it is quantised (release_pages)."""
    if fmt == "meta":
        args, files, shards, keys = weights.open_meta(path)

        def release(key: str) -> None:
            for shard in shards:
                release_pages(shard[key])
        return args, {}, keys, lambda k: weights.join_meta_weight(k, files, shards), release
    cfg = read_json(path / "config.json")
    if fmt == "native":
        args = ModelArgs.from_dict({k: v for k, v in cfg.items() if k not in ("format", "quantization_config")},
                                   source=str(path / "config.json"))
        files = [path / "model.safetensors"]
    else:
        args = weights.hf_config_to_args(cfg, source=str(path / "config.json"))
        files = weights.hf_weight_files(path)
    where = {}  # Meta name -> (file, its entry)
    for f in files:
        if not f.exists():
            raise FileNotFoundError(f"Checkpoint shard {f} is missing.")
        for name, entry in safetensors_entries(f).items():
            prefix, suffix = _weight_name(name)
            meta = prefix if fmt == "native" else hf_to_meta_name(prefix)
            if meta is None and name.endswith("rotary_emb.inv_freq"):
                continue
            if meta is None:
                raise ValueError(f"{path}: weight {name!r} is not part of a LLaMA model.")
            where[meta + suffix] = (f, entry)
    if "output.weight" not in where and cfg.get("tie_word_embeddings") and "tok_embeddings.weight" in where:
        where["output.weight"] = where["tok_embeddings.weight"]

    def get(key: str) -> torch.Tensor:
        t = read_tensor(*where[key])
        heads = qk_heads(key, args) if fmt == "hf" and t.is_floating_point() and not _weight_name(key)[1] else None
        return permute_hf_to_meta(t, heads) if heads else t
    return args, cfg, list(where), get, lambda key: None


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------
def load_model(path: PathLike, *, device="cpu", dtype=None, max_seq_len: Optional[int] = None,
               rope_scaling: Optional[dict] = None, load_in_4bit: bool = False, quant_type: Optional[str] = None,
               double_quant: Optional[bool] = None, blocksize: Optional[int] = None, compute_dtype=None,
               backend: str = "minillama") -> Transformer:
    """Load a native, HF or Meta checkpoint (see weights.load_model), in 4 bits if asked or if it is a 4-bit one.

    load_in_4bit=True quantises the attention and feed-forward linears while reading (quant_type default
    "nf4", double_quant default True, blocksize default 64; compute_dtype and backend as quant.quantize_model);
    dtype applies to what stays 16-bit and to the weights before quantisation. A 4-bit checkpoint (config.json
    with quantization_config) is loaded as saved, without quantising again; quant_type / blocksize, if given,
    must be those it was saved with.
    """
    if not (load_in_4bit or (isinstance(path, (str, os.PathLike)) and is_4bit_checkpoint(path))):
        return weights.load_model(path, device=device, dtype=dtype, max_seq_len=max_seq_len,
                                  rope_scaling=rope_scaling)
    if not load_in_4bit:
        raise ValueError(f"{path} is a 4-bit checkpoint: load it with load_in_4bit=True (minillama does not "
                         f"turn it back into 16-bit weights on loading).")
    for value, check in ((blocksize, _check_blocksize), (quant_type, _check_quant_type)):
        if value is not None:
            check(value)
    _check_backend(backend)
    dtype, compute_dtype, path = parse_dtype(dtype), parse_dtype(compute_dtype), Path(path)
    fmt = weights.detect_format(path)
    args, cfg, keys, get, release = _open_stream(path, fmt)
    if max_seq_len is not None or rope_scaling is not None:
        args = args.replace(**{k: v for k, v in (("max_seq_len", max_seq_len), ("rope_scaling", rope_scaling))
                               if v is not None})
    cfg_name = "params.json" if fmt == "meta" else "config.json"
    weights._check_layer_count(path, args, keys, cfg_name)
    with torch.device("meta"):
        model = Transformer(args)
    expected = model.state_dict()
    packed = "quantization_config" in cfg
    names = [k for k in keys if _weight_name(k)[1] == ""]
    weights._check_weights(path, {}, {k: None for k in names if k not in expected}, cfg_name)  # unknown names
    options = dict(quant_type=quant_type, double_quant=double_quant, blocksize=blocksize,
                   compute_dtype=compute_dtype, backend=backend, device=device, dtype=dtype)
    sites = {f"layers.{i}.{p}.{n}.weight": (p, n) for i in range(args.n_layers)
             for p, ns in QUANTIZED_LINEARS.items() for n in ns}
    rest = {}
    for key in expected:
        if key not in names:
            raise ValueError(f"{path}: weight {key!r} is missing from the checkpoint.")
        if key in sites:
            parent = model.get_submodule(key.rsplit(".", 2)[0])
            make = _load_packed if packed else _quantize_read
            setattr(parent, sites[key][1], make(path, key, expected[key], keys, get, fmt, args, options))
            release(key)  # its 16-bit bytes are no longer needed (Meta's mapped pages; a no-op for safetensors)
            continue
        t = get(key)
        weights._check_weights(path, {key: expected[key]}, {key: t}, cfg_name)
        rest[key] = t.to(device=device, dtype=dtype or t.dtype)
        weights._check_finite(path, key, rest[key])
    model.load_state_dict(rest, assign=True, strict=False)
    for p in model.parameters():
        p.requires_grad_(False)
    model.args = args
    return model.eval()


def _quantize_read(path, key, like, keys, get, fmt, args, o) -> nn.Module:
    """Read one 16-bit linear weight and return its 4-bit layer (the 16-bit tensor is dropped on return)."""
    t = get(key)
    weights._check_weights(path, {key: like}, {key: t}, "config")
    t = t.to(device=o["device"], dtype=o["dtype"] or t.dtype)
    with torch.device("meta"):
        lin = nn.Linear(t.shape[1], t.shape[0], bias=False)
    lin.weight = nn.Parameter(t, requires_grad=False)
    qt, dq, bs = o["quant_type"] or "nf4", True if o["double_quant"] is None else o["double_quant"], o["blocksize"] or 64
    return quantize_linear(lin, qt, dq, bs, o["backend"], o["compute_dtype"], name=key)


def _load_packed(path, key, like, keys, get, fmt, args, o) -> nn.Module:
    """A Linear4bit from a saved packed weight and its state (no quantisation), checked against the options."""
    if o["backend"] != "minillama":
        raise ValueError(f"{path} is a 4-bit checkpoint: it loads with backend='minillama' only, not "
                         f"{o['backend']!r}.")
    state = QuantState.from_dict({k: get(k) for k in keys if k.startswith(key + ".")})
    for name, want, saved in (("quant_type", o["quant_type"], state.quant_type),
                              ("blocksize", o["blocksize"], state.blocksize)):
        if want is not None and want != saved:
            raise ValueError(f"{path}: {key} was saved with {name}={saved!r}, not the {name}={want!r} asked for: "
                             f"load it with {name}={saved!r} (or None), or quantise the 16-bit checkpoint again.")
    if tuple(state.shape) != tuple(like.shape):
        raise ValueError(f"{path}: weight {key!r} has shape {list(state.shape)} but config.json implies "
                         f"{list(like.shape)}.")
    packed, heads = get(key), qk_heads(key, args) if fmt == "hf" else None
    if heads:
        packed, state = _permute_4bit(packed, state, heads, permute_hf_to_meta, redo_double_quant=False)
    dev = o["device"]
    state = QuantState.from_dict({k: v.to(dev) if isinstance(v, torch.Tensor) else v
                                  for k, v in state.as_dict().items()})
    return Linear4bit(packed.to(dev), state, None, o["compute_dtype"])


def _permute_4bit(packed: torch.Tensor, state: QuantState, heads: int, permute, redo_double_quant: bool):
    """Reorder the rows of a 4-bit q/k weight between Meta's and HF's RoPE order (whole blocks move). Double-
    quantised constants are mixed across their blocks of 256: permute the fp32 ones, then quantise them again
    (redo_double_quant) or keep them in fp32."""
    out, inp = state.shape
    if inp % state.blocksize or inp % 2:
        raise ValueError(f"A 4-bit q/k weight of shape {list(state.shape)} with blocksize={state.blocksize} "
                         f"cannot be reordered for HF's RoPE convention: the block size must divide {inp}.")
    packed = permute(packed.view(out, inp // 2), heads).reshape(-1, 1).contiguous()
    absmax = permute(state.float_absmax().view(out, -1), heads).reshape(-1).contiguous()
    plain = QuantState(absmax=absmax, shape=state.shape, dtype=state.dtype, blocksize=state.blocksize,
                       quant_type=state.quant_type, code=state.code)
    return packed, _double_quantize(plain) if redo_double_quant and state.double_quant else plain


# ---------------------------------------------------------------------------------------------
# Saving
# ---------------------------------------------------------------------------------------------
def quantized_state_dict(model: Transformer) -> Optional[dict[str, torch.Tensor]]:
    """Meta-named tensors of a 4-bit model in transformers' layout (None if the model has no 4-bit layer)."""
    layers = {n: m for n, m in model.named_modules() if hasattr(m, "dequantized_weight")}
    if not layers:
        return None
    sd = {}
    for name, m in layers.items():
        if type(m) is not Linear4bit:
            raise ValueError(f"{name} is a {type(m).__name__}: only minillama's Linear4bit layers (backend="
                             f"'minillama', no LoRA on top: merge_lora or save the adapter apart) can be saved.")
        sd[f"{name}.weight"] = m.weight
        sd.update({f"{name}.weight.{k}": v for k, v in m.quant_state.as_dict(packed=True).items()})
    skip = tuple(f"{name}." for name in layers)
    sd.update({k: v for k, v in model.state_dict().items() if not k.startswith(skip)})
    return {k: v.detach().cpu().contiguous() for k, v in sd.items()}


def save_model(model: Transformer, path: PathLike, format: str = "native", *, tokenizer=None,
               max_shard_bytes: Optional[int] = None, num_shards: int = 1) -> Path:
    """weights.save_model, and for a 4-bit model ("native" or "hf") transformers' 4-bit layout (module doc)."""
    sd = quantized_state_dict(model)
    if sd is None:
        return weights.save_model(model, path, format, tokenizer=tokenizer, max_shard_bytes=max_shard_bytes,
                                  num_shards=num_shards)
    if format not in ("native", "hf"):
        raise ValueError(f"Checkpoint format {format!r} cannot hold a 4-bit model: expected 'native' or 'hf'.")
    path, args = Path(path), model.args
    if path.exists() and not path.is_dir():
        raise ValueError(f"Cannot save a checkpoint to {path}: it is an existing file, not a directory.")
    first = next(m for m in model.modules() if type(m) is Linear4bit)
    qcfg = quantization_config(first._meta["quant_type"], "nested_offset" in first._meta, first.compute_dtype)
    with atomic_directory(path) as tmp:
        if format == "native":
            with open(tmp / "config.json", "w") as f:
                json.dump({"format": "minillama", **args.to_dict(), "quantization_config": qcfg}, f, indent=2)
            save_file(sd, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        else:
            _write_hf_4bit(model, sd, tmp, max_shard_bytes, qcfg)
        if tokenizer is not None:
            save_tokenizer(tokenizer, tmp, format, args.max_seq_len)
    return path


def _write_hf_4bit(model: Transformer, sd: dict, out: Path, max_shard_bytes, qcfg: dict) -> None:
    args, hf = model.args, {}
    for key, t in sd.items():
        prefix, suffix = _weight_name(key)
        heads = qk_heads(prefix, args)
        if heads and not suffix:  # a q/k weight: reorder it with its state, written under the same names
            layer = model.get_submodule(prefix.removesuffix(".weight"))
            packed, state = _permute_4bit(t, layer.quant_state, heads, permute_meta_to_hf, redo_double_quant=True)
            parts = {prefix: packed, **{f"{prefix}.{k}": v.cpu() for k, v in state.as_dict(packed=True).items()}}
            hf.update({meta_to_hf_name(_weight_name(k)[0]) + _weight_name(k)[1]: v for k, v in parts.items()})
        elif not (heads and suffix):
            hf[meta_to_hf_name(prefix) + suffix] = t
    config = weights.args_to_hf_config(args, sd["tok_embeddings.weight"].dtype)
    with open(out / "config.json", "w") as f:
        json.dump({**config, "quantization_config": qcfg}, f, indent=2)
    weights.write_safetensors_shards(hf, out, max_shard_bytes)
