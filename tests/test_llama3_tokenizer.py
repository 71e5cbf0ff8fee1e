"""Llama-3's tokenizer (issue 27): `load_tokenizer` reads Meta's tiktoken tokenizer.model and HF's tokenizer.json
and encodes exactly as Meta's llama3 Tokenizer (reproduced in tests/_llama3.py on tiktoken) and as transformers
on tokenizer.json; the chat format equals Meta's ChatFormat.encode_dialog_prompt; HF and Meta exports read back.
The tokenizer is a small byte-level BPE trained here (_llama3.py); a genuine Llama-3 tokenizer is checked too
when one is on this machine ($LLAMA3_TOKENIZER: a tokenizer.model or tokenizer.json; never downloaded)."""

import os
from pathlib import Path

import pytest

from _llama3 import STRINGS, MetaTokenizer, build_llama3_tokenizer
from minillama.checkpoints.hf_tokenizer import write_hf_tokenizer
from minillama.tokenizer import BPETokenizer, load_tokenizer

pytest.importorskip("tiktoken")
pytest.importorskip("tokenizers")

DIALOGS = [
    [{"role": "user", "content": "Hello!"}],
    [{"role": "system", "content": "  Be brief.\n"}, {"role": "user", "content": " Count to 1234 "},
     {"role": "assistant", "content": "1 2 3 ... 1234"}, {"role": "user", "content": "def f(x):\n    return x"}],
    [{"role": "user", "content": ""}, {"role": "assistant", "content": "naïve 😀 <|eot_id|>"}],
]


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("llama3_tok")
    build_llama3_tokenizer(d)
    return d


@pytest.fixture(scope="module")
def meta(tok_dir):
    return MetaTokenizer(tok_dir / "tokenizer.model")


def test_both_files_are_detected_and_encode_like_meta_and_transformers(tok_dir, meta):
    transformers = pytest.importorskip("transformers")
    hf = transformers.PreTrainedTokenizerFast(tokenizer_file=str(tok_dir / "tokenizer.json"), split_special_tokens=True)
    tiktok, tokjson = load_tokenizer(tok_dir / "tokenizer.model"), load_tokenizer(tok_dir / "tokenizer.json")
    assert isinstance(tiktok, BPETokenizer) and isinstance(tokjson, BPETokenizer)
    for tok in (tiktok, tokjson):
        assert (tok.bos_id, tok.eos_id, tok.vocab_size) == (meta.bos_id, meta.eos_id, meta.model.n_vocab)
        assert tok.special_tokens == meta.special_tokens
        assert tok.stop_ids == [meta.eos_id, meta.special_tokens["<|eot_id|>"]]
    for s in STRINGS:
        ids = meta.encode(s, bos=True, eos=True)
        assert tiktok.encode(s, bos=True, eos=True) == ids, s  # Meta's Tokenizer on Meta's file
        assert hf.encode(s, add_special_tokens=False) == ids[1:-1], s  # transformers on tokenizer.json ...
        assert tokjson.encode(s, bos=True, eos=True) == ids, s  # ... which agrees with Meta on all of these
        assert tiktok.decode(ids[1:-1]) == tokjson.decode(ids[1:-1]) == s
    assert meta.special_tokens["<|eot_id|>"] not in tiktok.encode("<|eot_id|>")  # a special spelling is text


def test_where_meta_and_tokenizers_differ_its_slicing_of_long_runs(tok_dir, meta):
    """Meta's encode cuts a run of more than 25,000 non-whitespace (or whitespace) characters before tiktoken
    sees it (openai/tiktoken#195); the tokenizers library does not cut, so the ids differ at the cut."""
    text = "123" * 9000  # 27,000 digits: Meta cuts after 25,000, which is not a multiple of 3
    tiktok, tokjson = load_tokenizer(tok_dir / "tokenizer.model"), load_tokenizer(tok_dir / "tokenizer.json")
    hf_ids = meta.encode(text, bos=False, eos=False)  # tiktoken on the whole run, as tokenizers does
    assert tokjson.encode(text, bos=False) == hf_ids
    meta_ids = [t for part in (text[:25000], text[25000:]) for t in meta.encode(part, bos=False, eos=False)]
    assert tiktok.encode(text, bos=False) == meta_ids != hf_ids
    assert tiktok.decode(meta_ids) == text


def test_chat_format_is_metas_encode_dialog_prompt(tok_dir, meta):
    for file in ("tokenizer.model", "tokenizer.json"):
        tok = load_tokenizer(tok_dir / file)
        for dialog in DIALOGS:
            assert tok.encode_chat(dialog) == meta.encode_dialog_prompt(dialog)
    with pytest.raises(ValueError, match="Dialog message 0 .* expected"):
        tok.encode_chat([{"role": "robot", "content": "hi"}])


@pytest.mark.parametrize("source", ["tokenizer.model", "tokenizer.json"])
def test_hf_export_reads_back_in_autotokenizer_with_the_same_ids_and_chat_template(tok_dir, meta, tmp_path, source):
    transformers = pytest.importorskip("transformers")
    tok = load_tokenizer(tok_dir / source)
    write_hf_tokenizer(tok, tmp_path, model_max_length=512)
    meta_like = transformers.AutoTokenizer.from_pretrained(tmp_path, split_special_tokens=True)
    default = transformers.AutoTokenizer.from_pretrained(tmp_path)  # as HF's Llama-3 files: special spellings special
    for s in STRINGS:
        ids = meta.encode(s, bos=True, eos=False)
        assert meta_like(s)["input_ids"] == ids, s
        if "<|" not in s:
            assert default(s)["input_ids"] == ids, s
        assert default.decode(ids[1:]) == s
    for dialog in DIALOGS[:2]:
        assert default.apply_chat_template(dialog, add_generation_prompt=True, return_dict=False) == \
            meta.encode_dialog_prompt(dialog)
    assert load_tokenizer(tmp_path).encode_chat(DIALOGS[1]) == meta.encode_dialog_prompt(DIALOGS[1])


