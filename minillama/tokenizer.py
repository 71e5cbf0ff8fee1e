"""The tokenizers of LLaMA-2 (sentencepiece) and Llama-3 (byte-level BPE), and their chat formats.

Llama-2 uses a sentencepiece BPE model with byte fallback: BOS = 1, EOS = 2, no pad token
(Meta's code uses -1 for "no pad"). The chat format wraps each user turn in [INST] ... [/INST]
and puts the system prompt inside the first turn between <<SYS>> and <</SYS>>.

Llama-3 uses a byte-level BPE (`BPETokenizer`): the text is first cut by a regular expression (Meta's
`PATTERN`: a word with the one character before it, digits in runs of at most three, punctuation, runs of
whitespace), then each piece, as UTF-8 bytes, is merged pair by pair, the pair whose joined bytes have the
lowest rank first. Meta ships the ranks as `tokenizer.model` (tiktoken's format: one base64 token and its
rank per line, 128,000 of them); 256 special tokens follow (`<|begin_of_text|>` = BOS = 128000,
`<|end_of_text|>` = EOS, `<|eot_id|>` ends a chat turn). HF ships the same tokenizer as `tokenizer.json`.
The chat format puts each message between `<|start_header_id|>role<|end_header_id|>\n\n` and `<|eot_id|>`.

`load_tokenizer` tells the three files apart by their content and returns an object with one interface:
encode(text, bos=True, eos=False), decode(ids), bos_id, eos_id, vocab_size, special_tokens (name -> id),
stop_ids (the ids that end a generated answer) and encode_chat(dialog) in the model's own chat format.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
from pathlib import Path
from typing import Iterator, Optional, Sequence, Union

import sentencepiece as spm

from .files import atomic_write_bytes

B_INST, E_INST = "[INST]", "[/INST]"
B_SYS, E_SYS = "<<SYS>>\n", "\n<</SYS>>\n\n"
ROLES = ("system", "user", "assistant")


def check_dialog(dialog: Sequence[dict]) -> list[dict]:
    """The dialog as a list, or a clear error: every message a dict with a known role and a string content."""
    dialog = list(dialog)
    for i, m in enumerate(dialog):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise ValueError(f"Dialog message {i} is {m!r}: expected {{'role': one of {ROLES}, 'content': a string}}.")
    return dialog


class Tokenizer:
    """Llama-2's sentencepiece tokenizer, with Meta's API: encode(text, bos=True, eos=False) -> list of ids."""

    chat_format = "llama2"

    def __init__(self, model_path: Union[str, os.PathLike]):
        self.path = Path(model_path)
        try:
            self.sp = spm.SentencePieceProcessor(model_file=str(self.path))
        except (OSError, RuntimeError) as e:
            raise ValueError(f"{self.path} is not a readable sentencepiece model ({str(e).splitlines()[0]}).") from None
        self.n_words = self.sp.vocab_size()
        self.bos_id, self.eos_id, self.pad_id = self.sp.bos_id(), self.sp.eos_id(), self.sp.pad_id()
        self.special_tokens = {self.sp.id_to_piece(i): i for i in range(self.n_words) if self.sp.is_control(i)}
        self.stop_ids = [self.eos_id]

    @property
    def vocab_size(self) -> int:
        return self.n_words

    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]:
        ids = self.sp.encode(text)
        return ([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else [])

    def decode(self, ids: Sequence[int]) -> str:
        return self.sp.decode([int(i) for i in ids])

    def save(self, path: Union[str, os.PathLike]) -> None:
        atomic_write_bytes(path, self.sp.serialized_model_proto())

    def encode_chat(self, dialog: Sequence[dict]) -> list[int]:
        """Token ids of a Llama-2 chat prompt, ending with the last user turn (Meta's format).

        dialog: [{"role": "system"|"user"|"assistant", "content": str}, ...], optional system message
        first, then user/assistant alternating, ending with user. Each finished exchange is
        `<s>[INST] user [/INST] answer </s>`; the open one is `<s>[INST] user [/INST]`.
        """
        dialog = check_dialog(dialog)
        roles = [m["role"] for m in dialog]
        turns = roles[1:] if roles[:1] == ["system"] else roles
        expected = ["user" if i % 2 == 0 else "assistant" for i in range(len(turns))]
        if not turns or turns != expected or turns[-1] != "user":
            raise ValueError(f"Chat roles {roles} are invalid: expected an optional 'system', then 'user' and "
                             f"'assistant' alternating, ending with 'user'.")
        if roles[0] == "system":  # the system prompt goes inside the first user message
            first = {"role": "user", "content": B_SYS + dialog[0]["content"] + E_SYS + dialog[1]["content"]}
            dialog = [first] + dialog[2:]
        ids: list[int] = []
        for prompt, answer in zip(dialog[::2], dialog[1::2]):
            ids += self.encode(f"{B_INST} {prompt['content'].strip()} {E_INST} {answer['content'].strip()} ",
                               bos=True, eos=True)
        ids += self.encode(f"{B_INST} {dialog[-1]['content'].strip()} {E_INST}", bos=True, eos=False)
        return ids


# ---- Llama-3: byte-level BPE --------------------------------------------------------------------
# Meta's llama3 tokenizer (github.com/meta-llama/llama3, llama/tokenizer.py): its split pattern, and its 256
# special tokens numbered after the base tokens (Llama-3.1 renamed some reserved ones; BOS, EOS, the two header
# tokens and <|eot_id|> keep their names and ids in 3.0, 3.1 and 3.2).
PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
           r"\s*[\r\n]+|\s+(?!\S)|\s+")
NUM_SPECIAL = 256
SPECIAL_NAMES = (["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
                  "<|reserved_special_token_1|>", "<|reserved_special_token_2|>", "<|reserved_special_token_3|>",
                  "<|start_header_id|>", "<|end_header_id|>", "<|reserved_special_token_4|>", "<|eot_id|>"]
                 + [f"<|reserved_special_token_{i}|>" for i in range(5, NUM_SPECIAL - 5)])
BOS, EOS, EOT = "<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"
START_HEADER, END_HEADER = "<|start_header_id|>", "<|end_header_id|>"
# Meta's encode cuts a text into slices tiktoken handles (openai/tiktoken#195): at most 400,000 characters,
# and no run of 25,000 whitespace or non-whitespace characters.
MAX_ENCODE_CHARS, MAX_RUN_CHARS = 400_000, 25_000


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's printable stand-in for each byte, with which tokenizer.json spells byte-level tokens: the
    printable bytes stand for themselves, the 68 others for the characters U+0100, U+0101, ... in order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + i) for i, b in enumerate(others)}}


def read_tiktoken(path: Path) -> dict[bytes, int]:
    """The ranks of a tiktoken BPE file (a base64 token and its rank per line). Read here, not by tiktoken's
    load_tiktoken_bpe, which keeps a copy of every file it reads in a cache folder found by the file's *path*
    (a file rewritten at the same path would be read stale) and fetches URLs."""
    ranks = {}
    for i, line in enumerate(path.read_bytes().splitlines(), 1):
        if not line.strip():
            continue
        try:
            token, rank = line.split()
            ranks[base64.b64decode(token, validate=True)] = int(rank)
        except (ValueError, binascii.Error):
            raise ValueError(f"{path}, line {i}: {line[:60]!r} is not 'base64-token rank' as in a tiktoken "
                             f"BPE file.") from None
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise ValueError(f"{path}: the ranks are not 0 .. {len(ranks) - 1}, each once: not a BPE vocabulary.")
    return ranks


def _require(module: str, file: Path, what: str):
    try:
        return __import__(module)
    except ImportError:
        raise ImportError(f"{file} is {what}; reading it needs the package {module!r}: pip install {module} "
                          f"(or the course's extra: pip install -e '.[llama3]').") from None


class BPETokenizer:
    """Llama-3's tokenizer, with the same API as `Tokenizer`. Built by `from_tiktoken` (Meta's file, encoded
    as Meta's code does, with tiktoken) or `from_tokenizer_json` (HF's file, encoded as transformers does,
    with the `tokenizers` library). A special token's spelling inside a text is encoded as text."""

    chat_format = "llama3"

    def __init__(self, path: Path, special_tokens: dict[str, int], vocab_size: int, encode_text, decode, ranks):
        missing = [name for name in (BOS, EOS, EOT, START_HEADER, END_HEADER) if name not in special_tokens]
        if missing:
            raise ValueError(f"{path} lacks the special token {missing[0]!r}: expected a Llama-3 tokenizer.")
        self.path, self.special_tokens, self.n_words = path, special_tokens, vocab_size
        self._encode_text, self._decode, self._ranks_of = encode_text, decode, ranks
        self.bos_id, self.eos_id, self.pad_id = special_tokens[BOS], special_tokens[EOS], -1
        self.stop_ids = [self.eos_id, special_tokens[EOT]]  # the end of a text, the end of a chat turn

    @classmethod
    def from_tiktoken(cls, path: Path) -> "BPETokenizer":
        tiktoken = _require("tiktoken", path, "a tiktoken BPE file (Meta's Llama-3 tokenizer.model)")
        ranks = read_tiktoken(path)
        special = {name: len(ranks) + i for i, name in enumerate(SPECIAL_NAMES)}
        enc = tiktoken.Encoding(name=path.name, pat_str=PATTERN, mergeable_ranks=ranks, special_tokens=special)

        def encode_text(text: str) -> list[int]:  # Meta's Tokenizer.encode: special spellings stay text
            return [t for part in _meta_slices(text)
                    for t in enc.encode(part, allowed_special=set(), disallowed_special=())]
        return cls(path, special, enc.n_vocab, encode_text, enc.decode, lambda: ranks)

    @classmethod
    def from_tokenizer_json(cls, path: Path) -> "BPETokenizer":
        tokenizers = _require("tokenizers", path, "an HF tokenizer.json")
        try:
            spec = json.loads(path.read_text(encoding="utf-8"))
            hf = tokenizers.Tokenizer.from_str(json.dumps(spec))
        except Exception as e:  # noqa: BLE001 (tokenizers raises its own Exception class)
            raise ValueError(f"{path} is not a readable tokenizer.json ({str(e).splitlines()[0]}).") from None
        if spec.get("model", {}).get("type") != "BPE" or (spec.get("decoder") or {}).get("type") != "ByteLevel":
            raise ValueError(f"{path} is not a byte-level BPE tokenizer.json (Llama-3's kind): its model is "
                             f"{spec.get('model', {}).get('type')!r}, its decoder {(spec.get('decoder') or {}).get('type')!r}.")
        hf.encode_special_tokens = True  # "<|eot_id|>" in a text is text (transformers' split_special_tokens)
        special = {t["content"]: t["id"] for t in spec.get("added_tokens", []) if t.get("special")}
        to_byte = {c: b for b, c in bytes_to_unicode().items()}

        def ranks() -> dict[bytes, int]:  # the vocabulary as tiktoken's ranks (for a Meta export)
            bad = next((t for t in spec["model"]["vocab"] if any(c not in to_byte for c in t)), None)
            if bad is not None:
                raise ValueError(f"{path}: the token {bad!r} is not spelled in byte-level characters, so it has "
                                 f"no bytes for Meta's tokenizer.model.")
            return {bytes(to_byte[c] for c in token): i for token, i in spec["model"]["vocab"].items()}
        return cls(path, special, hf.get_vocab_size(with_added_tokens=True),
                   lambda text: hf.encode(text, add_special_tokens=False).ids,
                   lambda ids: hf.decode(ids, skip_special_tokens=False), ranks)

    @property
    def vocab_size(self) -> int:
        return self.n_words

    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]:
        if not isinstance(text, str):
            raise ValueError(f"encode takes a string, not {type(text).__name__}.")
        return ([self.bos_id] if bos else []) + self._encode_text(text) + ([self.eos_id] if eos else [])

    def decode(self, ids: Sequence[int]) -> str:
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < self.n_words]
        if bad:
            raise ValueError(f"Token id {bad[0]} is outside this tokenizer's vocabulary [0, {self.n_words}).")
        return self._decode(ids)

    def ranks(self) -> dict[bytes, int]:
        """The base tokens as bytes -> rank (= id), as in Meta's tokenizer.model."""
        return self._ranks_of()

    def save(self, path: Union[str, os.PathLike]) -> None:
        """Write Meta's tokenizer.model: the base tokens in tiktoken's format (the special ones are Meta's code)."""
        ranks = self.ranks()
        lines = (base64.b64encode(token) + b" " + str(rank).encode() for token, rank in
                 sorted(ranks.items(), key=lambda kv: kv[1]))
        atomic_write_bytes(path, b"\n".join(lines) + b"\n")

    def encode_chat(self, dialog: Sequence[dict]) -> list[int]:
        """Token ids of a Llama-3 chat prompt, as Meta's ChatFormat.encode_dialog_prompt: BOS, then per message
        `<|start_header_id|>role<|end_header_id|>\\n\\n` + content (stripped) + `<|eot_id|>`, then an open
        assistant header for the model to complete."""
        ids = [self.bos_id]
        for m in check_dialog(dialog):
            ids += self.chat_header(m["role"]) + self.encode(m["content"].strip(), bos=False)
            ids.append(self.special_tokens[EOT])
        return ids + self.chat_header("assistant")

    def chat_header(self, role: str) -> list[int]:
        return ([self.special_tokens[START_HEADER]] + self.encode(role, bos=False)
                + [self.special_tokens[END_HEADER]] + self.encode("\n\n", bos=False))


