"""Shared fixtures: small random HF LLaMA models (the reference) and a small sentencepiece tokenizer."""

import atexit
import io
import os
import random
import shutil
import tempfile
from pathlib import Path

import pytest
import torch

# Random configs: plain multi-head attention, grouped-query attention, and an FFN width that breaks
# Meta's rounding rule (HF's intermediate_size is free).
HF_CONFIGS = {
    "mha": dict(hidden_size=64, intermediate_size=172, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=4, vocab_size=256, rms_norm_eps=1e-5, max_position_embeddings=128),
    "gqa": dict(hidden_size=96, intermediate_size=256, num_hidden_layers=3, num_attention_heads=6,
                num_key_value_heads=2, vocab_size=300, rms_norm_eps=1e-6, rope_theta=500000.0,
                max_position_embeddings=96),
}


def make_hf_model(name, seed=0, **overrides):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(**{**HF_CONFIGS[name], **overrides})
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(cfg).eval()
    # HF initialises norms to one; randomise them so that a wrongly mapped norm cannot go unnoticed
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "norm" in n:
                p.uniform_(0.5, 1.5)
    return model


@pytest.fixture(params=sorted(HF_CONFIGS))
def hf_model(request):
    return make_hf_model(request.param)


@pytest.fixture
def hf_dir(hf_model, tmp_path):
    d = tmp_path / "hf"
    hf_model.save_pretrained(d)
    return d


def _sentences(n, seed=0):
    rng = random.Random(seed)
    names = ["Lily", "Tom", "Max", "Anna", "Ben", "Zoe"]
    things = ["a red ball", "the blue door", "her cat", "a big tree", "the old boat", "37 apples"]
    verbs = ["saw", "found", "liked", "painted", "carried", "lost"]
    return [f"{rng.choice(names)} {rng.choice(verbs)} {rng.choice(things)} near the river." for _ in range(n)]


@pytest.fixture(scope="session")
def spm_path(tmp_path_factory):
    """A Llama-like sentencepiece model: BPE, byte fallback, BOS=1, EOS=2, no pad."""
    spm = pytest.importorskip("sentencepiece")
    out = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_sentences(2000)), model_writer=out, vocab_size=300, model_type="bpe",
        byte_fallback=True, split_digits=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        character_coverage=1.0, normalization_rule_name="identity", remove_extra_whitespaces=False,
        minloglevel=2)
    path = tmp_path_factory.mktemp("tok") / "tokenizer.model"
    path.write_bytes(out.getvalue())
    return path


@pytest.fixture
def killed_at_batch(monkeypatch):
    """kill(n): the training loop's batch stream raises KeyboardInterrupt while fetching batch n (0-based), as if
    the process were killed there; restore() puts the real stream back for the resumed run."""
    import importlib

    T = importlib.import_module("minillama.training.train")  # the loop's module (the package's `train` is the function)
    real = T.batches

    def kill(n):
        def dies(*args, **kwargs):
            for i, b in enumerate(real(*args, **kwargs)):
                if i == n:
                    raise KeyboardInterrupt
                yield b

        monkeypatch.setattr(T, "batches", dies)

    kill.restore = lambda: monkeypatch.setattr(T, "batches", real)
    return kill


# ---- bitsandbytes' two CPU paths for a 4-bit matmul ----------------------------------------------------
# Read from bitsandbytes 0.50.2 (nn/modules.py, backends/cpu/ops.py, functional.py): on a CPU with AVX512-BF16
# (Intel Sapphire Rapids and later, AMD Zen 4 and later) its Linear4bit, in eval mode and without gradients,
# repacks its weight and runs a fused kernel that casts the input and the block constants (absmax) to bf16 and
# returns a bf16 result ("cpu fused op only support bf16 for now"). Elsewhere (other CPUs, training mode, or
# with gradients) it dequantises W and multiplies in the compute dtype (fp32 here). Each layer reads
# `bitsandbytes.nn.modules.has_avx512bf16()` once, when it is built.

def bnb_cpu_has_bf16_kernel() -> bool:
    """Whether bitsandbytes takes its fused bf16 path on this CPU (its own check of the CPU's flags)."""
    import bitsandbytes.functional as bnbf

    return bool(bnbf.has_avx512bf16())


