"""Load and save checkpoints in the three formats students meet.

- native: `config.json` (ModelArgs, with `"format": "minillama"`) + `model.safetensors` (Meta names);
- HF:     `config.json` (`model_type: llama`) + `model.safetensors` or sharded `model-0000N-of-0000M.safetensors`
          with `model.safetensors.index.json`; names mapped and q/k rows permuted (see below);
- Meta:   `params.json` + `consolidated.NN.pth` shards (one per model-parallel rank), plus our `minillama.json`
          for what Meta's params.json cannot hold (max_seq_len, rope_scaling, an explicit FFN width).

The model is built on the `meta` device (shapes, no memory) and the loaded tensors are
assigned into it, so a bf16 checkpoint is never turned into a full fp32 copy on the way.

RoPE conventions: Meta rotates interleaved pairs (x0, x1), (x2, x3), ...; HF rotates halves
(x_i, x_{i + d/2}). Converting Meta -> HF permutes the output rows of wq and wk inside each head:
    w_hf = w_meta.view(heads, head_dim // 2, 2, in).transpose(1, 2).reshape(out, in)
and HF -> Meta is the inverse (swap the same two axes back).
"""

from __future__ import annotations

import json
import math
import os
import pickle
import re
import warnings
from pathlib import Path
from typing import Iterable, Optional

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ..config import ModelArgs, parse_dtype
from ..files import PathLike, atomic_directory, read_json
from ..layout import hf_to_meta_name, meta_to_hf_name, permute_hf_to_meta, permute_meta_to_hf, qk_heads
from ..model import Transformer
from ..rope import ntk_theta, scaling_type
from .hf_tokenizer import save_tokenizer

FORMATS = ("native", "hf", "meta")
HF_SAFE_INDEX = "model.safetensors.index.json"

# Meta's loaders build their config as `ModelArgs(max_seq_len=..., max_batch_size=..., **params)`, so a
# params.json may hold only fields of Meta's dataclass for that family, and never max_seq_len:
#   Llama 2 (meta-llama/llama, llama/model.py): dim n_layers n_heads n_kv_heads vocab_size multiple_of
#           ffn_dim_multiplier norm_eps;
#   Code Llama and Llama 3 (meta-llama/codellama and meta-llama/llama3, llama/model.py) add rope_theta.
META_PARAMS = ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "multiple_of", "ffn_dim_multiplier",
               "norm_eps")
# Our settings that params.json cannot hold (or holds differently) go to this side file; only minillama
# reads it, and its values replace those of params.json.
META_SIDE_FILE = "minillama.json"
META_SIDE_KEYS = ("max_seq_len", "rope_scaling", "hidden_dim", "multiple_of", "ffn_dim_multiplier")