def _meta_slices(text: str) -> Iterator[str]:
    """Meta's cutting of a text before tiktoken (_split_whitespaces_or_nonwhitespaces): slices of at most
    MAX_ENCODE_CHARS, each cut again where a run of whitespace or of non-whitespace passes MAX_RUN_CHARS."""
    for i in range(0, len(text), MAX_ENCODE_CHARS):
        s, start, run = text[i:i + MAX_ENCODE_CHARS], 0, 0
        space = s[0].isspace() if s else False
        for j, ch in enumerate(s):
            if ch.isspace() != space:
                space, run = ch.isspace(), 1
            else:
                run += 1
                if run > MAX_RUN_CHARS:
                    yield s[start:j]
                    start, run = j, 1
        yield s[start:]


class TextStream:
    """The text of tokens that arrive one at a time, e.g. from `generate(..., stream=...)`.

    Decoding each token alone goes wrong twice: sentencepiece drops the leading space of the first piece
    it decodes (decode of "▁upon" alone is "upon", so "Once" + "upon" printed "Onceupon"), and a character
    split into byte-fallback tokens (<0xE6><0x9D><0xB1> for "東") is no text until its last byte. So decode
    the whole sequence each time, hand out only the new end, and hold it back while it ends in an unfinished
    character (decoded as U+FFFD). The prompt must hold whole characters.
    """

    def __init__(self, tok: Tokenizer, prompt: Sequence[int] = ()):
        self.tok, self.ids = tok, [int(i) for i in prompt]
        self.text = tok.decode(self.ids)  # the text handed out so far (the prompt's)

    def add(self, token: int) -> str:
        """The new text once `token` is appended ("" while a character is unfinished)."""
        self.ids.append(int(token))
        text = self.tok.decode(self.ids)
        return "" if text.endswith("\ufffd") else self._advance(text)

    def flush(self) -> str:
        """The text still held back (an unfinished character at the very end); call once at the end."""
        return self._advance(self.tok.decode(self.ids))

    def _advance(self, text: str) -> str:
        new, self.text = text[len(self.text):], text
        return new