def test_meta_export_writes_the_tiktoken_file(tok_dir, tmp_path):
    tok = load_tokenizer(tok_dir / "tokenizer.json")
    tok.save(tmp_path / "tokenizer.model")
    assert (tmp_path / "tokenizer.model").read_bytes() == (tok_dir / "tokenizer.model").read_bytes()
    again = load_tokenizer(tmp_path)
    assert all(again.encode(s) == tok.encode(s) for s in STRINGS)


def test_bad_files_and_a_missing_package_get_one_clear_sentence(tok_dir, tmp_path, monkeypatch):
    bad = tmp_path / "tokenizer.model"
    bad.write_text("IQ== 0\nIg== x\n")
    with pytest.raises(ValueError, match=r"line 2: .* is not 'base64-token rank'"):
        load_tokenizer(bad)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="holds no tokenizer"):
        load_tokenizer(tmp_path / "empty")
    n = load_tokenizer(tok_dir / "tokenizer.model").vocab_size
    with pytest.raises(ValueError, match=f"has {n} tokens but the model's vocab_size is {n + 1}"):
        load_tokenizer(tok_dir / "tokenizer.model", vocab_size=n + 1)
    monkeypatch.setitem(__import__("sys").modules, "tiktoken", None)  # as if it were not installed
    with pytest.raises(ImportError, match="needs the package 'tiktoken': pip install tiktoken"):
        load_tokenizer(tok_dir / "tokenizer.model")


GENUINE = os.environ.get("LLAMA3_TOKENIZER")


@pytest.mark.skipif(not GENUINE, reason="no genuine Llama-3 tokenizer here: set LLAMA3_TOKENIZER to a local "
                                        "tokenizer.model (Meta) or tokenizer.json (HF); nothing is downloaded")
def test_a_genuine_llama3_tokenizer():
    tok = load_tokenizer(GENUINE)
    assert (tok.vocab_size, tok.bos_id, tok.eos_id, tok.special_tokens["<|eot_id|>"]) == (128256, 128000, 128001, 128009)
    if Path(GENUINE).name == "tokenizer.model" or Path(GENUINE, "tokenizer.model").exists():
        meta = MetaTokenizer(Path(GENUINE) if Path(GENUINE).is_file() else Path(GENUINE, "tokenizer.model"))
        for s in STRINGS:
            assert tok.encode(s, eos=True) == meta.encode(s, bos=True, eos=True), s
    for s in STRINGS:
        assert tok.decode(tok.encode(s, bos=False)) == s
    assert tok.encode("1234567", bos=False) == tok.encode("123", bos=False) + tok.encode("456", bos=False) + \
        tok.encode("7", bos=False)  # digits in threes


def test_llama2_tokenizer_has_the_same_interface(spm_path):
    tok = load_tokenizer(spm_path)
    assert tok.chat_format == "llama2" and tok.stop_ids == [tok.eos_id]
    assert tok.special_tokens == {"<s>": tok.bos_id, "</s>": tok.eos_id}


@pytest.mark.parametrize("preset, params", [("llama3.2-1b", 1_235_814_400), ("llama3.2-3b", 3_212_749_824),
                                            ("llama3.1-8b", 8_030_261_248)])
def test_llama3_presets_have_the_published_parameter_counts(preset, params):
    """Meta's model cards: 1.24B and 3.21B (the 3.2 models tie the head to the embedding), 8.03B."""
    from minillama import get_preset

    args = get_preset(preset)
    tied = preset.startswith("llama3.2")
    assert args.num_params() - (args.vocab_size * args.dim if tied else 0) == params
    assert (args.vocab_size, args.rope_theta, args.rope_scaling["rope_type"]) == (128256, 500000.0, "llama3")


def test_the_readme_table_of_llama3_fits_is_the_planners():
    """The README's table (what fits on 16/24/40/80 GiB) recomputed with minillama plan's memory model."""
    import re

    from minillama import get_preset
    from minillama.measuring.plan import plan

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    rows = re.findall(r"\| `(llama3[.\d]+-\db)` \| ([\d,]+) \| (.*?) \| (.*?) \|", readme)
    assert len(rows) == 6
    gib = 1024**3
    for preset, tokens, *cells in rows:
        for method, cell in zip(("lora", "qlora"), cells):
            kw = dict(seq_len=int(tokens.replace(",", "")), batch=1, methods=(method,), lora_r=16)
            least = min(r.peak_bytes for r in plan(get_preset(preset), gpu_mem=80 * gib, **kw))
            fits = [g for g in (16, 24, 40, 80) if any(r.fits for r in plan(get_preset(preset), gpu_mem=g * gib, **kw))]
            assert cell == f"{least / gib:.1f} GiB, " + ", ".join(map(str, fits)) + " GiB", (preset, tokens, method)


@pytest.mark.parametrize("file", ["tokenizer.model", "tokenizer.json"])
def test_text_stream_holds_back_a_character_split_into_byte_tokens(tok_dir, file):
    from minillama.tokenizer import TextStream

    tok = load_tokenizer(tok_dir / file)
    text = "a llama 🦙, a snake 🐍, Ω ≈ √2"  # characters the small BPE never merged: byte tokens
    ids = tok.encode(text, bos=False)
    assert any("\ufffd" in tok.decode([i]) for i in ids)  # some token is part of a character
    stream = TextStream(tok, [tok.bos_id])
    pieces = [stream.add(i) for i in ids] + [stream.flush()]
    assert "".join(pieces) == text and not any("\ufffd" in p for p in pieces)
