"""LoRA (Hu et al. 2021): train a low-rank update B A next to each frozen linear layer.

    h = W0 x + sum over active adapters of  weight * scaling * B (A (dropout(x)))
    scaling = alpha / r   (or alpha / sqrt(r) with rsLoRA, Kalajdzievski 2023)

A starts Kaiming-uniform (a = sqrt(5), PEFT's default: bound 1/sqrt(in_features)) and B starts at
zero, so a freshly wrapped model computes exactly what the base model computes.

A model holds any number of named adapters; `use_adapter` / `set_adapter` choose which ones (and
with which weights) the forward pass applies, without copying any weight. Adapters are saved and
loaded in PEFT's layout (`adapter_config.json` + `adapter_model.safetensors`, HF module names), so
they load in `peft.PeftModel.from_pretrained` and back. minillama keeps Meta's interleaved RoPE
layout, so the rows of B of wq and wk are permuted Meta <-> HF exactly like the base weights
(A multiplies the input side and needs no permutation).

The trainable matrices A and B are kept in fp32 even when the base is fp16/bf16 (as PEFT does by
default): the LoRA path casts its input to fp32 and its output back to the base output's dtype.
"""

from __future__ import annotations

import itertools
import json
import math
import re
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional, Union

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from .files import PathLike, atomic_directory, read_json
from .layout import hf_to_meta_name, meta_to_hf_name, permute_hf_to_meta, permute_meta_to_hf

ADAPTER_DTYPE = torch.float32  # adapters train in fp32 whatever the base dtype (PEFT's autocast_adapter_dtype)
TARGETS = ("wq", "wk", "wv", "wo", "w1", "w2", "w3")  # Meta names; "all" = every one of them
_PARENT = {"wq": "attention", "wk": "attention", "wv": "attention", "wo": "attention",
           "w1": "feed_forward", "w2": "feed_forward", "w3": "feed_forward"}
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
_SERIAL = itertools.count()  # creation order of adapters, so adapter_names lists them as added

AdapterSpec = Union[None, str, dict, list, tuple]


