"""Every bad input is one clear error (issue 11). One row per bad input; later issues append rows.

A row is (id, what to run, expected, fragment):
- what to run: a `minillama ...` command line, run in-process with `minillama.cli.main.main`, whose `{name}`s
  are the inputs that INPUTS builds in the row's tmp_path; or a function of those inputs (a Python call);
- expected: the exit code of the command (2: one line on stderr), or the exception type of the call;
- fragment: a piece of the message that names the file, key, flag or value at fault (`{name}`s filled in).
Rows run as on a machine without CUDA, and a refused command must leave no `--out` folder behind.
"""

import errno
import json
import math
import os
import pathlib
import shlex
import string

import pytest
import torch
from safetensors.torch import load_file, save_file

from minillama import ModelArgs, create_model, generate, load_model, load_tokenizer, save_model
from minillama.cli.main import main
from minillama.training import TrainConfig

ARGS = ModelArgs(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=300, multiple_of=16, max_seq_len=64)
TEXTS = ["Lily saw a red ball near the river.", "Tom found the blue door near the river."] * 10


def _model(d, spm_path, fmt="native", **kw):
    save_model(create_model(ARGS, seed=0), d, fmt, tokenizer=load_tokenizer(spm_path), **kw)
    return d


def _edit_json(path, **changes):
    cfg = json.loads(path.read_text())
    path.write_text(json.dumps({**cfg, **changes}))


def _edit_weights(d, change):
    f = d / "model.safetensors"
    save_file({k: change(k, t) for k, t in load_file(f).items()}, f)
    return d


def _nan_in(name, value):
    return lambda k, t: torch.full_like(t, value) if k == name else t


def _with_config(**changes):
    def make(d, spm_path):
        _edit_json(_model(d, spm_path) / "config.json", **changes)
        return d
    return make


def _hf_index_not_an_object(d, spm_path):
    _model(d, spm_path, "hf", max_shard_bytes=20_000)
    _edit_json(d / "model.safetensors.index.json", weight_map=["model-00001-of-00002.safetensors"])
    return d


def _meta_holding(content):
    def make(d, spm_path):
        _model(d, spm_path, "meta")
        torch.save(content, d / "consolidated.00.pth")
        return d
    return make


def _hf_heads_zero(d, spm_path):
    _edit_json(_model(d, spm_path, "hf") / "config.json", num_attention_heads=0)
    return d


def _hf_rope_longrope(d, spm_path):
    _edit_json(_model(d, spm_path, "hf") / "config.json", rope_scaling={"rope_type": "longrope", "factor": 4.0})
    return d


def _text_data(d, spm_path):
    d = d.with_suffix(".jsonl")
    d.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    return d


def _latin1_data(d, spm_path):
    d = d.with_suffix(".jsonl")
    d.write_bytes('{"text": "Un caf\u00e9 pr\u00e8s de la rivi\u00e8re."}\n'.encode("latin-1"))
    return d


# Inputs a row names as {name}: built on first use, in the row's tmp_path.
INPUTS = {
    "model": _model,
    "data": _text_data,
    "latin1": _latin1_data,
    "out": lambda d, spm_path: d,  # not created: the command creates it (or must not leave it behind)
    "dim_float": _with_config(dim=32.0),
    "dim_string": _with_config(dim="32"),
    "dim_null": _with_config(dim=None),
    "layers_1e6": _with_config(n_layers=1_000_000),
    "int32": lambda d, spm: _edit_weights(_model(d, spm), lambda k, t: torch.randint(-5, 5, t.shape, dtype=torch.int32)),
    "all_nan": lambda d, spm: _edit_weights(_model(d, spm), _nan_in("layers.1.feed_forward.w2.weight", math.nan)),
    "all_inf": lambda d, spm: _edit_weights(_model(d, spm), _nan_in("norm.weight", math.inf)),
    "hf_heads_zero": _hf_heads_zero,
    "hf_rope_longrope": _hf_rope_longrope,
    "llama3_no_original": _with_config(rope_scaling={"rope_type": "llama3", "factor": 8.0}),
    "linear_x2": _with_config(rope_scaling={"rope_type": "linear", "factor": 2.0}),
    "linear2": _with_config(rope_scaling={"rope_type": "linear", "factor": 2.0}),
    "hf_index_list": _hf_index_not_an_object,
    "meta_bare_tensor": _meta_holding(torch.zeros(3, 4)),
    "meta_non_tensor": _meta_holding({"tok_embeddings.weight": [[0.0] * 32] * 300, "step": "ten"}),
}


