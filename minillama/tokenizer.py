"""The sentencepiece tokenizer of LLaMA-2, and its chat template.

Llama-2 uses a sentencepiece BPE model with byte fallback: BOS = 1, EOS = 2, no pad token
(Meta's code uses -1 for "no pad"). The chat format wraps each user turn in [INST] ... [/INST]
and puts the system prompt inside the first turn between <<SYS>> and <</SYS>>.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Sequence, Union

import sentencepiece as spm

from .files import atomic_write_bytes

B_INST, E_INST = "[INST]", "[/INST]"
B_SYS, E_SYS = "<<SYS>>\n", "\n<</SYS>>\n\n"


class Tokenizer:
    """encode/decode with Meta's API: encode(text, bos=True, eos=False) -> list of ids."""

    def __init__(self, model_path: Union[str, os.PathLike]):
        self.path = Path(model_path)
        try:
            self.sp = spm.SentencePieceProcessor(model_file=str(self.path))
        except (OSError, RuntimeError) as e:
            raise ValueError(f"{self.path} is not a readable sentencepiece model ({str(e).splitlines()[0]}).") from None
        self.n_words = self.sp.vocab_size()
        self.bos_id, self.eos_id, self.pad_id = self.sp.bos_id(), self.sp.eos_id(), self.sp.pad_id()

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
        dialog = list(dialog)
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


def load_tokenizer(path: Union[str, os.PathLike], *, vocab_size: Optional[int] = None) -> Tokenizer:
    """Load `path/tokenizer.model` (or `path` itself if it is a file).

    vocab_size: the model's vocabulary size; a tokenizer of another size is refused (its ids would
    index the wrong embedding rows).
    """
    path = Path(path)
    file = path / "tokenizer.model" if path.is_dir() else path
    if not file.exists():
        raise FileNotFoundError(f"Tokenizer file {file} does not exist.")
    tok = Tokenizer(file)
    if vocab_size is not None and tok.n_words != vocab_size:
        raise ValueError(f"Tokenizer {file} has {tok.n_words} tokens but the model's vocab_size is {vocab_size}: "
                         f"they do not belong together.")
    return tok
