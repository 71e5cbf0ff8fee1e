"""The tokenizer files of an HF export, so that `transformers.AutoTokenizer` encodes exactly like our
sentencepiece model (same ids, BOS added) and decodes back to the same text.

Given only `tokenizer.model`, transformers must convert it itself: it needs `protobuf` for that (without
it transformers 5 cannot load the directory at all), and its Llama defaults disagree with sentencepiece
(transformers 5 was seen to encode ' ' as [29871] where Llama-2's sentencepiece gives [259], and to add no
BOS). So we also write the converted pipeline:

- `tokenizer.json`: the `tokenizers` pipeline, written as plain JSON (no HF library needed):
  normalizer:     prepend "▁" (sentencepiece's dummy prefix), then every " " -> "▁";
  model:          BPE over the same pieces and ids; byte fallback for characters outside the vocabulary;
  post-processor: "<s> $A" (BOS first);
  decoder:        "▁" -> " ", <0xNN> bytes -> text, drop the one space of the dummy prefix.
- `tokenizer_config.json` and `special_tokens_map.json`: the class, the special tokens, add_bos_token.
  The class is PreTrainedTokenizerFast, which runs tokenizer.json as written in transformers 4.x and 5.x.
  (transformers 5's LlamaTokenizer keeps only the vocabulary and merges and puts in its own Metaspace step,
  which adds no dummy "▁" before a text that starts with a space: ' ' would give [▁], not [▁, ▁].)
  Special-token text such as "<s>" inside a string stays text (split_special_tokens), as in sentencepiece.

Why the merges are right: sentencepiece's BPE repeatedly joins the adjacent pair whose joined piece has
the highest score (the leftmost pair on a tie); HF's BPE joins the pair of lowest merge rank (also leftmost
on a tie). Ranking every way of splitting a piece in two by that piece's score, best first, makes HF pick
the pairs sentencepiece picks (tests/test_exports.py compares the two on many strings).

Llama-3's byte-level BPE (`minillama.tokenizer.BPETokenizer`) is written as HF's own Llama-3 files are:
`write_bpe_tokenizer` (its docstring says how), with the chat template of `encode_chat`.

Only what this pipeline can express is converted: a BPE model with byte fallback, identity
normalisation, whitespace kept, a dummy prefix, no user-defined pieces (Llama-2's settings, and those of
`minillama tokenizer`). For anything else tokenizer.json is not written, with a warning saying why.
"""

from __future__ import annotations

import json
import struct
import warnings
from pathlib import Path
from typing import Iterator

from ..tokenizer import BOS, PATTERN, bytes_to_unicode

# Piece types and model types of sentencepiece_model.proto (google/sentencepiece, src/sentencepiece_model.proto)
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
BPE = 2
SPACE = "\u2581"  # "▁", sentencepiece's visible space


# ---------------------------------------------------------------------------------------------
# Reading tokenizer.model: a protobuf `ModelProto`, of which we need a few fields (no protobuf library)
# ---------------------------------------------------------------------------------------------
def _varint(buf: bytes, i: int) -> tuple[int, int]:
    value, shift = 0, 0
    while True:
        b = buf[i]
        value |= (b & 0x7F) << shift
        i, shift = i + 1, shift + 7
        if b < 0x80:
            return value, i


def _fields(buf: bytes) -> Iterator[tuple[int, object]]:
    """(field number, value) of one protobuf message: an int (varint), bytes (length-delimited) or raw
    4/8 bytes (fixed32/fixed64); the type of each field comes from the .proto file."""
    i = 0
    while i < len(buf):
        key, i = _varint(buf, i)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, i = _varint(buf, i)
        elif wire == 2:
            n, i = _varint(buf, i)
            value, i = buf[i:i + n], i + n
        elif wire in (1, 5):
            n = 8 if wire == 1 else 4
            value, i = buf[i:i + n], i + n
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        yield number, value


