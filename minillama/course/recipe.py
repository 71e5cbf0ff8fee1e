"""The recipe of the shipped tiny model: corpora -> tokenizer -> pre-training -> evaluation -> card.

    minillama build-tiny --out data/tiny            # the whole recipe (about 40 min on 2 CPU cores)

Each step is also a command of its own (`minillama corpora`, `minillama tokenizer`,
`minillama pretrain`, `minillama eval ...`), and this module is the one place they are chained.
"""

from __future__ import annotations

import io
import json
import platform
import time
from pathlib import Path
from typing import Optional

import torch

from ..config import get_preset
from ..evaluation.passkey import passkey_training_text
from ..files import atomic_write_bytes, atomic_write_text
from ..tokenizer import Tokenizer
from ..training.data import pack_documents, read_jsonl_texts
from .corpora import write_corpora

# Llama-2's tokenizer settings: BPE with byte fallback, digits split, BOS=1, EOS=2, no pad. Identity
# normalisation and kept whitespace make decode(encode(text)) == text for the corpora (newlines too).
SPM_SETTINGS = dict(model_type="bpe", byte_fallback=True, split_digits=True, unk_id=0, bos_id=1, eos_id=2,
                    pad_id=-1, character_coverage=1.0, normalization_rule_name="identity",
                    remove_extra_whitespaces=False, max_sentence_length=1 << 16, num_threads=1,
                    shuffle_input_sentence=False, minloglevel=2)


def train_tokenizer(texts: list[str], out_path, vocab_size: int = 4096) -> Tokenizer:
    """Train a sentencepiece BPE model on `texts` (one document per item, split into lines)."""
    import sentencepiece as spm

    if vocab_size < 260:
        raise ValueError(f"vocab_size={vocab_size} is too small: byte fallback alone needs 259 ids.")
    lines = [line for t in texts for line in t.split("\n") if line]
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=buf, vocab_size=vocab_size,
                                   **SPM_SETTINGS)
    return Tokenizer(atomic_write_bytes(out_path, buf.getvalue()))


def lm_datasets(corpora_dir, tok: Tokenizer, seq_len: int, seed: int = 0):
    """Packed (inputs, targets) for training and per-corpus validation rows."""
    corpora_dir = Path(corpora_dir)
    enc = lambda texts: [tok.encode(t, bos=True, eos=True) for t in texts]  # noqa: E731
    train_docs = enc(read_jsonl_texts(corpora_dir / "stories_train.jsonl"))
    train_docs += enc(read_jsonl_texts(corpora_dir / "passkey_train.jsonl"))
    train_docs += enc(read_jsonl_texts(corpora_dir / "almanac_train.jsonl"))
    val_passkey = [passkey_training_text(7_000_000 + i, 4 + i % 37, (i % 5) / 4) for i in range(64)]
    val = {"stories": pack_documents(enc(read_jsonl_texts(corpora_dir / "stories_val.jsonl")), seq_len, seed=seed),
           "passkey": pack_documents(enc(val_passkey), seq_len, seed=seed),
           "almanac": pack_documents(enc(read_jsonl_texts(corpora_dir / "almanac_val.jsonl")), seq_len, seed=seed)}
    return pack_documents(train_docs, seq_len, seed=seed), val


