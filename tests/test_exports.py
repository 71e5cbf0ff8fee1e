"""Exports checked with the other tools' own code, not ours: a Meta params.json built into Meta's ModelArgs
exactly as Meta's loader builds it, and an HF export's tokenizer loaded by transformers' AutoTokenizer
and compared with sentencepiece."""

import io
import json
import warnings
from dataclasses import asdict, dataclass
from typing import Optional

import pytest
import torch

from minillama import create_model, get_preset, load_model, load_tokenizer, save_model
from minillama.course.paths import tiny_model_dir


# ---- Meta: params.json through Meta's own ModelArgs --------------------------------------------------
@dataclass
class MetaLlama2Args:
    """The fields and defaults of ModelArgs in Meta's Llama 2 code (meta-llama/llama, llama/model.py)."""
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: Optional[int] = None
    vocab_size: int = -1
    multiple_of: int = 256
    ffn_dim_multiplier: Optional[float] = None
    norm_eps: float = 1e-5
    max_batch_size: int = 32
    max_seq_len: int = 2048


@dataclass
class MetaLlama3Args(MetaLlama2Args):
    """Meta's Llama 3 ModelArgs (meta-llama/llama3, llama/model.py): Llama 2's fields and rope_theta (Meta
    lists it before max_batch_size; the order does not matter to a call by keywords)."""
    rope_theta: float = 500000


def meta_build(ckpt_dir, args_class, max_seq_len=512, max_batch_size=4):
    """What Meta's Llama.build does with params.json."""
    params = json.loads((ckpt_dir / "params.json").read_text())
    return args_class(max_seq_len=max_seq_len, max_batch_size=max_batch_size, **params)