def read_spm_model(proto: bytes) -> dict:
    """The fields of a sentencepiece model that decide how it encodes, with the .proto's defaults:
    pieces [(piece, score, type)], model_type, byte_fallback, and the normaliser's settings."""
    out = {"pieces": [], "model_type": 1, "byte_fallback": False, "whitespace_as_suffix": False,
           "normalizer": "", "charsmap": b"", "rule_tsv": "", "dummy_prefix": True,
           "remove_extra_whitespaces": True, "escape_whitespaces": True}
    for number, value in _fields(proto):
        if number == 1:  # ModelProto.pieces: SentencePiece {piece = 1, score = 2 (float), type = 3}
            piece = dict(_fields(value))
            out["pieces"].append((piece.get(1, b"").decode("utf-8"), struct.unpack("<f", piece.get(2, b"\0" * 4))[0],
                                  piece.get(3, NORMAL)))
        elif number == 2:  # TrainerSpec
            spec = dict(_fields(value))
            out.update(model_type=spec.get(3, 1), byte_fallback=bool(spec.get(35, 0)),
                       whitespace_as_suffix=bool(spec.get(24, 0)))
        elif number == 3:  # NormalizerSpec
            spec = dict(_fields(value))
            out.update(normalizer=spec.get(1, b"").decode(), charsmap=spec.get(2, b""),
                       rule_tsv=spec.get(6, b"").decode(), dummy_prefix=bool(spec.get(3, 1)),
                       remove_extra_whitespaces=bool(spec.get(4, 1)), escape_whitespaces=bool(spec.get(5, 1)))
    return out


def unsupported(model: dict) -> list[str]:
    """Why this sentencepiece model cannot be written as a Llama tokenizer.json (empty if it can)."""
    checks = [
        (model["model_type"] == BPE, "it is not a BPE model"),
        (model["byte_fallback"], "it has no byte fallback"),
        (not model["charsmap"] and not model["rule_tsv"] and model["normalizer"] in ("identity", ""),
         f"its normaliser {model['normalizer']!r} rewrites text (expected 'identity')"),
        (not model["remove_extra_whitespaces"], "it removes extra whitespace"),
        (model["escape_whitespaces"] and model["dummy_prefix"] and not model["whitespace_as_suffix"],
         "its whitespace handling is not Llama-2's (escaped spaces, dummy prefix in front)"),
        (all(t not in (USER_DEFINED, UNUSED) for _, _, t in model["pieces"]), "it has user-defined or unused pieces"),
    ]
    return [why for ok, why in checks if not ok]


# ---------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------
def bpe_merges(pieces: list[tuple[str, float, int]]) -> list[str]:
    """Every (left, right) split of a normal piece into two normal pieces, best-scoring piece first."""
    normal = {p: (score, i) for i, (p, score, t) in enumerate(pieces) if t == NORMAL}
    merges = []
    for piece, (score, i) in normal.items():
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in normal and right in normal:
                merges.append((-score, i, normal[left][1], normal[right][1], f"{left} {right}"))
    return [m[-1] for m in sorted(merges)]


def tokenizer_json(model: dict, bos: str) -> dict:
    """A `tokenizers` pipeline (tokenizer.json) equivalent to this Llama-2-style sentencepiece model."""
    pieces = model["pieces"]
    special = [{"id": i, "content": p, "single_word": False, "lstrip": False, "rstrip": False,
                "normalized": False, "special": True} for i, (p, _, t) in enumerate(pieces) if t in (UNKNOWN, CONTROL)]
    unk = next((p for p, _, t in pieces if t == UNKNOWN), None)
    bos_id = next(i for i, (p, _, _) in enumerate(pieces) if p == bos)

    def replace(old, new):
        return {"type": "Replace", "pattern": {"String": old}, "content": new}

    def template(*parts):  # "<s> $A" as tokenizers spells it
        return [{"SpecialToken": {"id": bos, "type_id": t}} if p == bos else {"Sequence": {"id": p, "type_id": t}}
                for p, t in parts]

    return {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": special,
        "normalizer": {"type": "Sequence", "normalizers": [{"type": "Prepend", "prepend": SPACE}, replace(" ", SPACE)]},
        "pre_tokenizer": None,
        "post_processor": {"type": "TemplateProcessing", "single": template((bos, 0), ("A", 0)),
                           "pair": template((bos, 0), ("A", 0), (bos, 1), ("B", 1)),
                           "special_tokens": {bos: {"id": bos, "ids": [bos_id], "tokens": [bos]}}},
        "decoder": {"type": "Sequence", "decoders": [replace(SPACE, " "), {"type": "ByteFallback"}, {"type": "Fuse"},
                                                     {"type": "Strip", "content": " ", "start": 1, "stop": 0}]},
        "model": {"type": "BPE", "dropout": None, "unk_token": unk, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": True, "byte_fallback": True,
                  "vocab": {p: i for i, (p, _, _) in enumerate(pieces)}, "merges": bpe_merges(pieces)},
    }