# ---------------------------------------------------------------------------------------------
# Configs
# ---------------------------------------------------------------------------------------------
def hf_config_to_args(cfg: dict, source: str = "config.json") -> ModelArgs:
    """ModelArgs from an HF LlamaConfig dict (transformers 4.x or 5.x)."""
    if cfg.get("model_type") != "llama":
        raise ValueError(f"{source} has model_type {cfg.get('model_type')!r}: minillama loads model_type 'llama' only.")
    for key, ok in (("hidden_act", "silu"), ("attention_bias", False), ("mlp_bias", False)):
        if cfg.get(key, ok) != ok:
            raise ValueError(f"{source}: {key}={cfg[key]!r} is not supported: expected {ok!r} (LLaMA-2 architecture).")
    for key in ("hidden_size", "num_attention_heads", "num_key_value_heads", "num_hidden_layers",
                "intermediate_size", "vocab_size", "max_position_embeddings"):  # before any division by them
        value = cfg.get(key, 1)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value <= 0):
            raise ValueError(f"{source}: {key}={value!r} is invalid: expected a positive integer.")
    try:
        n_heads, dim = cfg["num_attention_heads"], cfg["hidden_size"]
        params = cfg.get("rope_parameters") or {}  # transformers 5.x keeps theta and scaling here
        theta = cfg.get("rope_theta") or params.get("rope_theta") or 10000.0
        scaling, max_seq_len = _hf_rope_scaling(cfg.get("rope_scaling") or params,
                                                cfg.get("max_position_embeddings", 4096))
        if cfg.get("head_dim") not in (None, dim // n_heads):
            raise ValueError(f"{source}: head_dim={cfg['head_dim']} is not supported: expected hidden_size / "
                             f"num_attention_heads = {dim // n_heads}.")
        settings = dict(dim=dim, n_layers=cfg["num_hidden_layers"], n_heads=n_heads,
                        n_kv_heads=cfg.get("num_key_value_heads") or n_heads, vocab_size=cfg["vocab_size"],
                        hidden_dim=cfg["intermediate_size"], norm_eps=cfg.get("rms_norm_eps", 1e-6),
                        rope_theta=float(theta) if isinstance(theta, (int, float)) else theta, rope_scaling=scaling,
                        max_seq_len=max_seq_len)
    except KeyError as e:
        raise ValueError(f"{source} lacks the key {e.args[0]!r} that a LlamaConfig must have.") from None
    return ModelArgs.from_dict(settings, source=source)


def _hf_rope_scaling(scaling: dict, max_position_embeddings) -> tuple[Optional[dict], object]:
    """(rope_scaling, max_seq_len) from an HF config's `rope_scaling` (4.x) or `rope_parameters` (5.x), read as
    transformers reads them: yarn and llama3 without original_max_position_embeddings take
    max_position_embeddings; dynamic always takes max_position_embeddings as its trained window (HF ignores
    any other value), and the model then accepts factor x that window."""
    if not isinstance(scaling, dict):
        return scaling, max_position_embeddings  # ModelArgs refuses it with the value in the message
    kind = scaling_type(scaling) or "default"
    scaling = {"rope_type": kind, **{k: v for k, v in scaling.items() if k not in ("rope_theta", "type", "rope_type")}}
    if kind == "default":
        return None, max_position_embeddings
    if kind in ("yarn", "llama3"):
        scaling.setdefault("original_max_position_embeddings", max_position_embeddings)
    if kind == "dynamic" and isinstance(max_position_embeddings, int):
        scaling["original_max_position_embeddings"] = max_position_embeddings
        factor = scaling.get("factor")
        if isinstance(factor, (int, float)) and not isinstance(factor, bool) and 1 <= factor < math.inf:
            return scaling, int(factor * max_position_embeddings)
    return scaling, max_position_embeddings


def _hf_rope_settings(args: ModelArgs) -> dict:
    """rope_theta, rope_scaling and max_position_embeddings of an HF config giving the same angles as `args`.
    HF has no `ntk` type: its scaled base goes into rope_theta. HF's `dynamic` reads max_position_embeddings
    as the trained window, so that is what it holds (read back, the model accepts factor x that window)."""
    out = {"rope_theta": args.rope_theta, "rope_scaling": None, "max_position_embeddings": args.max_seq_len}
    if args.rope_scaling is None:
        return out
    scaling = {k: v for k, v in args.rope_scaling.items() if k != "type"}
    kind = scaling["rope_type"] = scaling_type(args.rope_scaling)
    if kind == "ntk":
        out["rope_theta"] = ntk_theta(args.rope_theta, scaling["factor"], args.head_dim)
        warnings.warn(f"HF export: transformers has no 'ntk' rope type; config.json holds the scaled "
                      f"rope_theta={out['rope_theta']:g}, which gives the same angles.", stacklevel=4)
        return out
    if kind == "dynamic":
        original = scaling.pop("original_max_position_embeddings")
        out["max_position_embeddings"] = original
        if args.max_seq_len != int(scaling["factor"] * original):
            warnings.warn(f"HF export: with 'dynamic' scaling config.json holds max_position_embeddings={original} "
                          f"(the trained window), so max_seq_len={args.max_seq_len} reads back as "
                          f"{int(scaling['factor'] * original)} (factor x window).", stacklevel=4)
    if kind == "llama3":  # transformers requires both; these are Meta's values, which rope.py defaults to
        scaling = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, **scaling}
    out["rope_scaling"] = scaling
    return out