def _card_recipe(info: dict) -> str:
    """The model card's first half: what the model is, its shape and how it was made."""
    a = info["args"]
    return f"""# The minillama tiny model

A {info['n_params']:,}-parameter LLaMA-2 (Meta's architecture: RMSNorm, RoPE, grouped-query attention,
SwiGLU) pre-trained from scratch by this repo on its own synthetic corpora, so that every notebook
runs offline on a laptop CPU. It is a teaching model: it knows simple stories, the passkey game and
an almanac of an invented world (other years' winners of the awards that the LoRA notebook teaches,
and the countries whose capitals, animals and mountains are the knowledge-injection controls),
nothing else.

## Shape

| dim | n_layers | n_heads | n_kv_heads | ffn width | vocab | context (max_seq_len) | rope_theta |
| --- | --- | --- | --- | --- | --- | --- | --- |
| {a['dim']} | {a['n_layers']} | {a['n_heads']} | {a['n_kv_heads']} | {info['ffn_hidden_dim']} | {a['vocab_size']} | {a['max_seq_len']} | {a['rope_theta']} |

Files: `config.json`, `model.safetensors` ({info['weights_bytes'] / 1024**2:.2f} MiB, fp32),
`tokenizer.model` ({info['tokenizer_bytes'] / 1024:.0f} KiB), this card. Total {info['total_bytes'] / 1024**2:.2f} MiB.

## Recipe

Command (the whole recipe, from nothing): `{info['command']}`

1. Corpora: `minillama corpora --out data/corpora --seed {info['seed']}` (stories with long-range references,
   passkey documents, the almanac; see `minillama/course/corpora/`).
2. Tokenizer: sentencepiece BPE, {a['vocab_size']} pieces, byte fallback, digits split, BOS=1, EOS=2, no pad,
   trained on the training stories, passkey documents and almanac.
3. Pre-training: documents as `[BOS] text [EOS]`, packed into rows of {a['max_seq_len']} tokens;
   AdamW (betas {info['train']['beta1']}, {info['train']['beta2']}, weight decay {info['train']['weight_decay']} on matrices),
   lr {info['train']['lr']} with {info['train']['warmup_steps']} warmup steps and cosine decay to
   {info['train']['min_lr_ratio']}x, batch {info['train']['batch_size']} rows, {info['train']['steps']} steps,
   gradient clipping {info['train']['grad_clip']}, fp32, seed {info['seed']}.

| quantity | value |
| --- | --- |
| tokens seen (rows x {a['max_seq_len']}) | {info['tokens_seen']:,} |
| training rows (packed) | {info['train_rows']:,} ({info['train_tokens']:,} target tokens per epoch) |
| wall time of pre-training | {info['train_seconds'] / 60:.1f} min |
| wall time of the whole recipe | {info['total_seconds'] / 60:.1f} min |
| hardware | {info['hardware']} |
| torch | {info['torch']} |
| final training loss | {info['final_loss']:.3f} |
| validation loss, stories | {info['val']['stories']:.3f} (perplexity {info['val_ppl']['stories']:.2f}) |
| validation loss, passkey documents | {info['val']['passkey']:.3f} (perplexity {info['val_ppl']['passkey']:.2f}) |
| validation loss, almanac | {info['val']['almanac']:.3f} (perplexity {info['val_ppl']['almanac']:.2f}) |

"""


def _card_results(info: dict) -> str:
    """The model card's second half: perplexity by context, passkey accuracy, samples."""
    ppl_rows = "\n".join(f"| {r['context']} | {r['ppl']:.3f} | {r['tokens']} |" for r in info["ppl"])
    pk = info["passkey"]
    depth_rows = "\n".join(f"| {d} | {acc:.2f} |" for d, acc in pk["per_depth"].items())
    samples = "\n\n".join(f"**Prompt:** `{p}`\n\n> " + s.replace("\n", "\n> ") for p, s in info["samples"])
    return f"""## What it shows (measured by the recipe)

### Perplexity on held-out stories against context length

`minillama eval ppl --model data/tiny --data stories --context 64,128,256,512,1024`
(chunked: the same {info['ppl'][0]['tokens']} tokens, the first {info['ppl_scored']} of each of the
{info['ppl'][0]['docs']} long held-out stories, scored in windows of the given length).

| context | perplexity | tokens scored |
| --- | --- | --- |
{ppl_rows}

Up to the trained 256 tokens, longer windows lower perplexity: the stories refer back to facts
introduced early, and the model uses them. Beyond 256 tokens, without any RoPE scaling, the model
meets positions it never saw and perplexity degrades: the baseline that the long-context notebook fixes.

### Passkey retrieval within the context

`minillama eval passkey --model data/tiny --context {pk['context']} --trials {pk['trials']}`:
{pk['n_filler']} filler sentences ({pk['prompt_tokens']} prompt tokens), key at 5 depths.

| depth | accuracy |
| --- | --- |
{depth_rows}
| **overall** | **{pk['accuracy']:.2f}** |

### Samples (greedy, 60 new tokens)

{samples}
"""


def write_model_card(out_dir, info: dict) -> Path:
    """MODEL_CARD.md from the recipe's measured figures."""
    return atomic_write_text(Path(out_dir) / "MODEL_CARD.md", _card_recipe(info) + _card_results(info))