def meta_ffn_width(a) -> int:
    """Meta's FeedForward width, from its code: 2/3 of 4*dim, times ffn_dim_multiplier, up to multiple_of."""
    hidden = int(2 * (4 * a.dim) / 3)
    if a.ffn_dim_multiplier is not None:
        hidden = int(a.ffn_dim_multiplier * hidden)
    return a.multiple_of * ((hidden + a.multiple_of - 1) // a.multiple_of)


def small(**changes):
    base = dict(dim=64, n_layers=1, n_heads=4, n_kv_heads=2, vocab_size=96, multiple_of=16, max_seq_len=48)
    return get_preset("tiny").replace(**{**base, **changes})


def export_meta(args, path, **kwargs):
    """(model, export directory, warnings raised while saving)."""
    model = create_model(args, seed=0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        d = save_model(model, path, format="meta", **kwargs)
    return model, d, [str(w.message) for w in caught]


@pytest.mark.parametrize("changes", [{}, {"n_kv_heads": 4}, {"hidden_dim": 172}, {"hidden_dim": 144},
                                     {"ffn_dim_multiplier": 1.3}], ids=["rule", "mha", "wide", "narrow", "mult"])
def test_meta_llama2_code_builds_our_export(tmp_path, changes):
    """Llama-2's loader accepts params.json (no max_seq_len, no rope_theta) and gets our shapes; an explicit
    FFN width (172 and 144 are off Meta's rule for dim 64) is expressed through multiple_of/ffn_dim_multiplier."""
    model, d, caught = export_meta(small(**changes), tmp_path / "meta", num_shards=2)
    assert caught == []
    for cls in (MetaLlama2Args, MetaLlama3Args):
        meta = meta_build(d, cls)
        ours = model.args
        assert (meta.dim, meta.n_layers, meta.n_heads, meta.n_kv_heads, meta.vocab_size, meta.norm_eps) == \
            (ours.dim, ours.n_layers, ours.n_heads, ours.n_kv_heads, ours.vocab_size, ours.norm_eps)
        assert meta_ffn_width(meta) == ours.ffn_hidden_dim
        assert meta.max_seq_len == 512  # Meta's argument, not the file's
    shard = torch.load(d / "consolidated.00.pth", weights_only=True)
    assert shard["layers.0.feed_forward.w1.weight"].shape[0] * 2 == meta_ffn_width(meta_build(d, MetaLlama2Args))
    back = load_model(d)  # our own round trip reads minillama.json: every setting comes back
    assert back.args == model.args
    for k, v in model.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k


def test_meta_rope_theta_is_written_for_llama3_with_a_warning(tmp_path):
    model, d, caught = export_meta(small(rope_theta=500000.0), tmp_path / "meta")
    assert len(caught) == 1 and "rope_theta=500000" in caught[0] and "Llama-2's refuses" in caught[0]
    with pytest.raises(TypeError, match="rope_theta"):
        meta_build(d, MetaLlama2Args)
    meta = meta_build(d, MetaLlama3Args)
    assert meta.rope_theta == 500000.0 and meta.dim == 64
    assert load_model(d).args.rope_theta == 500000.0


def test_meta_rope_scaling_stays_in_the_side_file_with_a_warning(tmp_path):
    scaling = {"type": "linear", "factor": 2.0}
    model, d, caught = export_meta(small(rope_scaling=scaling), tmp_path / "meta")
    assert len(caught) == 1 and "rope_scaling" in caught[0] and "minillama.json" in caught[0]
    assert set(json.loads((d / "params.json").read_text())) <= set(asdict(MetaLlama2Args()))
    meta_build(d, MetaLlama2Args)  # loads; Meta's code just has no scaling
    assert json.loads((d / "minillama.json").read_text())["rope_scaling"] == scaling
    assert load_model(d).args.rope_scaling == scaling


def test_meta_side_file_with_an_unknown_key(tmp_path):
    _, d, _ = export_meta(small(), tmp_path / "meta")
    (d / "minillama.json").write_text(json.dumps({"max_seq_len": 48, "dimm": 3}))
    with pytest.raises(ValueError, match=r"minillama\.json holds the unknown key 'dimm'"):
        load_model(d)


# ---- HF: the tokenizer through transformers' AutoTokenizer -------------------------------------------
TEXTS = [
    "", " ", "  ", "   ", "\n", "\t", "\n\n", " \n ", "a", "Once upon a time, there was a girl called Lily.",
    "  two leading spaces", "trailing spaces   ", "tabs\tand\nnewlines\r\n", "many     spaces   inside",
    "naïve café, Zoë, Ångström, façade", "東京 日本語 中文 한국어", "emoji 🚀🙂✨ and ☃", "mixed é東🚀 e\u0301",
    "0123456789 3.14159 -42 1,000,000 2024-01-01", "x = [i ** 2 for i in range(10)]\nprint(x)  # squares",
    "def f(a, b):\n    return {'k': a + b}\n", "<html><body class=\"x\">&amp;</body></html>",
    "<s> and </s> written as text", "\u00a0non-breaking\u200bzero-width", "ALL CAPS!!! ???", "tail ",
]


def train_spm(**settings):
    spm = pytest.importorskip("sentencepiece")
    lines = [t for t in TEXTS if t.strip()] * 20 + [f"line {i}: the cat sat on the mat {i * 7}" for i in range(200)]
    out = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=out, unk_id=0, bos_id=1, eos_id=2,
                                   pad_id=-1, minloglevel=2, num_threads=1, **settings)
    return out.getvalue()


@pytest.fixture(scope="module", params=["shipped", "whitespace_pieces"])
def tokenizer(request, tmp_path_factory):
    """The shipped tokenizer (vocab 2048), and one trained here like Llama-2's (BPE, byte fallback, digits
    split, whitespace-only pieces such as '▁▁', rare characters left to bytes)."""
    if request.param == "shipped":
        return load_tokenizer(tiny_model_dir() / "tokenizer.model")
    path = tmp_path_factory.mktemp("tok") / "tokenizer.model"
    path.write_bytes(train_spm(vocab_size=400, model_type="bpe", byte_fallback=True, split_digits=True,
                               allow_whitespace_only_pieces=True, character_coverage=0.99,
                               normalization_rule_name="identity", remove_extra_whitespaces=False))
    return load_tokenizer(path)


def export_hf(tok, path):
    args = small().replace(vocab_size=tok.vocab_size, max_seq_len=96)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a convertible tokenizer exports without a warning
        return save_model(create_model(args, seed=0), path, format="hf", tokenizer=tok)


def test_autotokenizer_encodes_and_decodes_like_sentencepiece(tokenizer, tmp_path):
    transformers = pytest.importorskip("transformers")
    d = export_hf(tokenizer, tmp_path / "hf")
    hf = transformers.AutoTokenizer.from_pretrained(d)
    assert hf.model_max_length == 96 and hf.bos_token_id == tokenizer.bos_id and hf.eos_token_id == tokenizer.eos_id
    for text in TEXTS:
        ids = tokenizer.encode(text, bos=True)
        assert hf(text)["input_ids"] == ids, repr(text)
        assert hf.decode(ids, skip_special_tokens=True) == tokenizer.decode(ids), repr(text)


def test_tokenizer_json_alone_encodes_like_sentencepiece(tokenizer, tmp_path):
    """tokenizer.json run by `tokenizers` itself: the pipeline transformers 4.x's fast tokenizer runs."""
    tokenizers = pytest.importorskip("tokenizers")
    d = export_hf(tokenizer, tmp_path / "hf")
    raw = tokenizers.Tokenizer.from_file(str(d / "tokenizer.json"))
    raw.encode_special_tokens = True  # tokenizer_config.json's split_special_tokens
    for text in TEXTS:
        ids = tokenizer.encode(text, bos=True)
        assert raw.encode(text).ids == ids, repr(text)
        assert raw.decode(ids) == tokenizer.decode(ids), repr(text)


def test_unconvertible_tokenizer_is_saved_with_a_warning(tmp_path):
    proto = train_spm(vocab_size=120, model_type="unigram")  # unigram with NFKC normalisation: not Llama-2's
    (tmp_path / "tokenizer.model").write_bytes(proto)
    tok = load_tokenizer(tmp_path / "tokenizer.model")
    model = create_model(small().replace(vocab_size=tok.vocab_size), seed=0)
    with pytest.warns(UserWarning, match=r"tokenizer\.json was not written .*not a BPE model.*'nmt_nfkc'"):
        d = save_model(model, tmp_path / "hf", format="hf", tokenizer=tok)
    assert not (d / "tokenizer.json").exists()
    assert (d / "tokenizer.model").read_bytes() == proto
    config = json.loads((d / "tokenizer_config.json").read_text())
    assert config["add_bos_token"] is True and config["bos_token"] == "<s>"
    assert config["tokenizer_class"] == "LlamaTokenizer"  # left to convert tokenizer.model itself
