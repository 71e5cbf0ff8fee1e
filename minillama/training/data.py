"""Data for training: plain-text corpora packed into rows (pre-training, long context), and
instruction data in Alpaca's format for supervised fine-tuning (SFT).

Plain text (pack_documents):

Every document becomes `[BOS] ids [EOS]`. A document longer than one row is cut into consecutive
pieces of seq_len + 1 tokens; pieces are shuffled and packed in that order (next-fit) into rows of seq_len + 1
tokens (a row's inputs are tokens[:-1], its targets tokens[1:]). Unused room at the end of a row is
padded and its targets set to -100, so no loss is computed on padding. As in GPT-style
pre-training, a piece may attend to the piece packed before it in the same row, and the last token of
one piece predicts the first of the next (BOS, when a document starts there).
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import torch

IGNORE_INDEX = -100


def read_text(path) -> str:
    """A data file's whole text, decoded as UTF-8; a clear error naming the file otherwise."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"Data file {path} does not exist.")
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not UTF-8 text (byte {e.object[e.start]:#04x} at offset {e.start}): save it "
                         f"as UTF-8.") from None


def read_jsonl_texts(path) -> list[str]:
    """The "text" field of every line of a JSONL file."""
    texts = []
    for i, line in enumerate(read_text(path).split("\n"), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}, line {i}: not valid JSON ({e.msg}).") from None
        if not isinstance(row, dict) or not isinstance(row.get("text"), str):
            raise ValueError(f"{path}, line {i}: expected an object with a string field 'text'.")
        texts.append(row["text"])
    return texts


def pack_documents(docs: Iterable[Sequence[int]], seq_len: int, pad_id: int = 0,
                   seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Pack token lists into rows. Returns (inputs, targets), both [n_rows, seq_len] int64."""
    width = seq_len + 1
    pieces = [list(d[i:i + width]) for d in docs for i in range(0, len(d), width) if len(d[i:i + width]) > 1]
    random.Random(seed).shuffle(pieces)
    rows: list[list[int]] = [[]]
    for piece in pieces:  # next-fit: start a new row when the piece does not fit in the current one
        if len(rows[-1]) + len(piece) > width:
            rows.append([])
        rows[-1].extend(piece)
    order = list(range(len(rows)))
    random.Random(seed + 1).shuffle(order)
    data = torch.full((len(rows), width), pad_id, dtype=torch.long)
    valid = torch.zeros((len(rows), width), dtype=torch.bool)
    for out_i, r in enumerate(order):
        data[out_i, : len(rows[r])] = torch.tensor(rows[r])
        valid[out_i, : len(rows[r])] = True
    inputs, targets = data[:, :-1].clone(), data[:, 1:].clone()
    targets[~valid[:, 1:]] = IGNORE_INDEX
    return inputs, targets


def batches(data, batch_size: int, seed: int, start_step: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Endless shuffled mini-batches of `data` (packed rows as a tuple (inputs, targets), or an
    SFTDataset), reshuffled every epoch; deterministic from (seed, step), so a resumed run sees
    exactly the batches the uninterrupted run would have seen."""
    data = as_dataset(data)
    n = len(data)
    per_epoch = max(1, n // batch_size)
    step = start_step
    while True:
        epoch, k = divmod(step, per_epoch)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100003 + epoch))
        yield data.batch(perm[k * batch_size:(k + 1) * batch_size].tolist())
        step += 1


def as_dataset(data):
    """Packed rows given as (inputs, targets) become a PackedRows; datasets pass through."""
    if isinstance(data, (tuple, list)) and len(data) == 2 and all(isinstance(t, torch.Tensor) for t in data):
        return PackedRows(*data)
    if hasattr(data, "batch") and hasattr(data, "subset") and hasattr(data, "__len__"):
        return data
    raise TypeError("Training data must be (inputs, targets) tensors or an SFTDataset.")


class PackedRows:
    """Fixed-length rows (inputs, targets) [n, seq_len], as pack_documents returns them."""

    def __init__(self, inputs: torch.Tensor, targets: torch.Tensor):
        if inputs.shape != targets.shape or inputs.dim() != 2:
            raise ValueError(f"inputs {tuple(inputs.shape)} and targets {tuple(targets.shape)} must be the same [n, T].")
        self.inputs, self.targets = inputs, targets

    def __len__(self) -> int:
        return self.inputs.shape[0]

    def batch(self, idx: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        return self.inputs[idx], self.targets[idx]

    def subset(self, idx: list[int]) -> "PackedRows":
        return PackedRows(self.inputs[idx], self.targets[idx])


# ---- instruction data (SFT) ----------------------------------------------------------------------
# Stanford Alpaca's prompt template (tatsu-lab/stanford_alpaca, train.py), with and without an input.
ALPACA_PROMPT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n")
ALPACA_PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n")


def alpaca_prompt(example: dict) -> str:
    """The prompt of one example (everything before the response)."""
    template = ALPACA_PROMPT if example.get("input") else ALPACA_PROMPT_NO_INPUT
    return template.format(instruction=example["instruction"], input=example.get("input", ""))


def read_alpaca(path) -> list[dict]:
    """Alpaca-format examples from a JSON list or a JSONL file: {"instruction", "input" (optional), "output"}.

    Every row is checked: a clear error names the file, the row (1-based) and the field.
    """
    text = read_text(path)
    if text.lstrip().startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not a valid JSON list ({e.msg} at line {e.lineno}).") from None
        numbered = list(enumerate(rows, 1))
        what = "row"
    else:
        numbered = []
        for i, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                numbered.append((i, json.loads(line)))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}, line {i}: not valid JSON ({e.msg}).") from None
        what = "line"
    if not numbered:
        raise ValueError(f"{path} holds no examples: expected a JSON list or JSONL of "
                         "{{\"instruction\", \"input\", \"output\"}} objects.")
    out = []
    for i, row in numbered:
        if not isinstance(row, dict):
            raise ValueError(f"{path}, {what} {i}: expected an object with 'instruction' and 'output', "
                             f"got {type(row).__name__}.")
        for key in ("instruction", "output"):
            if not isinstance(row.get(key), str) or not row[key].strip():
                raise ValueError(f"{path}, {what} {i}: field {key!r} is missing or empty "
                                 f"(expected a non-empty string).")
        if not isinstance(row.get("input", ""), str):
            raise ValueError(f"{path}, {what} {i}: field 'input' must be a string, "
                             f"got {type(row['input']).__name__}.")
        out.append({"instruction": row["instruction"], "input": row.get("input", ""), "output": row["output"]})
    return out


def chat_message(example: dict) -> str:
    """The user's message of one example in a chat format: the instruction, then its input after a blank line."""
    return example["instruction"] + (f"\n\n{example['input']}" if example.get("input") else "")


def sft_ids(example: dict, tokenizer) -> tuple[list[int], list[int]]:
    """(prompt ids, response ids) of one example, in the model's own format (tokenizer.chat_format):

    - Llama-2 (sentencepiece): [BOS] + Alpaca's prompt, then the output + [EOS];
    - Llama-3: Meta's chat format with the example as the user's message, ending with the open assistant
      header (tokenizer.encode_chat), then the output (stripped, as Meta's ChatFormat strips) + <|eot_id|>:
      prompt + response are exactly encode_dialog_prompt's ids of that user/assistant exchange, up to its end
      of turn, and the model learns to end its turn, where generation stops.
    The response is encoded on its own so the prompt/response boundary is a token boundary.
    """
    if getattr(tokenizer, "chat_format", "llama2") == "llama3":
        prompt = tokenizer.encode_chat([{"role": "user", "content": chat_message(example)}])
        return prompt, tokenizer.encode(example["output"].strip(), bos=False) + [tokenizer.special_tokens["<|eot_id|>"]]
    prompt = [tokenizer.bos_id] + tokenizer.encode(alpaca_prompt(example), bos=False)
    return prompt, tokenizer.encode(example["output"], bos=False) + [tokenizer.eos_id]


def tokenize_sft(examples: Sequence[dict], tokenizer, max_len: int, on_long: str = "truncate"):
    """prompt + response per example (`sft_ids`: the model's own format), with labels: -100 on the prompt
    (not learned), the token ids on the response and its end token (learned).

    max_len counts every token of the sequence. A longer example is cut to max_len (on_long="truncate",
    counted in stats["truncated"]; one whose prompt leaves no response token is dropped and counted in
    stats["dropped"]) or refused (on_long="error"). Returns (SFT examples [(ids, labels)], stats).
    """
    if on_long not in ("truncate", "error"):
        raise ValueError(f"on_long={on_long!r}: expected 'truncate' or 'error'.")
    if max_len < 2:
        raise ValueError(f"max_len={max_len}: expected at least 2 tokens.")
    out, stats = [], {"examples": len(examples), "truncated": 0, "dropped": 0}
    for i, ex in enumerate(examples):
        prompt, response = sft_ids(ex, tokenizer)
        ids = prompt + response
        labels = [IGNORE_INDEX] * len(prompt) + response
        if len(ids) > max_len:
            if on_long == "error":
                raise ValueError(f"Example {i + 1} has {len(ids)} tokens, more than max_len={max_len} "
                                 "(raise --max-len, or truncate).")
            ids, labels = ids[:max_len], labels[:max_len]
            if all(t == IGNORE_INDEX for t in labels[1:]):
                stats["dropped"] += 1
                continue
            stats["truncated"] += 1
        out.append((ids, labels))
    if not out:
        raise ValueError(f"No example is left to train on (max_len={max_len} cuts every response away).")
    return out, stats


class SFTDataset:
    """Tokenised SFT examples; batch() pads to the longest example of the batch (right padding).

    Inputs are ids[:-1] padded with pad_id, targets labels[1:] padded with -100: with right padding and
    causal attention no real token ever sees a pad, so no attention mask is needed. Examples are not
    packed together (one example per row), so attention never crosses examples.
    """

    def __init__(self, examples: Sequence[tuple[list[int], list[int]]], pad_id: int = 0):
        if not examples:
            raise ValueError("SFTDataset needs at least one example.")
        self.examples, self.pad_id = list(examples), pad_id

    def __len__(self) -> int:
        return len(self.examples)

    def batch(self, idx: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        return collate([self.examples[i] for i in idx], self.pad_id)

    def subset(self, idx: list[int]) -> "SFTDataset":
        return SFTDataset([self.examples[i] for i in idx], self.pad_id)

    def target_tokens(self) -> int:
        return sum(sum(t != IGNORE_INDEX for t in labels[1:]) for _, labels in self.examples)


def collate(examples: Sequence[tuple[list[int], list[int]]], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad (ids, labels) pairs to one [B, T] batch: (inputs, targets), T = longest len(ids) - 1."""
    width = max(len(ids) for ids, _ in examples) - 1
    x = torch.full((len(examples), width), pad_id, dtype=torch.long)
    y = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    for i, (ids, labels) in enumerate(examples):
        n = len(ids) - 1
        x[i, :n] = torch.tensor(ids[:-1])
        y[i, :n] = torch.tensor(labels[1:])
    return x, y


def load_sft(path, tokenizer, max_len: int, on_long: str = "truncate", pad_id: int = 0):
    """read_alpaca + tokenize_sft: (SFTDataset, stats)."""
    examples, stats = tokenize_sft(read_alpaca(path), tokenizer, max_len, on_long)
    return SFTDataset(examples, pad_id), stats


def split_held_out(data, fraction: float, seed: int = 0):
    """(train, held-out) split of an SFTDataset or packed rows, by a fixed shuffle."""
    data = as_dataset(data)
    n_held = int(round(len(data) * fraction))
    if not 0 < n_held < len(data):
        raise ValueError(f"A held-out fraction of {fraction} of {len(data)} items leaves no training or no held-out item.")
    perm = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed)).tolist()
    return data.subset(sorted(perm[n_held:])), data.subset(sorted(perm[:n_held]))