def _features(base: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of a linear layer (nn.Linear or a quantised linear)."""
    if hasattr(base, "in_features") and hasattr(base, "out_features"):
        return int(base.in_features), int(base.out_features)
    out, inp = base.weight.shape
    return int(inp), int(out)


class LoRALinear(nn.Module):
    """h = base(x) + sum over active adapters of weight * scaling * B(A(dropout(x))); base frozen.

    A: Kaiming-uniform a=sqrt(5) (PEFT's default), B zeros; scaling alpha/r, or alpha/sqrt(r) with use_rslora.

    Attributes: `base` (the wrapped linear), `lora_A` / `lora_B` / `lora_dropout` (ModuleDicts keyed by
    adapter name), `scaling` / `r` / `alpha` / `use_rslora` (dicts keyed by adapter name), `active`
    (list of (name, weight): the adapters forward applies; by default the first adapter, weight 1.0)
    and `merged` (list of (name, weight) currently added into base.weight).

    Merging never changes what forward computes: forward applies, for every adapter, its active weight
    minus the weight already merged into base.weight (so an active adapter merged at the same weight
    is skipped, and a merged adapter that is switched off is subtracted again).
    """

    def __init__(self, base: nn.Module, r: int = 8, alpha: float = 16, dropout: float = 0.0,
                 use_rslora: bool = False, name: str = "default"):
        super().__init__()
        self.base = base
        self.in_features, self.out_features = _features(base)
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.lora_dropout = nn.ModuleDict()
        self.r: dict[str, int] = {}
        self.alpha: dict[str, float] = {}
        self.use_rslora: dict[str, bool] = {}
        self.scaling: dict[str, float] = {}
        self.active: list[tuple[str, float]] = []
        self.merged: list[tuple[str, float]] = []
        self.created: dict[str, int] = {}
        for p in self.base.parameters():
            p.requires_grad_(False)
        self.add_adapter(name, r, alpha, dropout, use_rslora)
        self.active = [(name, 1.0)]

    def add_adapter(self, name: str, r: int, alpha: float, dropout: float = 0.0, use_rslora: bool = False) -> None:
        """Add a new adapter `name` (A Kaiming-uniform, B zero); `active` is left as it is."""
        _check_hparams(r, alpha, dropout)
        if name in self.lora_A:
            raise ValueError(f"Adapter {name!r} already exists on this layer: applying LoRA twice to the "
                             f"same layer is not allowed (use another name).")
        w = getattr(self.base, "weight", None)
        device = w.device if w is not None else None
        # The same calls as PEFT (nn.Linear's own init, then kaiming_uniform_ again), so a fixed seed
        # gives PEFT's A exactly: A Kaiming-uniform with a = sqrt(5) (in place, nn.init), B all zeros.
        A = nn.Linear(self.in_features, r, bias=False, device=device, dtype=ADAPTER_DTYPE)
        B = nn.Linear(r, self.out_features, bias=False, device=device, dtype=ADAPTER_DTYPE)
        # BEGIN SOLUTION a2
        nn.init.kaiming_uniform_(A.weight, a=math.sqrt(5))
        nn.init.zeros_(B.weight)
        # END SOLUTION
        self.lora_A[name], self.lora_B[name] = A, B
        self.lora_dropout[name] = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.r[name], self.alpha[name], self.use_rslora[name] = int(r), alpha, bool(use_rslora)
        self.scaling[name] = alpha / (math.sqrt(r) if use_rslora else r)
        self.created[name] = next(_SERIAL)

    @property
    def weight(self) -> torch.Tensor:
        """The base layer's weight (so code that reads `.weight` of a linear, e.g. its dtype, still works)."""
        return self.base.weight

    def delta_weight(self, name: str) -> torch.Tensor:
        """scaling * B @ A: the change this adapter makes to base.weight (shape [out, in], fp32)."""
        return self.scaling[name] * (self.lora_B[name].weight @ self.lora_A[name].weight)

    def _base_weight(self) -> torch.Tensor:
        w = getattr(self.base, "weight", None)
        if w is None or not w.is_floating_point():
            hint = " (merge_lora(model) merges into a dequantised copy)" if hasattr(self.base, "dequantized_weight") else ""
            raise ValueError(f"Cannot merge into a {type(self.base).__name__} in place: its weight is not a "
                             f"floating-point tensor{hint}.")
        return w

    @torch.no_grad()
    def merge(self, name: Optional[str] = None) -> None:
        """Add the delta of the active adapters (with their weights), or of adapter `name` (with its active
        weight, 1.0 if it is not active), into base.weight in place. Already merged adapters are skipped.

        Use w = self._base_weight() (it refuses a non-float base); an unknown `name` is a ValueError naming the
        adapters this layer has; skip adapters already in self.merged or of weight 0; add
        (weight * self.delta_weight(n)).to(w.dtype) to w and append (n, weight) to self.merged.
        """
        # BEGIN SOLUTION a2
        w = self._base_weight()
        active = dict(self.active)
        if name is None:
            todo = list(self.active)
        else:
            if name not in self.lora_A:
                raise ValueError(f"Adapter {name!r} is not on this layer: it has {list(self.lora_A)}.")
            todo = [(name, active.get(name, 1.0))]
        done = {n for n, _ in self.merged}
        for n, weight in todo:
            if n in done or weight == 0:
                continue
            w.add_((weight * self.delta_weight(n)).to(w.dtype))
            self.merged.append((n, weight))
        # END SOLUTION

    @torch.no_grad()
    def unmerge(self) -> None:
        """Subtract every merged delta from base.weight again (exact up to fp32 rounding): in reverse order
        of self.merged, subtract (weight * delta_weight(n)).to(w.dtype); then self.merged = []. No-op if empty."""
        # BEGIN SOLUTION a2
        if not self.merged:
            return
        w = self._base_weight()
        for n, weight in reversed(self.merged):
            w.sub_((weight * self.delta_weight(n)).to(w.dtype))
        self.merged = []
        # END SOLUTION

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """base(x) plus, for each active adapter n with weight w, w * scaling[n] * B_n(A_n(dropout_n(x))).

        The LoRA path runs in the dtype of A (fp32) and is cast back to the base output's dtype. An
        adapter already merged into the base weight (self.merged: [(name, weight)]) is counted with
        its merged weight subtracted, so merging never changes the output.
        """
        # BEGIN SOLUTION a2
        out = self.base(x)
        coef = dict(self.active)
        for n, weight in self.merged:
            coef[n] = coef.get(n, 0.0) - weight
        for n, c in coef.items():
            if c == 0 or n not in self.lora_A:
                continue
            A, B = self.lora_A[n], self.lora_B[n]
            xa = self.lora_dropout[n](x.to(A.weight.dtype))
            # The scaling multiplies the rank-r A x, not B's [tokens, out_features] result (as PEFT does):
            # the same value, with r / out_features as many multiplications, forward and backward.
            out = out + B(A(xa) * (c * self.scaling[n])).to(out.dtype)
        return out
        # END SOLUTION

    def extra_repr(self) -> str:
        ads = ", ".join(f"{n}: r={self.r[n]} alpha={self.alpha[n]}" for n in self.lora_A)
        return f"in={self.in_features}, out={self.out_features}, adapters=[{ads}], active={self.active}"


def _check_hparams(r, alpha, dropout) -> None:
    if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
        raise ValueError(f"LoRA rank r={r!r} is invalid: expected a positive integer.")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not alpha > 0:
        raise ValueError(f"LoRA alpha={alpha!r} is invalid: expected a positive number.")
    if not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
        raise ValueError(f"LoRA dropout={dropout!r} is invalid: expected a probability in [0, 1).")


def normalise_targets(targets) -> tuple[str, ...]:
    """Target names as a tuple in TARGETS order: "all", one name, or a sequence of names (Meta names)."""
    if isinstance(targets, str):
        targets = TARGETS if targets == "all" else (targets,)
    targets = tuple(targets)
    if not targets:
        raise ValueError(f"LoRA targets are empty: expected some of {TARGETS} or 'all'.")
    bad = [t for t in targets if t not in TARGETS]
    if bad:
        raise ValueError(f"LoRA target {bad[0]!r} is unknown: expected some of {TARGETS} (Meta names) or 'all'.")
    return tuple(t for t in TARGETS if t in targets)  # canonical order, no duplicates


def lora_layers(model: nn.Module) -> list[tuple[str, LoRALinear]]:
    """(qualified name, module) of every LoRALinear in the model."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoRALinear)]


def _current_active(model: nn.Module) -> Optional[list]:
    """The model-wide active list (None if the model has no LoRA layer yet)."""
    layers = lora_layers(model)
    if not layers:
        return None
    seen: dict[str, float] = {}
    for _, m in layers:
        for n, w in m.active:
            seen.setdefault(n, w)
    return list(seen.items())


def _attach(model: nn.Module, sites: list[tuple[int, str]], r: int, alpha: float, dropout: float,
            use_rslora: bool, name: str) -> dict[tuple[int, str], LoRALinear]:
    """Wrap (or extend) the linear of every (layer index, target) site with adapter `name`. All sites are
    checked before anything changes. Freezes every non-LoRA parameter."""
    _check_hparams(r, alpha, dropout)
    if not isinstance(name, str) or not name or "." in name:
        raise ValueError(f"Adapter name {name!r} is invalid: expected a non-empty string without dots.")
    for i, t in sites:
        mod = getattr(model.layers[i], _PARENT[t])
        lin = getattr(mod, t)
        if isinstance(lin, LoRALinear) and name in lin.lora_A:
            raise ValueError(f"Adapter {name!r} already exists on layers.{i}.{_PARENT[t]}.{t}: applying LoRA "
                             f"twice to the same layer is not allowed (choose another name).")
    before = _current_active(model)
    out = {}
    for i, t in sites:
        mod = getattr(model.layers[i], _PARENT[t])
        lin = getattr(mod, t)
        if isinstance(lin, LoRALinear):
            lin.add_adapter(name, r, alpha, dropout, use_rslora)
        else:
            lin = LoRALinear(lin, r, alpha, dropout, use_rslora, name)
            if before is not None:  # follow the adapters the rest of the model applies
                lin.active = [(n, w) for n, w in before if n in lin.lora_A]
            setattr(mod, t, lin)
        out[(i, t)] = lin
    for pname, p in model.named_parameters():
        p.requires_grad_(".lora_A." in pname or ".lora_B." in pname)
    return out


def apply_lora(model: nn.Module, r: int = 8, alpha: float = 16, dropout: float = 0.0,
               targets=("wq", "wv"), use_rslora: bool = False, name: str = "default") -> nn.Module:
    """Wrap the `targets` linears (Meta names, or "all") of every layer in LoRALinear, or add adapter `name`
    to those already wrapped; freeze every non-LoRA parameter; return the model (changed in place).

    The first adapter of a model is active at weight 1.0; adding another leaves the active set as it is
    (switch with set_adapter / use_adapter, or call_with_adapter(model, name, x)).

    Implementation: normalise the targets (normalise_targets), list the sites (layer index i, target t) for
    every layer of model.layers and every target, and hand them to _attach(model, sites, r, alpha, dropout,
    use_rslora, name), which checks them, wraps or extends each linear and freezes the rest.
    """
    # BEGIN SOLUTION a2
    targets = normalise_targets(targets)
    sites = [(i, t) for i in range(len(model.layers)) for t in targets]
    _attach(model, sites, r, alpha, dropout, use_rslora, name)
    return model
    # END SOLUTION


def trainable_parameters(model: nn.Module) -> dict:
    """{"trainable": parameters with requires_grad, "total": all parameters, "percent": 100 * ratio}."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"trainable": trainable, "total": total, "percent": 100.0 * trainable / total if total else 0.0}


def lora_parameter_count(args, r: int, targets=("wq", "wv")) -> int:
    """Trainable LoRA parameters for a model of these ModelArgs: r * (in + out) per targeted linear.
    Llama-2-7B: q/v at r=8 -> 4,194,304; all seven at r=8 -> 19,988,480."""
    _check_hparams(r, 1, 0.0)
    shapes = args.linear_shapes()
    return args.n_layers * sum(r * sum(shapes[t]) for t in normalise_targets(targets))


# ---------------------------------------------------------------------------------------------
# Choosing adapters
# ---------------------------------------------------------------------------------------------
def adapter_names(model: nn.Module) -> list[str]:
    """Names of the adapters the model holds, in the order they were added."""
    first: dict[str, int] = {}
    for _, m in lora_layers(model):
        for n in m.lora_A:
            first[n] = min(first.get(n, m.created[n]), m.created[n])
    return sorted(first, key=first.get)


def _resolve(model: nn.Module, adapter: AdapterSpec) -> list[tuple[str, float]]:
    if adapter is None:
        spec = []
    elif isinstance(adapter, str):
        spec = [(adapter, 1.0)]
    elif isinstance(adapter, dict):
        spec = list(adapter.items())
    elif isinstance(adapter, (list, tuple)):
        spec = [(n, 1.0) for n in adapter]
    else:
        raise ValueError(f"adapter={adapter!r} is invalid: expected None, a name, or a dict name -> weight.")
    known = adapter_names(model)
    for n, w in spec:
        if n not in known:
            raise ValueError(f"Adapter {n!r} is unknown: the model holds {known}.")
        if isinstance(w, bool) or not isinstance(w, (int, float)):
            raise ValueError(f"Weight {w!r} of adapter {n!r} is invalid: expected a number.")
    return [(n, float(w)) for n, w in spec]


def set_adapter(model: nn.Module, adapter: AdapterSpec) -> None:
    """Choose the adapters forward applies, for good: None (base model only), a name, or a dict
    {name: weight} (stacking: base + sum of weight * delta)."""
    spec = _resolve(model, adapter)
    for _, m in lora_layers(model):
        m.active = [(n, w) for n, w in spec if n in m.lora_A]


@contextmanager
def use_adapter(model: nn.Module, adapter: AdapterSpec) -> Iterator[nn.Module]:
    """Like set_adapter for the duration of a `with` block; the previous choice is restored afterwards.
    Only the `active` lists change: no weight is copied."""
    spec = _resolve(model, adapter)
    layers = [m for _, m in lora_layers(model)]
    saved = [list(m.active) for m in layers]
    try:
        for m in layers:
            m.active = [(n, w) for n, w in spec if n in m.lora_A]
        yield model
    finally:
        for m, act in zip(layers, saved):
            m.active = act


def call_with_adapter(model: nn.Module, adapter: AdapterSpec, *args, **kwargs):
    """model(*args, **kwargs) with `adapter` chosen for this one call (a name, a dict {name: weight}, or
    None / {} for the base model): the model itself knows no adapter, LoRA switches it from outside."""
    with use_adapter(model, adapter):
        return model(*args, **kwargs)


def merge_lora(model: nn.Module, name: Optional[str] = None) -> nn.Module:
    """Fold the active adapters (with their weights), or adapter `name` alone (weight 1.0), into the base
    weights and put the plain linear layers back; every other adapter is dropped. Returns the model.
    A 4-bit base is dequantised first and becomes an nn.Linear (see _dequantized)."""
    if name is not None and name not in adapter_names(model):
        raise ValueError(f"Adapter {name!r} is unknown: the model holds {adapter_names(model)}.")
    replace = []
    for parent in model.modules():
        for cname, child in parent.named_children():
            if isinstance(child, LoRALinear):
                replace.append((parent, cname, child))
    for parent, cname, lin in replace:
        lin.unmerge()
        lin.base = _dequantized(lin.base)
        weights = dict(lin.active) if name is None else {name: 1.0}
        with torch.no_grad():
            w = lin._base_weight()
            delta = None
            for n, c in weights.items():
                if n in lin.lora_A and c != 0:
                    d = c * lin.delta_weight(n)
                    delta = d if delta is None else delta + d
            if delta is not None:
                w.add_(delta.to(w.dtype))
        setattr(parent, cname, lin.base)
    return model


def _dequantized(base: nn.Module) -> nn.Module:
    """A quantised base (one with a dequantized_weight() method, as minillama.quant's 4-bit layers have) as a
    plain nn.Linear in the dtype it was quantised from; any other base unchanged. Merging does not go back to
    4 bits: re-quantising W + scaling * B A would round most of the update away (its entries are far smaller
    than the gaps between 4-bit levels times the block's absmax) and add a second quantisation error."""
    if not hasattr(base, "dequantized_weight"):
        return base
    w = base.dequantized_weight()
    lin = nn.Linear(base.in_features, base.out_features, bias=base.bias is not None, device=w.device, dtype=w.dtype)
    lin.weight = nn.Parameter(w, requires_grad=False)
    if base.bias is not None:
        lin.bias = nn.Parameter(base.bias.detach().to(w.dtype).clone(), requires_grad=False)
    return lin


# ---------------------------------------------------------------------------------------------
# PEFT files
# ---------------------------------------------------------------------------------------------
_PREFIX = "base_model.model."
_KEY = re.compile(r"base_model\.model\.(model\.layers\.(\d+)\.[A-Za-z_]+\.[A-Za-z_]+)\.lora_([AB])(?:\.[^.]+)?\.weight")


def _heads(model: nn.Module, target: str) -> Optional[int]:
    return {"wq": model.args.n_heads, "wk": model.args.n_kv_heads}.get(target)


def _saved_modules(model: nn.Module, params) -> tuple[dict, list]:
    """Whole tensors saved with an adapter (PEFT's modules_to_save): {PEFT key: tensor} and the module names
    that adapter_config.json lists. Only the embeddings and the RMSNorm weights (LongLoRA's extras) qualify."""
    tensors, modules, own = {}, set(), dict(model.named_parameters())
    for meta in params:
        hf = meta_to_hf_name(meta)
        if meta not in own or hf is None or not (meta.startswith("tok_embeddings.") or "norm." in meta):
            raise ValueError(f"modules_to_save: {meta!r} is not the embeddings' or an RMSNorm's weight of the model.")
        tensors[f"{_PREFIX}{hf}"] = own[meta].detach().cpu().contiguous().clone()
        modules.add(hf.removesuffix(".weight").rsplit(".", 1)[-1])
    return tensors, sorted(modules)


def save_adapter(model: nn.Module, path: PathLike, name: str = "default", *,
                 base_model_name_or_path: Optional[str] = None, modules_to_save=(), extra_files=None) -> Path:
    """Write adapter `name` to directory `path` in PEFT's layout (atomically): adapter_config.json and
    adapter_model.safetensors with HF module names; the rows of B of wq / wk are permuted Meta -> HF.

    modules_to_save: Meta names of parameters saved whole beside the adapter (trained embeddings / norms),
    as PEFT's `modules_to_save`. extra_files: {file name: text} written into the same directory."""
    path = Path(path)
    tensors, modules = _saved_modules(model, modules_to_save)
    targets, layers, hp = set(), set(), set()
    for i, layer in enumerate(model.layers):
        for t in TARGETS:
            lin = getattr(getattr(layer, _PARENT[t]), t)
            if not isinstance(lin, LoRALinear) or name not in lin.lora_A:
                continue
            hf = meta_to_hf_name(f"layers.{i}.{_PARENT[t]}.{t}.weight").removesuffix(".weight")
            A = lin.lora_A[name].weight.detach().cpu()
            B = lin.lora_B[name].weight.detach().cpu()
            heads = _heads(model, t)
            if heads:
                B = permute_meta_to_hf(B, heads)
            tensors[f"{_PREFIX}{hf}.lora_A.weight"] = A.contiguous().clone()
            tensors[f"{_PREFIX}{hf}.lora_B.weight"] = B.contiguous().clone()
            targets.add(hf.rsplit(".", 1)[1])
            layers.add(i)
            hp.add((lin.r[name], lin.alpha[name], lin.use_rslora[name], getattr(lin.lora_dropout[name], "p", 0.0)))
    if not layers:
        raise ValueError(f"The model holds no adapter {name!r} to save: it has {adapter_names(model)}.")
    if len(hp) != 1:
        raise ValueError(f"Adapter {name!r} has different (r, alpha, use_rslora, dropout) on different layers "
                         f"({sorted(hp)}): PEFT's adapter_config.json holds one setting.")
    r, alpha, rslora, dropout = hp.pop()
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": r, "lora_alpha": alpha, "lora_dropout": dropout,
        "target_modules": sorted(targets), "use_rslora": rslora, "bias": "none",
        "base_model_name_or_path": base_model_name_or_path, "fan_in_fan_out": False, "init_lora_weights": True,
        "inference_mode": True, "use_dora": False, "lora_bias": False, "modules_to_save": modules or None,
        "rank_pattern": {}, "alpha_pattern": {}, "layers_pattern": None, "revision": None,
        "layers_to_transform": None if len(layers) == len(model.layers) else sorted(layers),
    }
    with atomic_directory(path) as tmp:
        with open(tmp / ADAPTER_CONFIG, "w") as f:
            json.dump(config, f, indent=2)
        save_file(tensors, str(tmp / ADAPTER_WEIGHTS), metadata={"format": "pt"})
        for fname, text in (extra_files or {}).items():
            (tmp / fname).write_text(text)
    return path


def load_adapter(model: nn.Module, path: PathLike, name: Optional[str] = None) -> str:
    """Load a PEFT LoRA adapter directory into the model as adapter `name` (default "default", as in
    PEFT's from_pretrained and in apply_lora / save_adapter) and return the name. Wraps the target linears
    where needed, permutes the rows of B of q/k HF -> Meta, and checks every key and shape before changing
    the model. As with apply_lora, non-LoRA parameters are frozen and the first adapter of a model is
    active; a further adapter is loaded inactive (choose it with set_adapter / use_adapter)."""
    path = Path(path)
    name = "default" if name is None else name
    if not path.is_dir():
        raise FileNotFoundError(f"Adapter directory {path} does not exist.")
    for f in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
        if not (path / f).exists():
            hint = " (PyTorch adapter_model.bin is not supported)" if (path / "adapter_model.bin").exists() else ""
            raise FileNotFoundError(f"Adapter file {path / f} is missing{hint}.")
    cfg = read_json(path / ADAPTER_CONFIG)
    src = path / ADAPTER_CONFIG
    if cfg.get("peft_type") != "LORA":
        raise ValueError(f"{src} has peft_type {cfg.get('peft_type')!r}: only 'LORA' adapters can be loaded.")
    for key in ("r", "lora_alpha"):
        if key not in cfg:
            raise ValueError(f"{src} lacks the key {key!r} that a LoRA config must have.")
    for key, ok in (("use_dora", False), ("bias", "none"), ("lora_bias", False), ("fan_in_fan_out", False)):
        if cfg.get(key, ok) != ok:
            raise ValueError(f"{src}: {key}={cfg[key]!r} is not supported: expected {ok!r}.")
    for key in ("rank_pattern", "alpha_pattern"):
        if cfg.get(key):
            raise ValueError(f"{src}: {key}={cfg[key]!r} is not supported: expected it empty.")
    r, alpha = cfg["r"], cfg["lora_alpha"]
    dropout, rslora = cfg.get("lora_dropout") or 0.0, bool(cfg.get("use_rslora", False))
    _check_hparams(r, alpha, dropout)
    wfile = path / ADAPTER_WEIGHTS
    try:
        with safe_open(str(wfile), framework="pt") as sf:
            raw = {k: sf.get_tensor(k) for k in sf.keys()}
    except SafetensorError as e:
        raise ValueError(f"{wfile} is not a readable safetensors file ({e}); is it truncated or corrupt?") from None
    whole = _whole_tensors(model, raw, cfg.get("modules_to_save") or [], wfile)
    found: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    n_layers = len(model.layers)
    for key, t in raw.items():
        if key in whole:
            continue
        m = _KEY.fullmatch(key)
        meta = hf_to_meta_name(f"{m.group(1)}.weight") if m else None
        if meta is None:
            raise ValueError(f"{wfile}: key {key!r} is not a LoRA weight of a LLaMA linear layer.")
        i, target = int(m.group(2)), meta.split(".")[-2]
        if i >= n_layers:
            raise ValueError(f"{wfile}: key {key!r} is for layer {i} but the model has {n_layers} layers.")
        found.setdefault((i, target), {})[m.group(3)] = t
    if not found:
        raise ValueError(f"{wfile} holds no LoRA weights.")
    for (i, target), ab in sorted(found.items()):
        hf = meta_to_hf_name(f"layers.{i}.{_PARENT[target]}.{target}.weight").removesuffix(".weight")
        lin = getattr(getattr(model.layers[i], _PARENT[target]), target)
        inp, out = _features(lin.base if isinstance(lin, LoRALinear) else lin)
        for part, shape in (("A", (r, inp)), ("B", (out, r))):
            key = f"{_PREFIX}{hf}.lora_{part}.weight"
            if part not in ab:
                raise ValueError(f"{wfile}: key {key!r} is missing (its lora_{'B' if part == 'A' else 'A'} is there).")
            if tuple(ab[part].shape) != shape:
                raise ValueError(f"{wfile}: key {key!r} has shape {list(ab[part].shape)} but the model expects "
                                 f"{list(shape)} (r={r} from {ADAPTER_CONFIG}).")
    layers = _attach(model, sorted(found), r, alpha, dropout, rslora, name)
    with torch.no_grad():
        for (i, target), lin in layers.items():
            A, B = found[(i, target)]["A"], found[(i, target)]["B"]
            heads = _heads(model, target)
            if heads:
                B = permute_hf_to_meta(B, heads)
            lin.lora_A[name].weight.copy_(A)
            lin.lora_B[name].weight.copy_(B)
        params = dict(model.named_parameters())
        for meta, t in whole.values():
            params[meta].copy_(t)
    return name


def _whole_tensors(model: nn.Module, raw: dict, modules: list, wfile: Path) -> dict:
    """{PEFT key: (Meta name, tensor)} of the modules_to_save tensors in an adapter file (checked). They replace
    the model's own weights when loaded (PEFT keeps both copies; minillama keeps one model)."""
    params, out = dict(model.named_parameters()), {}
    for key, t in raw.items():
        hf = key.removeprefix(_PREFIX)
        meta = hf_to_meta_name(hf) if key.startswith(_PREFIX) else None
        if meta is None or hf.removesuffix(".weight").rsplit(".", 1)[-1] not in modules:
            continue
        if meta not in params or tuple(params[meta].shape) != tuple(t.shape):
            raise ValueError(f"{wfile}: key {key!r} (modules_to_save) does not match the model's {meta!r}.")
        out[key] = (meta, t)
    return out