@pytest.fixture(params=["fp32", "bf16"])
def bnb_cpu_path(request, monkeypatch):
    """The path bitsandbytes' CPU Linear4bit takes in eval mode without gradients, for layers built inside the
    test: "fp32" is forced (the path of CPUs without AVX512-BF16, so that a machine with it covers both);
    "bf16" runs where the CPU has the instructions and is skipped elsewhere (the kernel cannot run there)."""
    pytest.importorskip("bitsandbytes")
    import bitsandbytes.nn.modules as bnb_modules

    if request.param == "fp32":
        monkeypatch.setattr(bnb_modules, "has_avx512bf16", lambda: False)
    elif not bnb_cpu_has_bf16_kernel():
        pytest.skip("this CPU has no AVX512-BF16, so bitsandbytes' fused bf16 4-bit kernel cannot run here")
    return request.param


def bnb_packed_for_bf16_kernel(layer) -> bool:
    """Whether a bitsandbytes Linear4bit has run the fused bf16 kernel (its weight is repacked for it)."""
    return bool(getattr(layer.weight.quant_state, "packing_format_for_cpu", False))


def bnb_cpu_bf16_forward(layer, x):
    """What bitsandbytes' fused bf16 CPU kernel computes for a minillama Linear4bit `layer` holding the same codes
    (use it as Linear4bit.forward): x, the 16 levels and every block's absmax rounded to bf16, their exact
    products summed (in fp64 here), the sum rounded to bf16 and returned in x's dtype, plus the bias. Measured
    on an AMD EPYC with AVX512-BF16: identical to bitsandbytes for NF4; for FP4 a few outputs within 1e-7 of 0
    differ (its table holds 0.0052 for the level 1/192)."""
    from minillama.quant import dequantize_4bit

    st = layer.quant_state
    bf16 = lambda t: t.to(torch.bfloat16).double()  # noqa: E731
    st_bf16 = type(st)(absmax=bf16(st.float_absmax()), shape=st.shape, dtype=torch.float64,
                       blocksize=st.blocksize, quant_type=st.quant_type, code=bf16(st.code))
    y = (bf16(x) @ dequantize_4bit(layer.weight, st_bf16).t()).to(torch.bfloat16).to(x.dtype)
    return y if layer.bias is None else y + layer.bias.to(x.dtype)


def assert_bf16_kernel_result(y, ref, max_differing=1e-3):
    """bitsandbytes' bf16 result `y` against bnb_cpu_bf16_forward's `ref`: every value within one bf16 step
    (at most 2^-7 of it, or 1e-7 next to 0), and equal but for a few sums (at most `max_differing` of them)
    that its fp32 summation order rounds the other way. Returns how many differ (an fp32 result: nearly all)."""
    assert ((y - ref).abs() <= ref.abs() * 2**-7 + 1e-7).all()
    differ = int((y != ref).sum())
    assert differ <= max_differing * y.numel(), f"{differ} of {y.numel()} values differ"
    return differ


# ---- the notebooks this run executes (nbmake; tests/test_browser.py's JupyterLab) --------------------------
# 1. Every kernel started from this test run loads notebooks/kernel_wakeup.py as an IPython startup file, through
#    a private IPYTHONDIR (the user's own IPython settings are untouched): it takes a request that zmq failed to
#    announce off the shell socket within 0.5 s, where the kernel would otherwise wait forever (see that file).
# 2. A notebook that fails is run once more (pytest-rerunfailures), so that a kernel that stalls for a reason
#    not covered by 1 costs one rerun, not the run; a notebook that fails twice fails the run.
# (Here and not in a notebooks/conftest.py: a second module named conftest would shadow this one for the tests'
# `from conftest import ...`.)
_ipython_dir = Path(tempfile.mkdtemp(prefix="minillama-ipython-"))
atexit.register(shutil.rmtree, _ipython_dir, ignore_errors=True)
(_ipython_dir / "profile_default" / "startup").mkdir(parents=True)
shutil.copy(Path(__file__).resolve().parents[1] / "notebooks" / "kernel_wakeup.py",
            _ipython_dir / "profile_default" / "startup" / "00_wakeup.py")
os.environ["IPYTHONDIR"] = str(_ipython_dir)


def pytest_collection_modifyitems(items):
    for item in items:
        if item.path.suffix == ".ipynb":
            item.add_marker(pytest.mark.flaky(reruns=1))