def build_tiny(out_dir="data/tiny", corpora_dir="data/corpora", *, steps: int = 3000, seed: int = 0,
               batch_size: int = 16, lr: float = 2e-3, work_dir="runs/tiny-pretrain",
               command: Optional[str] = None, progress: bool = True) -> dict:
    """Run the whole recipe and write out_dir/{config.json, model.safetensors, tokenizer.model, MODEL_CARD.md}."""
    from .. import create_model, generate, save_model
    from ..evaluation.evaluate import passkey_accuracy, perplexity
    from ..training import TrainConfig, evaluate_loss, train

    t_start = time.perf_counter()
    torch.manual_seed(seed)
    write_corpora(str(corpora_dir), seed=seed)
    corpora_dir = Path(corpora_dir)
    args = get_preset("tiny")
    texts = [t for name in ("stories_train", "passkey_train", "almanac_train")
             for t in read_jsonl_texts(corpora_dir / f"{name}.jsonl")]
    work_dir = Path(work_dir)
    tok = train_tokenizer(texts, work_dir / "tokenizer.model", vocab_size=args.vocab_size)
    (train_x, train_y), val = lm_datasets(corpora_dir, tok, args.max_seq_len, seed=seed)

    model = create_model(args, seed=seed)
    cfg = TrainConfig(steps=steps, batch_size=batch_size, lr=lr, seed=seed, eval_every=max(1, steps // 8),
                      save_every=max(1, steps // 4))
    t0 = time.perf_counter()
    log = train(model, (train_x, train_y), val, cfg, work_dir, tokenizer=tok, progress=progress)
    train_seconds = time.perf_counter() - t0
    model.eval()
    save_model(model, out_dir, tokenizer=tok)

    val_loss = {k: evaluate_loss(model, vx, vy, 32, progress=progress, desc=f"evaluate {k}")
                for k, (vx, vy) in val.items()}
    story_docs = [tok.encode(t) for t in read_jsonl_texts(corpora_dir / "stories_val.jsonl")]
    model.set_max_seq_len(1024)  # evaluate beyond the trained 256 without RoPE scaling
    ppl = [perplexity(model, story_docs, c, scored_tokens=1024, progress=progress) for c in (64, 128, 256, 512, 1024)]
    model.set_max_seq_len(args.max_seq_len)
    pk = passkey_accuracy(model, tok, context=args.max_seq_len, trials=100, progress=progress)
    prompts = ["Once upon a time, there was a girl called Lily.", "One day, Tom went for a walk to the"]
    samples = [(p, tok.decode(tok.encode(p, bos=False) + generate(model, tok.encode(p), 60)[0])) for p in prompts]

    out_dir = Path(out_dir)
    files = ["config.json", "model.safetensors", "tokenizer.model"]
    info = {
        "args": args.to_dict(), "ffn_hidden_dim": args.ffn_hidden_dim,
        "n_params": sum(p.numel() for p in model.parameters()), "seed": seed,
        "command": command or f"minillama build-tiny --out {out_dir} --steps {steps} --seed {seed}",
        "train": {k: getattr(cfg, k) for k in ("steps", "batch_size", "lr", "warmup_steps", "min_lr_ratio",
                                                 "weight_decay", "beta1", "beta2", "grad_clip")},
        "tokens_seen": log[-1]["tokens"], "train_rows": train_x.shape[0],
        "train_tokens": int((train_y != -100).sum()), "train_seconds": train_seconds,
        "hardware": f"{platform.machine()} CPU, {torch.get_num_threads()} threads"
                    + (f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""),
        "torch": torch.__version__, "final_loss": log[-1]["loss"], "val": val_loss,
        "val_ppl": {k: float(torch.tensor(v).exp()) for k, v in val_loss.items()},
        "ppl": ppl, "ppl_scored": 1024, "passkey": pk, "samples": samples,
        "weights_bytes": (out_dir / "model.safetensors").stat().st_size,
        "tokenizer_bytes": (out_dir / "tokenizer.model").stat().st_size,
    }
    info["total_seconds"] = time.perf_counter() - t_start
    write_model_card(out_dir, info | {"total_bytes": 0})
    info["total_bytes"] = sum((out_dir / f).stat().st_size for f in files + ["MODEL_CARD.md"])
    write_model_card(out_dir, info)
    atomic_write_text(work_dir / "recipe.json", json.dumps(info, indent=2, default=str))
    return info