def save_tokenizer(tok, out: Path, format: str, model_max_length: int) -> None:
    """The tokenizer files of a checkpoint in directory `out`: tokenizer.model, and for an 'hf' checkpoint also
    the files transformers' AutoTokenizer reads (write_hf_tokenizer). Used by every checkpoint writer."""
    if format == "hf":
        write_hf_tokenizer(tok, out, model_max_length=model_max_length)
    else:
        tok.save(out / "tokenizer.model")


def write_hf_tokenizer(tok, out: Path, model_max_length: int) -> None:
    """Write tokenizer.model, tokenizer_config.json, special_tokens_map.json and (when the model can be
    converted exactly) tokenizer.json for the minillama Tokenizer `tok` into directory `out`."""
    if tok.chat_format == "llama3":
        return write_bpe_tokenizer(tok, out, model_max_length)
    tok.save(out / "tokenizer.model")
    if tok.bos_id < 0 or tok.eos_id < 0:
        raise ValueError(f"{tok.path} has no BOS or no EOS piece: a Llama tokenizer needs both.")
    names = {"bos_token": tok.sp.id_to_piece(tok.bos_id), "eos_token": tok.sp.id_to_piece(tok.eos_id),
             "unk_token": tok.sp.id_to_piece(tok.sp.unk_id())}
    model = read_spm_model(tok.sp.serialized_model_proto())
    reasons = unsupported(model)
    config = {
        # Without tokenizer.json, LlamaTokenizer converts tokenizer.model itself (the best left to try).
        "tokenizer_class": "LlamaTokenizer" if reasons else "PreTrainedTokenizerFast", **names, "pad_token": None,
        "add_bos_token": True, "add_eos_token": False,  # Meta's encode(text, bos=True, eos=False)
        # legacy (read by LlamaTokenizer only): the dummy prefix goes in front of every stretch of text, as
        # sentencepiece does; it also spares transformers 4.x's slow LlamaTokenizer from needing protobuf.
        "legacy": True, "clean_up_tokenization_spaces": False, "model_max_length": model_max_length,
        "split_special_tokens": True,  # "<s>" inside a text is text, as in sentencepiece
        "added_tokens_decoder": {str(i): {"content": tok.sp.id_to_piece(i), "lstrip": False, "normalized": False,
                                          "rstrip": False, "single_word": False, "special": True}
                                 for i in range(tok.n_words) if tok.sp.is_control(i) or tok.sp.is_unknown(i)},
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False))
    (out / "special_tokens_map.json").write_text(json.dumps(names, indent=2, ensure_ascii=False))
    if reasons:
        warnings.warn(f"tokenizer.json was not written for {tok.path}: {'; '.join(reasons)}, so the Llama-2 "
                      f"pipeline would not encode like it. transformers will convert tokenizer.model itself "
                      f"(with protobuf installed) and may disagree with sentencepiece.", stacklevel=3)
        return
    with open(out / "tokenizer.json", "w", encoding="utf-8") as f:
        json.dump(tokenizer_json(model, names["bos_token"]), f, indent=1, ensure_ascii=False)


# ---------------------------------------------------------------------------------------------
# Llama-3: byte-level BPE
# ---------------------------------------------------------------------------------------------
# Meta's chat format as a Jinja template (the one in HF's Llama-3 tokenizer_config.json): it renders the text
# whose tokens are `BPETokenizer.encode_chat`'s, special tokens included.
LLAMA3_CHAT_TEMPLATE = (
    "{% for message in messages %}{% set content = '<|start_header_id|>' + message['role'] + "
    "'<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}")