def args_to_hf_config(args: ModelArgs, dtype: torch.dtype) -> dict:
    """An HF LlamaConfig dict for these ModelArgs (readable by transformers 4.x and 5.x)."""
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": args.dim, "intermediate_size": args.ffn_hidden_dim,
        "num_hidden_layers": args.n_layers, "num_attention_heads": args.n_heads,
        "num_key_value_heads": args.n_kv_heads, "head_dim": args.head_dim, "vocab_size": args.vocab_size,
        "rms_norm_eps": args.norm_eps, **_hf_rope_settings(args), "hidden_act": "silu",
        "attention_bias": False, "mlp_bias": False, "tie_word_embeddings": False,
        "bos_token_id": 1, "eos_token_id": 2, "initializer_range": 0.02,
        "torch_dtype": str(dtype).removeprefix("torch."),
    }


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------
def detect_format(path: PathLike) -> str:
    """'native', 'hf' or 'meta' for a checkpoint directory; a clear error otherwise."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"Checkpoint path {path} does not exist.")
    if not path.is_dir():
        raise ValueError(f"Checkpoint path {path} is a file: expected a directory holding config.json "
                         f"(native or HF) or params.json (Meta).")
    if (path / "params.json").exists():
        return "meta"
    if (path / "config.json").exists():
        cfg = read_json(path / "config.json")
        return "native" if cfg.get("format") == "minillama" else "hf"
    raise ValueError(f"{path} holds no known checkpoint: expected config.json + *.safetensors (native or HF) "
                     f"or params.json + consolidated.NN.pth (Meta).")


def read_model_args(path: PathLike) -> ModelArgs:
    """The model's shape from a checkpoint's config, without reading its weights (Meta shards are mapped,
    not read: their vocab size may come from the embedding's shape)."""
    path = Path(path)
    fmt = detect_format(path)
    if fmt == "meta":
        return open_meta(path)[0]
    cfg = read_json(path / "config.json")
    if fmt == "hf":
        return hf_config_to_args(cfg, source=str(path / "config.json"))
    cfg.pop("format", None)
    return ModelArgs.from_dict(cfg, source=str(path / "config.json"))


def _read_safetensors(files: Iterable[Path]) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in files:
        if not f.exists():
            raise FileNotFoundError(f"Checkpoint shard {f} is missing.")
        try:
            with safe_open(str(f), framework="pt") as sf:
                for key in sf.keys():
                    out[key] = sf.get_tensor(key)
        except SafetensorError as e:
            raise ValueError(f"{f} is not a readable safetensors file ({e}); is it truncated or corrupt?") from None
    return out


def _load_native(path: Path) -> tuple[ModelArgs, dict]:
    return read_model_args(path), _read_safetensors([path / "model.safetensors"])


def _inside(path: Path, name: str, source: str) -> Path:
    """path / name, refused unless it stays inside the checkpoint folder (no absolute name, no `..`, no
    symlink leading out), checked before anything is opened. The one exception: the links of a Hugging Face
    hub cache snapshot (`snapshots/REV/x` -> `../../blobs/HASH`) may lead to that repository's blobs/."""
    f = path / name
    roots = [path.resolve()]
    if path.resolve().parent.name == "snapshots":
        roots.append(path.resolve().parent.parent / "blobs")
    if not isinstance(name, str) or Path(name).is_absolute() or ".." in Path(name).parts or not any(
            f.resolve().is_relative_to(root) for root in roots):
        raise ValueError(f"{source}: the shard {name!r} leads outside the checkpoint folder {path} (refused "
                         f"before opening it): expected a file inside that folder.")
    return f


def hf_weight_files(path: Path) -> list[Path]:
    """The safetensors files of an HF checkpoint (from its index if sharded), each checked to be inside it."""
    if (path / HF_SAFE_INDEX).exists():
        weight_map = read_json(path / HF_SAFE_INDEX).get("weight_map")
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise ValueError(f"{path / HF_SAFE_INDEX}: 'weight_map' must be an object mapping each weight name to "
                             f"its shard's file name, not {json.dumps(weight_map)[:60]}.")
        source = str(path / HF_SAFE_INDEX)
        files = [_inside(path, name, source) for name in sorted(set(weight_map.values()), key=str)]
    else:
        files = [_inside(path, f.name, str(path)) for f in sorted(path.glob("*.safetensors"))]
    if not files:
        raise ValueError(f"{path} has an HF config.json but no *.safetensors weights "
                         f"(PyTorch .bin files are not supported: convert them to safetensors).")
    return files


def _load_hf(path: Path) -> tuple[ModelArgs, dict]:
    cfg = read_json(path / "config.json")
    args = hf_config_to_args(cfg, source=str(path / "config.json"))
    files = hf_weight_files(path)
    hf = _read_safetensors(files)
    if "lm_head.weight" not in hf and cfg.get("tie_word_embeddings") and "model.embed_tokens.weight" in hf:
        hf["lm_head.weight"] = hf["model.embed_tokens.weight"]  # tied head (shared, not copied)
    sd = {}
    for name, t in hf.items():
        meta = hf_to_meta_name(name)
        if meta is None:
            if name.endswith("rotary_emb.inv_freq"):  # older HF checkpoints store it; recomputed here
                continue
            raise ValueError(f"{path}: weight {name!r} is not part of a LLaMA model.")
        heads = qk_heads(meta, args)
        sd[meta] = permute_hf_to_meta(t, heads) if heads else t
    return args, sd


# Meta splits each weight over model-parallel ranks: column-parallel layers (output rows) on dim 0,
# row-parallel layers (input columns) and the Llama-2 embedding on dim 1; norms are replicated.
_META_CONCAT_DIM = {"wq": 0, "wk": 0, "wv": 0, "w1": 0, "w3": 0, "output": 0, "wo": 1, "w2": 1, "tok_embeddings": 1}


def _meta_split_dim(name: str) -> Optional[int]:
    parts = name.split(".")
    return _META_CONCAT_DIM.get(parts[-2]) if len(parts) >= 2 else None


def _torch_load(f: Path) -> dict:
    try:
        shard = torch.load(f, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as e:
        raise ValueError(f"{f} needs arbitrary code to unpickle, which torch.load(weights_only=True) refuses: "
                         f"minillama only loads plain tensors ({str(e).splitlines()[0]}).") from None
    except RuntimeError as e:
        raise ValueError(f"{f} is not a readable PyTorch checkpoint ({str(e).splitlines()[0]}).") from None
    if not isinstance(shard, dict):
        raise ValueError(f"{f} holds a {type(shard).__name__}: expected a dict of weight names to tensors.")
    for key, value in shard.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise ValueError(f"{f}: entry {key!r} is a {type(value).__name__}: expected a dict of weight names "
                             f"to tensors.")
    return shard


def _load_meta(path: Path) -> tuple[ModelArgs, dict]:
    args, files, shards, keys = open_meta(path)
    return args, {key: join_meta_weight(key, files, shards) for key in keys}


def open_meta(path: Path) -> tuple[ModelArgs, list[Path], list[dict], list[str]]:
    """(args, shard files in rank order, their memory-mapped dicts, weight names) of a Meta checkpoint; the
    weights are read only when join_meta_weight asks for them (one at a time when streaming)."""
    params = read_json(path / "params.json")
    files = sorted(path.glob("consolidated.*.pth"))
    if not files:
        raise ValueError(f"{path} has params.json but no consolidated.NN.pth shards.")
    by_rank: dict[int, Path] = {}
    for f in files:
        m = re.fullmatch(r"consolidated\.(\d+)\.pth", f.name)
        if not m:
            raise ValueError(f"{f} does not follow Meta's naming consolidated.NN.pth.")
        rank = int(m.group(1))
        if rank in by_rank:
            raise ValueError(f"{path}: {by_rank[rank].name} and {f.name} are both the shard of the same rank {rank}.")
        by_rank[rank] = f
    # join in rank order, not name order (as text, consolidated.10.pth sorts before consolidated.2.pth)
    numbers = sorted(by_rank)
    files = [by_rank[i] for i in numbers]
    for i in range(max(numbers) + 1):
        if i not in numbers:
            raise FileNotFoundError(f"Meta shard {path / f'consolidated.{i:02d}.pth'} is missing "
                                    f"({len(files)} shards found, numbered up to {max(numbers):02d}).")
    shards = [_torch_load(f) for f in files]
    keys = [k for k in shards[0] if k != "rope.freqs"]  # Meta stores RoPE frequencies; recomputed here
    for f, shard in zip(files[1:], shards[1:]):
        if set(shard) != set(shards[0]):
            diff = sorted(set(shard) ^ set(shards[0]))[0]
            raise ValueError(f"Meta shards disagree: key {diff!r} is in only one of {files[0].name} and {f.name}.")
    if params.pop("use_scaled_rope", False):  # Llama-3.1 and 3.2
        params["rope_scaling"] = meta_rope_scaling(params)
    if (path / META_SIDE_FILE).exists():  # minillama's own settings, written beside params.json by save_model
        side = read_json(path / META_SIDE_FILE)
        unknown = sorted(set(side) - set(META_SIDE_KEYS))
        if unknown:
            raise ValueError(f"{path / META_SIDE_FILE} holds the unknown key {unknown[0]!r}: expected only "
                             f"{', '.join(META_SIDE_KEYS)}.")
        params.update(side)
    if params.get("vocab_size", -1) <= 0 and "tok_embeddings.weight" in shards[0]:
        params["vocab_size"] = shards[0]["tok_embeddings.weight"].shape[0]  # -1 means "from the tokenizer"
    return ModelArgs.from_dict(params, source=str(path / "params.json")), files, shards, keys


def join_meta_weight(key: str, files: list[Path], shards: list[dict]) -> torch.Tensor:
    """One weight of a Meta checkpoint, its model-parallel parts joined (replicated ones checked equal)."""
    parts = [s[key] for s in shards]
    dim = _meta_split_dim(key) if len(parts) > 1 else None
    if dim is None:
        for f, p in zip(files[1:], parts[1:]):
            if p.shape != parts[0].shape or not torch.equal(p, parts[0]):
                raise ValueError(f"Meta shards disagree: replicated weight {key!r} differs between "
                                 f"{files[0].name} and {f.name}.")
        return parts[0]
    other = [tuple(s for i, s in enumerate(p.shape) if i != dim) for p in parts]
    if len(set(other)) != 1:
        raise ValueError(f"Meta shards disagree: {key!r} has shapes {[list(p.shape) for p in parts]} "
                         f"across shards, which cannot be joined on dim {dim}.")
    return torch.cat(parts, dim=dim)


def _check_layer_count(path: Path, args: ModelArgs, sd: dict, cfg_name: str) -> None:
    """Compare the config's n_layers with the checkpoint's tensors before building the model (a config
    claiming a million layers would otherwise build them all first)."""
    layers = {int(m.group(1)) for m in (re.match(r"layers\.(\d+)\.", k) for k in sd) if m}
    found = max(layers) + 1 if layers else 0
    if found != args.n_layers:
        raise ValueError(f"{path}: {cfg_name} says n_layers={args.n_layers} but the checkpoint holds weights "
                         f"for {found} layers.")


def _check_weights(path: Path, expected: dict, sd: dict, cfg_name: str) -> None:
    """Every weight the model needs is there, with the shape the config implies and a floating-point dtype."""
    for key, t in expected.items():
        if key not in sd:
            raise ValueError(f"{path}: weight {key!r} is missing from the checkpoint.")
        if tuple(sd[key].shape) != tuple(t.shape):
            raise ValueError(f"{path}: weight {key!r} has shape {list(sd[key].shape)} but {cfg_name} implies "
                             f"{list(t.shape)}.")
        if not sd[key].is_floating_point():
            raise ValueError(f"{path}: weight {key!r} is {sd[key].dtype}: expected floating-point weights "
                             f"(fp32, fp16 or bf16).")
    extra = sorted(set(sd) - set(expected))
    if extra:
        raise ValueError(f"{path}: weight {extra[0]!r} is not part of a model with this {cfg_name}.")


def _check_finite(path: Path, key: str, t: torch.Tensor) -> None:
    """Refuse NaN or inf weights (generation would print garbage). One sum per tensor: the sum of finite
    values is finite unless it overflows, and only then is the exact (slower) element-wise test run."""
    if not torch.isfinite(t.sum()) and not torch.isfinite(t).all():
        bad = int((~torch.isfinite(t)).sum())
        raise ValueError(f"{path}: weight {key!r} holds NaN or inf values ({bad:,} of {t.numel():,}): the "
                         f"checkpoint is broken (a diverged training run, or a failed conversion).")


def load_model(path: PathLike, *, device="cpu", dtype=None, max_seq_len: Optional[int] = None,
               rope_scaling: Optional[dict] = None) -> Transformer:
    """Load a native, HF or Meta checkpoint directory into a minillama Transformer (eval mode).

    dtype: None keeps the checkpoint's dtype; otherwise each tensor is cast as it is loaded.
    max_seq_len / rope_scaling override the checkpoint's config (e.g. to extend the context).
    """
    if not isinstance(path, (str, os.PathLike)):
        raise ValueError(f"load_model({path!r}): expected the path of a checkpoint directory (a str or a Path).")
    path = Path(path)
    dtype = parse_dtype(dtype)
    fmt = detect_format(path)
    args, sd = {"native": _load_native, "hf": _load_hf, "meta": _load_meta}[fmt](path)
    overrides = {}
    if max_seq_len is not None:
        overrides["max_seq_len"] = max_seq_len
    if rope_scaling is not None:
        overrides["rope_scaling"] = rope_scaling
    if overrides:
        args = args.replace(**overrides)
    cfg_name = "params.json" if fmt == "meta" else "config.json"
    _check_layer_count(path, args, sd, cfg_name)
    with torch.device("meta"):
        model = Transformer(args)
    expected = model.state_dict()
    _check_weights(path, expected, sd, cfg_name)
    for key in expected:  # cast and move one tensor at a time
        sd[key] = sd[key].to(device=device, dtype=dtype or sd[key].dtype)
        _check_finite(path, key, sd[key])
    model.load_state_dict(sd, assign=True, strict=True)
    model.args = args
    return model.eval()


# ---------------------------------------------------------------------------------------------
# Saving (atomic: everything goes to a temporary directory that is renamed into place)
# ---------------------------------------------------------------------------------------------
def meta_rope_scaling(params: dict) -> dict:
    """The rope_scaling of Meta's `"use_scaled_rope": true` (Llama-3.1/3.2), as Meta's apply_scaling computes it
    (meta-llama/llama-models, models/llama3): factor 8 (or params.json's rope_scaling_factor), low_freq_factor 1,
    high_freq_factor 4 (or params.json's high_freq_factor), over Llama-3's 8,192 trained positions; HF's "llama3"."""
    return {"rope_type": "llama3", "factor": float(params.pop("rope_scaling_factor", None) or 8.0),
            "low_freq_factor": 1.0, "high_freq_factor": float(params.pop("high_freq_factor", None) or 4.0),
            "original_max_position_embeddings": 8192}


def _meta_scaled_rope(scaling: dict) -> Optional[dict]:
    """params.json's keys for a `llama3` rope_scaling that Meta's apply_scaling computes, else None."""
    if scaling_type(scaling) != "llama3" or scaling.get("original_max_position_embeddings") != 8192 or \
            scaling.get("low_freq_factor", 1.0) != 1.0:
        return None
    keys = {"use_scaled_rope": True}
    if scaling["factor"] != 8.0:
        keys["rope_scaling_factor"] = scaling["factor"]
    if scaling.get("high_freq_factor", 4.0) != 4.0:
        keys["high_freq_factor"] = scaling["high_freq_factor"]
    return keys


def _state_dict_for_saving(model: Transformer) -> dict[str, torch.Tensor]:
    # safetensors refuses shared or non-contiguous tensors; copy only where needed
    seen, out = set(), {}
    for k, t in model.state_dict().items():
        t = t.detach().cpu()
        if t.data_ptr() in seen or not t.is_contiguous():
            t = t.contiguous().clone()
        seen.add(t.data_ptr())
        out[k] = t
    return out


def hf_state_dict(sd: dict, args: ModelArgs) -> dict[str, torch.Tensor]:
    """Our state dict in HF's names and q/k row order (LlamaForCausalLM.load_state_dict takes it)."""
    hf = {}
    for name, t in sd.items():
        heads = qk_heads(name, args)
        hf[meta_to_hf_name(name)] = (permute_meta_to_hf(t, heads) if heads else t).contiguous()
    return hf


def _write_hf(sd: dict, args: ModelArgs, out: Path, max_shard_bytes: Optional[int]) -> None:
    hf = hf_state_dict(sd, args)
    dtype = next(iter(sd.values())).dtype
    with open(out / "config.json", "w") as f:
        json.dump(args_to_hf_config(args, dtype), f, indent=2)
    write_safetensors_shards(hf, out, max_shard_bytes)


def write_safetensors_shards(hf: dict, out: Path, max_shard_bytes: Optional[int]) -> None:
    """HF-named tensors to out/model.safetensors, or to shards of at most max_shard_bytes plus their index."""
    total = sum(t.numel() * t.element_size() for t in hf.values())
    if not max_shard_bytes or total <= max_shard_bytes:
        save_file(hf, str(out / "model.safetensors"), metadata={"format": "pt"})
        return
    shards, cur, size = [], {}, 0
    for name, t in hf.items():
        nbytes = t.numel() * t.element_size()
        if cur and size + nbytes > max_shard_bytes:
            shards.append(cur)
            cur, size = {}, 0
        cur[name] = t
        size += nbytes
    shards.append(cur)
    weight_map = {}
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(out / fname), metadata={"format": "pt"})
        weight_map.update({name: fname for name in shard})
    with open(out / HF_SAFE_INDEX, "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)


def meta_params(args: ModelArgs) -> tuple[dict, dict]:
    """(params.json, minillama.json) for these ModelArgs; warns about what Meta's code cannot reproduce."""
    params = {k: getattr(args, k) for k in META_PARAMS}
    side: dict = {"max_seq_len": args.max_seq_len}
    if args.hidden_dim is not None:
        side["hidden_dim"] = args.hidden_dim
    if args.ffn_hidden_dim != args.replace(hidden_dim=None).ffn_hidden_dim:
        # Meta's code has no explicit FFN width: it rounds h = int(8 * dim / 3) (times ffn_dim_multiplier) up
        # to a multiple of multiple_of. Any width w comes out with multiple_of = w and, if h > w, a multiplier
        # w / h (int(w / h * h) is w or w - 1, rounded up to w).
        h = int(2 * (4 * args.dim) / 3)
        w = args.ffn_hidden_dim
        params.update(multiple_of=w, ffn_dim_multiplier=w / h if h > w else None)
        side.update(multiple_of=args.multiple_of, ffn_dim_multiplier=args.ffn_dim_multiplier)
    if args.rope_theta != 10000.0:  # Meta's Llama-2 value, the default of Llama-2's and Code Llama's code
        params["rope_theta"] = args.rope_theta
        warnings.warn(f"Meta export: params.json holds rope_theta={args.rope_theta:g}, which Code Llama's and "
                      f"Llama 3's loaders read but Llama-2's refuses (it has no such field).", stacklevel=4)
    if args.rope_scaling is not None and _meta_scaled_rope(args.rope_scaling):
        params.update(_meta_scaled_rope(args.rope_scaling))  # Llama-3.1's own switch
        side["rope_scaling"] = args.rope_scaling
    elif args.rope_scaling is not None:
        side["rope_scaling"] = args.rope_scaling
        warnings.warn(f"Meta export: rope_scaling={args.rope_scaling} cannot be expressed for Meta's code, which "
                      f"would run the model without it; it is kept in {META_SIDE_FILE}, which only minillama "
                      f"reads.", stacklevel=4)
    return params, side


def _write_meta(sd: dict, args: ModelArgs, out: Path, num_shards: int) -> None:
    for name, t in sd.items():
        dim = _meta_split_dim(name)
        if dim is not None and t.shape[dim] % num_shards:
            raise ValueError(f"Cannot split {name!r} of shape {list(t.shape)} into {num_shards} Meta shards "
                             f"on dim {dim}.")
    params, side = meta_params(args)
    for rank in range(num_shards):
        shard = {}
        for name, t in sd.items():
            dim = _meta_split_dim(name)
            # a view would make torch.save write the whole storage: copy the slice (one shard at a time)
            shard[name] = t if dim is None or num_shards == 1 else t.chunk(num_shards, dim=dim)[rank].clone()
        torch.save(shard, out / f"consolidated.{rank:02d}.pth")
    with open(out / "params.json", "w") as f:
        json.dump(params, f, indent=2)
    with open(out / META_SIDE_FILE, "w") as f:
        json.dump(side, f, indent=2)


def save_model(model: Transformer, path: PathLike, format: str = "native", *, tokenizer=None,
               max_shard_bytes: Optional[int] = None, num_shards: int = 1) -> Path:
    """Write `model` to directory `path` as 'native', 'hf' (optionally sharded by max_shard_bytes) or
    'meta' (num_shards model-parallel shards). Atomic: an existing directory is replaced only once
    the new one is complete. A `minillama.Tokenizer` given as `tokenizer` is saved as tokenizer.model, plus
    for 'hf' the files transformers' AutoTokenizer reads (see hf_tokenizer.py).

    A Meta export holds in params.json only what Meta's own loaders accept (see META_PARAMS) and warns about
    settings their code cannot reproduce; minillama's other settings (max_seq_len, ...) go to minillama.json."""
    if format not in FORMATS:
        raise ValueError(f"Checkpoint format {format!r} is unknown: expected one of {FORMATS}.")
    if num_shards < 1:
        raise ValueError(f"num_shards={num_shards} is invalid: expected a positive integer.")
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"Cannot save a checkpoint to {path}: it is an existing file, not a directory.")
    sd = _state_dict_for_saving(model)
    args = model.args
    with atomic_directory(path) as tmp:
        if format == "native":
            with open(tmp / "config.json", "w") as f:
                json.dump({"format": "minillama", **args.to_dict()}, f, indent=2)
            save_file(sd, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        elif format == "hf":
            _write_hf(sd, args, tmp, max_shard_bytes)
        else:
            _write_meta(sd, args, tmp, num_shards)
        if tokenizer is not None:
            save_tokenizer(tokenizer, tmp, format, args.max_seq_len)
    return path