def tokenizer_file(path: Union[str, os.PathLike]) -> Path:
    """The tokenizer file of `path`: the file itself, or in a directory tokenizer.model (Meta's, or the
    sentencepiece model of a Llama-2 HF folder), else tokenizer.json (an HF folder of Llama-3)."""
    path = Path(path)
    if not path.is_dir():
        if not path.exists():
            raise FileNotFoundError(f"Tokenizer file {path} does not exist.")
        return path
    for name in ("tokenizer.model", "tokenizer.json"):
        if (path / name).is_file():
            return path / name
    raise FileNotFoundError(f"Tokenizer file {path / 'tokenizer.model'} does not exist, nor {path / 'tokenizer.json'}: "
                            f"{path} holds no tokenizer (sentencepiece or Meta's tiktoken BPE, or HF's).")


def tokenizer_kind(file: Path) -> str:
    """'tokenizer.json', 'tiktoken' or 'sentencepiece', from the first bytes of the file."""
    with open(file, "rb") as f:
        head = f.read(256)
    if head.lstrip().startswith(b"{"):
        return "tokenizer.json"
    first = head.split(b"\n", 1)[0].split()
    if len(first) == 2 and first[1].isdigit() and all(c in b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
                                                         b"0123456789+/=" for c in first[0]):
        return "tiktoken"
    return "sentencepiece"


def load_tokenizer(path: Union[str, os.PathLike], *, vocab_size: Optional[int] = None):
    """Load the tokenizer of a model directory, or a tokenizer file: Llama-2's sentencepiece tokenizer.model,
    Meta's Llama-3 tokenizer.model (tiktoken BPE) or an HF tokenizer.json, told apart by content.

    vocab_size: the model's vocabulary size; a tokenizer of another size is refused (its ids would
    index the wrong embedding rows).
    """
    file = tokenizer_file(path)
    kind = tokenizer_kind(file)
    tok = (BPETokenizer.from_tokenizer_json(file) if kind == "tokenizer.json" else
           BPETokenizer.from_tiktoken(file) if kind == "tiktoken" else Tokenizer(file))
    if vocab_size is not None and tok.n_words != vocab_size:
        raise ValueError(f"Tokenizer {file} has {tok.n_words} tokens but the model's vocab_size is {vocab_size}: "
                         f"they do not belong together.")
    return tok