def bpe_merges_from_ranks(ranks: dict[bytes, int]) -> list[tuple[bytes, bytes]]:
    """HF merges for tiktoken ranks, as transformers' TikTokenConverter makes them: every split of a token into
    two tokens, ordered by the rank of the joined token, then by the ranks of its two halves. (tiktoken joins
    the adjacent pair whose joined bytes rank lowest; these merges make HF's BPE pick the same pairs.)"""
    merges = []
    for token, rank in ranks.items():
        for cut in range(1, len(token)):
            left, right = token[:cut], token[cut:]
            if left in ranks and right in ranks:
                merges.append((rank, ranks[left], ranks[right], left, right))
    return [(left, right) for *_, left, right in sorted(merges)]


def bos_post_processor(bos_id: int) -> dict:
    """BOS in front, as encode(text, bos=True) (and byte-level offsets), as in HF's Llama-3 tokenizer.json."""
    bos = {"SpecialToken": {"id": BOS, "type_id": 0}}
    return {"type": "Sequence", "processors": [
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False},
        {"type": "TemplateProcessing", "single": [bos, {"Sequence": {"id": "A", "type_id": 0}}],
         "pair": [bos, {"Sequence": {"id": "A", "type_id": 0}}, {"SpecialToken": {"id": BOS, "type_id": 1}},
                  {"Sequence": {"id": "B", "type_id": 1}}],
         "special_tokens": {BOS: {"id": BOS, "ids": [bos_id], "tokens": [BOS]}}}]}


def bpe_tokenizer_json(tok) -> dict:
    """tokenizer.json of a Llama-3 BPETokenizer: Meta's split pattern, byte-level pieces, BPE over its ranks
    (ignore_merges: a piece that is a token is taken whole, as tiktoken does), BOS added by the post-processor."""
    ranks, char = tok.ranks(), bytes_to_unicode()

    def text(token: bytes) -> str:
        return "".join(char[b] for b in token)

    special = [{"id": i, "content": name, "single_word": False, "lstrip": False, "rstrip": False,
                "normalized": False, "special": True}
               for name, i in sorted(tok.special_tokens.items(), key=lambda kv: kv[1])]
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}
    return {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": special, "normalizer": None,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": PATTERN}, "behavior": "Isolated", "invert": False}, byte_level]},
        "post_processor": bos_post_processor(tok.bos_id),
        "decoder": byte_level,
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": True,
                  "vocab": {text(t): i for t, i in sorted(ranks.items(), key=lambda kv: kv[1])},
                  "merges": [[text(a), text(b)] for a, b in bpe_merges_from_ranks(ranks)]},
    }


def write_bpe_tokenizer(tok, out: Path, model_max_length: int) -> None:
    """HF's files for a Llama-3 BPETokenizer: tokenizer.json (the one it was read from, else converted from
    Meta's ranks), tokenizer_config.json (with the chat template) and special_tokens_map.json.

    split_special_tokens is left False, as in HF's own Llama-3 files, so that apply_chat_template's special
    tokens are special: AutoTokenizer then reads "<|eot_id|>" inside a plain text as the special token, where
    Meta's encode (and minillama's) reads it as text; pass split_special_tokens=True to get Meta's ids."""
    if tok.path.name.endswith(".json"):  # the file it was read from, with BOS added as encode(bos=True) does
        spec = {**json.loads(tok.path.read_text(encoding="utf-8")), "post_processor": bos_post_processor(tok.bos_id)}
    else:
        spec = bpe_tokenizer_json(tok)
    names = {"bos_token": BOS, "eos_token": "<|end_of_text|>"}
    config = {"tokenizer_class": "PreTrainedTokenizerFast", **names, "clean_up_tokenization_spaces": False,
              "model_input_names": ["input_ids", "attention_mask"], "model_max_length": model_max_length,
              "chat_template": LLAMA3_CHAT_TEMPLATE,
              "added_tokens_decoder": {str(t["id"]): {k: t[k] for k in ("content", "lstrip", "normalized", "rstrip",
                                                                      "single_word", "special")}
                                       for t in spec["added_tokens"]}}
    with open(out / "tokenizer.json", "w", encoding="utf-8") as f:
        json.dump(spec, f, indent=1, ensure_ascii=False)
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False))
    (out / "special_tokens_map.json").write_text(json.dumps(names, indent=2, ensure_ascii=False))
