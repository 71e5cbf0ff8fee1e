"""A small Llama-3-style tokenizer, built here (nothing is downloaded): a byte-level BPE trained
deterministically with the `tokenizers` library on a corpus of the string classes the tests check, with
Meta's split pattern and Meta's 256 special tokens after the base tokens, written in both formats:
HF's tokenizer.json and Meta's tokenizer.model (tiktoken: a base64 token and its rank per line)."""

import base64
import random
from pathlib import Path

import pytest

# Meta's llama3 split pattern, copied from github.com/meta-llama/llama3, llama/tokenizer.py (not imported
# from minillama: the tests compare against it).
META_PATTERN = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"  # noqa: E501
META_SPECIAL = [
    "<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>", "<|reserved_special_token_1|>",
    "<|reserved_special_token_2|>", "<|reserved_special_token_3|>", "<|start_header_id|>", "<|end_header_id|>",
    "<|reserved_special_token_4|>", "<|eot_id|>",  # end of turn
] + [f"<|reserved_special_token_{i}|>" for i in range(5, 256 - 5)]

# The string classes of issue 27: unicode, whitespace runs, digits (split in threes), code, emoji, the empty
# string, special-token spellings inside text, contractions and case.
STRINGS = [
    "", " ", "  ", "\n", "\n\n\n", "\t\tx", "a  b   c    d", "trailing   ", "   leading", " \n \n x",
    "Hello, world!", "I'm sure it's THEY'RE we'LL you'VE", "Once upon a time, Lily found 37 apples.",
    "1", "12", "123", "1234", "1234567", "3.14159 and 2,718,281", "x1y22z333w4444",
    "naïve café, Zürich; Ελληνικά; русский; 日本語のテキスト; 한국어", "ß → SS, İ → i̇, ﬁ ligature",
    "emoji 😀👍🏽 👨‍👩‍👧 🇫🇷!", "\u200b zero width \u00a0 nbsp",
    "def f(x):\n    return x ** 2  # square\n", "for (int i = 0; i < n; ++i) { a[i] = i; }",
    "<|eot_id|>", "say <|begin_of_text|> then <|end_of_text|><|start_header_id|>user<|end_header_id|>",
    "<|reserved_special_token_7|> <|not_special|> <s></s>",
    "user\n\nassistant", "Below is an instruction that describes a task.\n\n### Response:\n",
]


def corpus(n: int = 1200, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    words = ["Lily", "found", "the", "river", "apples", "it's", "we'll", "café", "Zürich", "日本語", "русский",
             "def", "return", "print(x)", "x ** 2", "{ a[i] = i; }", "😀", "👍🏽", "Instruction", "Response",
             "assistant", "user", "system", "###", "\n\n", "    ", "\t", "123", "4567", "3.14"]
    return [" ".join(rng.choice(words) for _ in range(rng.randint(3, 12))) for _ in range(n)] + STRINGS


def build_llama3_tokenizer(out: Path, vocab_size: int = 700) -> dict:
    """Write out/tokenizer.json and out/tokenizer.model; returns {"n_base": ..., "vocab_size": ...}."""
    tk = pytest.importorskip("tokenizers")
    from tokenizers import Regex, decoders, models, pre_tokenizers, processors, trainers

    tok = tk.Tokenizer(models.BPE(ignore_merges=True))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(META_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus(), trainer=trainer)
    n_base = tok.get_vocab_size()
    tok.add_special_tokens([tk.AddedToken(s, special=True, normalized=False) for s in META_SPECIAL])
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    # Meta's format: rank = id (the trainer numbers merged tokens in the order of their merges)
    unicode_to_byte = {c: b for b, c in _bytes_to_unicode().items()}
    vocab = tok.get_vocab(with_added_tokens=False)
    lines = [base64.b64encode(bytes(unicode_to_byte[c] for c in t)).decode() + f" {i}"
             for t, i in sorted(vocab.items(), key=lambda kv: kv[1])]
    (out / "tokenizer.model").write_text("\n".join(lines) + "\n")
    return {"n_base": n_base, "vocab_size": n_base + len(META_SPECIAL)}


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table (openai/gpt-2, src/encoder.py), written out again here."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


class MetaTokenizer:
    """Meta's llama3 Tokenizer (llama/tokenizer.py), its logic reproduced on tiktoken.Encoding directly:
    the ranks of tokenizer.model, Meta's pattern, the special tokens numbered after the base tokens,
    encode(..., allowed_special=set(), disallowed_special=()) so a special spelling is text."""

    def __init__(self, model_path: Path):
        tiktoken = pytest.importorskip("tiktoken")
        ranks = {}
        for line in Path(model_path).read_text().splitlines():
            if line:
                token, rank = line.split()
                ranks[base64.b64decode(token)] = int(rank)
        self.special_tokens = {t: len(ranks) + i for i, t in enumerate(META_SPECIAL)}
        self.model = tiktoken.Encoding(name=Path(model_path).name, pat_str=META_PATTERN, mergeable_ranks=ranks,
                                       special_tokens=self.special_tokens)
        self.bos_id, self.eos_id = self.special_tokens["<|begin_of_text|>"], self.special_tokens["<|end_of_text|>"]

    def encode(self, s: str, *, bos: bool, eos: bool) -> list[int]:
        t = self.model.encode(s, allowed_special=set(), disallowed_special=())  # (texts here are < 25,000 chars)
        return ([self.bos_id] if bos else []) + t + ([self.eos_id] if eos else [])

    def decode(self, t) -> str:
        return self.model.decode(list(t))

    # ChatFormat (llama/tokenizer.py), written out again
    def encode_header(self, message: dict) -> list[int]:
        return ([self.special_tokens["<|start_header_id|>"]] + self.encode(message["role"], bos=False, eos=False)
                + [self.special_tokens["<|end_header_id|>"]] + self.encode("\n\n", bos=False, eos=False))

    def encode_message(self, message: dict) -> list[int]:
        return (self.encode_header(message) + self.encode(message["content"].strip(), bos=False, eos=False)
                + [self.special_tokens["<|eot_id|>"]])

    def encode_dialog_prompt(self, dialog: list[dict]) -> list[int]:
        tokens = [self.special_tokens["<|begin_of_text|>"]]
        for message in dialog:
            tokens.extend(self.encode_message(message))
        return tokens + self.encode_header({"role": "assistant", "content": ""})