class Inputs(dict):
    """{name: path} that builds an input the first time a row asks for it."""

    def __init__(self, tmp_path, spm_path, monkeypatch):
        super().__init__()
        self.tmp_path, self.spm_path, self.monkeypatch = tmp_path, spm_path, monkeypatch

    def __missing__(self, name):
        self[name] = str(INPUTS[name](self.tmp_path / name, self.spm_path))
        return self[name]

    def fill(self, text: str) -> str:
        return text.format_map(self)


def on_full_disk(command):
    """Run `command` where files can be created but no byte can be written (a full disk)."""
    def run(inputs):
        argv = [inputs.fill(a) for a in shlex.split(command)]  # inputs are written before the disk fills up
        real = pathlib.Path.write_bytes

        def write_bytes(self, data):
            real(self, b"")
            if data:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        inputs.monkeypatch.setattr(pathlib.Path, "write_bytes", write_bytes)
        return main(argv)
    return run


BAD_UTF8 = b"Un caf\xe9".decode("utf-8", "surrogateescape")  # what sys.argv holds for a Latin-1 prompt
TRAIN = "train --model {model} --data {data} --out {out} --quiet "
GEN = "generate --model {model} --prompt x --max-new-tokens 2 "

ROWS = [
    # checkpoints
    ("config-dim-float", "generate --model {dim_float} --prompt x", 2, "{dim_float}/config.json: ModelArgs.dim=32.0"),
    ("config-dim-string", "generate --model {dim_string} --prompt x", 2, "ModelArgs.dim='32' is invalid"),
    ("config-dim-null", "generate --model {dim_null} --prompt x", 2, "ModelArgs.dim=None is invalid"),
    ("config-n-layers-1e6", "generate --model {layers_1e6} --prompt x", 2, "n_layers=1000000"),
    ("weights-int32", "generate --model {int32} --prompt x", 2, "is torch.int32: expected floating-point"),
    ("weights-all-nan", "generate --model {all_nan} --prompt x", 2,
     "weight 'layers.1.feed_forward.w2.weight' holds NaN or inf"),
    ("weights-inf", "generate --model {all_inf} --prompt x", 2, "weight 'norm.weight' holds NaN or inf"),
    ("hf-num-attention-heads-0", "generate --model {hf_heads_zero} --prompt x", 2, "num_attention_heads=0"),
    ("hf-index-weight-map-list", "generate --model {hf_index_list} --prompt x", 2,
     "model.safetensors.index.json: 'weight_map' must be an object"),
    ("meta-pth-bare-tensor", "generate --model {meta_bare_tensor} --prompt x", 2,
     "consolidated.00.pth holds a Tensor"),
    ("meta-pth-non-tensor", "generate --model {meta_non_tensor} --prompt x", 2, "'tok_embeddings.weight' is a list"),
    ("load-model-none", lambda p: load_model(None), ValueError, "load_model(None)"),
    # rope scaling
    ("rope-type-unknown", lambda p: load_model(p["model"], rope_scaling={"rope_type": "longrope", "factor": 4.0}),
     ValueError, "type 'longrope' is unknown: expected one of ('linear', 'ntk', 'dynamic', 'yarn', 'llama3')"),
    ("hf-rope-type-unknown", "generate --model {hf_rope_longrope} --prompt x", 2,
     "is invalid: rope_scaling type 'longrope' is unknown: expected one of ('linear', 'ntk', 'dynamic', 'yarn', "),
    ("rope-factor-below-1", lambda p: load_model(p["model"], rope_scaling={"type": "linear", "factor": 0.5}),
     ValueError, "rope_scaling factor 0.5 is invalid for 'linear': expected a number >= 1"),
    ("rope-factor-string", lambda p: load_model(p["model"], rope_scaling={"rope_type": "ntk", "factor": "4"}),
     ValueError, "rope_scaling factor '4' is invalid for 'ntk'"),
    ("rope-yarn-without-original", lambda p: load_model(p["model"], rope_scaling={"rope_type": "yarn", "factor": 4.0}),
     ValueError, "'yarn' needs original_max_position_embeddings"),
    ("rope-llama3-without-original", "generate --model {llama3_no_original} --prompt x", 2,
     "rope_scaling 'llama3' needs original_max_position_embeddings"),
    # generate
    ("prompt-invalid-utf8", "generate --model {model} --prompt " + shlex.quote(BAD_UTF8), 2, "--prompt"),
    ("generate-system-without-chat", GEN + "--system hi", 2, "--system is a chat's system message: give it with --chat"),
    ("device-tpu9", GEN + "--device tpu9", 2, "--device 'tpu9'"),
    ("device-cuda-without-cuda", GEN + "--device cuda", 2, "--device 'cuda' needs CUDA"),
    ("temperature-nan", GEN + "--temperature nan", 2, "temperature=nan"),
    ("generate-float-ids", lambda p: generate(load_model(p["model"]), [1.0, 5.0], 2), ValueError, "token ids"),
    ("generate-none", lambda p: generate(load_model(p["model"]), None, 2), ValueError, "tokens=None"),
    ("generate-top-p-none", lambda p: generate(load_model(p["model"]), [1, 5], 2, top_p=None), ValueError, "top_p=None"),
    # train
    ("train-batch-size-0", TRAIN + "--epochs 1 --batch-size 0", 2, "--batch-size 0 is invalid"),
    ("train-epochs-0", TRAIN + "--epochs 0", 2, "--epochs 0.0 is invalid"),
    ("train-epochs-nan", TRAIN + "--epochs nan", 2, "--epochs nan is invalid"),
    ("train-grad-clip-negative", TRAIN + "--steps 1 --grad-clip -1", 2, "--grad-clip -1.0 is invalid"),
    ("train-weight-decay-negative", TRAIN + "--steps 1 --weight-decay -0.1", 2, "--weight-decay -0.1 is invalid"),
    ("train-warmup-negative", TRAIN + "--steps 1 --warmup-steps -1", 2, "--warmup-steps -1 is invalid"),
    ("train-min-lr-ratio-above-1", TRAIN + "--steps 1 --min-lr-ratio 1.5", 2, "--min-lr-ratio 1.5 is invalid"),
    ("train-max-len-0", TRAIN + "--steps 1 --max-len 0", 2, "--max-len 0 is invalid"),
    ("train-eval-every-0", TRAIN + "--steps 1 --eval-every 0", 2, "--eval-every 0 is invalid"),
    ("train-data-not-utf8", "train --model {model} --data {latin1} --out {out} --steps 1", 2, "{latin1} is not UTF-8"),
    ("train-disk-full", on_full_disk(TRAIN + "--steps 1"), 2,
     "Cannot write to the output directory {out}: No space left on device"),
    ("train-4bit-without-lora", TRAIN + "--steps 1 --load-in-4bit", 2, "--load-in-4bit needs --lora-r R"),
    ("train-4bit-fp16-full-fine-tuning", TRAIN + "--steps 1 --load-in-4bit --dtype fp16", 2,
     "full fine-tuning of a quantised model is refused"),
    ("train-quant-blocksize-48", TRAIN + "--steps 1 --lora-r 2 --load-in-4bit --quant-blocksize 48", 2,
     "--quant-blocksize 48 is invalid: expected a power of two from 32 to 4096"),
    ("trainconfig-4bit-without-lora", lambda p: TrainConfig(load_in_4bit=True), ValueError,
     "TrainConfig.load_in_4bit=True needs lora_r > 0"),
    ("trainconfig-quant-type-int4", lambda p: TrainConfig(quant_type="int4", lora_r=2), ValueError,
     "TrainConfig.quant_type='int4' is invalid"),
    ("trainconfig-grad-clip-negative", lambda p: TrainConfig(grad_clip=-1.0), ValueError, "TrainConfig.grad_clip=-1.0"),
    ("trainconfig-min-lr-ratio", lambda p: TrainConfig(min_lr_ratio=2.0), ValueError, "TrainConfig.min_lr_ratio=2.0"),
    # long-context training (issue 14)
    ("train-rope-type-unknown", TRAIN + "--steps 1 --lora-r 2 --rope-scaling cubic:4", 2,
     "--rope-scaling 'cubic:4': unknown type 'cubic': expected TYPE:FACTOR with TYPE one of ('linear', "),
    ("train-rope-factor-missing", TRAIN + "--steps 1 --lora-r 2 --rope-scaling linear", 2,
     "--rope-scaling 'linear': the factor '' is not a number"),
    ("train-rope-factor-below-1", TRAIN + "--steps 1 --lora-r 2 --rope-scaling yarn:0.5", 2,
     "--rope-scaling 'yarn:0.5': the factor must be above 1"),
    ("train-rope-factor-1", TRAIN + "--steps 1 --lora-r 2 --rope-scaling linear:1", 2, "the factor must be above 1"),
    ("train-rope-none-without-length", TRAIN + "--steps 1 --lora-r 2 --rope-scaling none", 2,
     "--rope-scaling none needs --max-seq-len N"),
    ("train-rope-contradicts-checkpoint", "train --model {linear_x2} --data {data} --out {out} --steps 1 --lora-r 2 "
     "--rope-scaling yarn:4", 2, "contradicts the checkpoint {linear_x2}, whose config already has rope_scaling"),
    ("train-max-seq-len-shorter", TRAIN + "--steps 1 --lora-r 2 --rope-scaling linear:2 --max-seq-len 32", 2,
     "--max-seq-len 32 is shorter than the checkpoint's own context (64)"),
    ("train-max-seq-len-0", TRAIN + "--steps 1 --max-seq-len 0", 2, "--max-seq-len 0 is invalid"),
    ("train-max-seq-len-beyond-memory", TRAIN + "--steps 1 --lora-r 2 --rope-scaling linear:4 --max-seq-len 4000000 "
     "--batch-size 64", 2, "one training step needs about"),
    ("train-embeddings-without-lora", TRAIN + "--steps 1 --train-embeddings", 2,
     "--train-embeddings / --train-norms need --lora-r R"),
    ("trainconfig-rope-scaling-bad", lambda p: TrainConfig(rope_scaling={"rope_type": "linear", "factor": 0.5}),
     ValueError, "TrainConfig.rope_scaling={{'rope_type': 'linear', 'factor': 0.5}} is invalid"),
    ("trainconfig-norms-without-lora", lambda p: TrainConfig(train_norms=True), ValueError,
     "TrainConfig.train_embeddings / train_norms need lora_r > 0"),
    ("longctx-unknown-variant", "longctx --out {out} --variants base,cubic+lora", 2, "Variant 'cubic+lora' is unknown"),
    ("longctx-steps-0", "longctx --out {out} --steps 0", 2, "--steps 0 is invalid: expected a positive integer"),
    # eval
    ("eval-scored-tokens-0", "eval ppl --model {model} --data {data} --context 8 --scored-tokens 0", 2,
     "--scored-tokens 0 is invalid"),
    ("eval-max-docs-negative", "eval ppl --model {model} --data {data} --context 8 --max-docs -1", 2,
     "--max-docs -1 is invalid"),
    ("eval-passkey-context-10M", "eval passkey --model {model} --context 10000000", 2, "passkey at context 10000000"),
    # long-context evaluation (issue 14)
    ("eval-variant-type-unknown", "eval ppl --model {model} --data {data} --context 8 --variants base,longrope:4", 2,
     "variant 'longrope:4': unknown type 'longrope': expected TYPE:FACTOR with TYPE one of "
     "('linear', 'ntk', 'dynamic', 'yarn', 'llama3') (e.g. linear:4), or none (also written base)"),
    ("eval-variant-factor-below-1", "eval ppl --model {model} --data {data} --context 8 --variants linear:0.5", 2,
     "variant 'linear:0.5': the factor must be above 1"),
    ("eval-variant-factor-not-a-number", "eval ppl --model {model} --data {data} --context 8 --variants yarn:x", 2,
     "variant 'yarn:x': the factor 'x' is not a number"),
    ("eval-max-seq-len-beyond-memory", "eval ppl --model {model} --data {data} --context 8 --max-seq-len 1000000000 "
     "--out {out}", 2, "--max-seq-len 1000000000: a forward pass of batch 1 x 1000000000 tokens needs about"),
    ("eval-max-seq-len-below-context", "eval ppl --model {model} --data {data} --context 32 --max-seq-len 16", 2,
     "--max-seq-len 16 is shorter than the longest --context 32"),
    ("eval-variant-contradicts-checkpoint", "eval ppl --model {linear2} --data {data} --context 8 --variants yarn:4", 2,
     "its config already has rope_scaling {{'rope_type': 'linear', 'factor': 2.0}}, which contradicts the requested"),
    ("eval-depths-above-1", "eval passkey --model {model} --context 64 --depths 0,1.5", 2,
     "--depths '0,1.5' is invalid: expected comma-separated numbers in [0, 1]"),
]


@pytest.mark.parametrize("what,expected,fragment", [r[1:] for r in ROWS], ids=[r[0] for r in ROWS])
def test_bad_input_is_one_clear_error(what, expected, fragment, tmp_path, spm_path, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    inputs = Inputs(tmp_path, spm_path, monkeypatch)
    try:
        got = main([inputs.fill(a) for a in shlex.split(what)]) if isinstance(what, str) else what(inputs)
        message = capsys.readouterr().err.strip()
    except Exception as e:  # a traceback, for a command
        got, message = type(e), f"{type(e).__name__}: {e}"
    if isinstance(expected, int):
        assert (got, message.count("\n")) == (expected, 0), message
    else:
        assert isinstance(got, type) and issubclass(got, expected), message
    assert inputs.fill(fragment) in message
    assert not (tmp_path / "out").exists(), "a refused command left its --out folder behind"
