"""`minillama demo`: the README's quick-start job: load the shipped tiny model, check it, generate, evaluate."""

import time

import torch

from ..course.paths import corpora_dir, tiny_model_dir
from .common import pick_device, ppl_table


def run(args) -> int:
    """The main job of the README: load the shipped tiny model, check it, generate, and evaluate."""
    from .. import create_model, generate, get_preset, load_model, load_tokenizer
    from ..training.data import read_jsonl_texts
    from ..evaluation.evaluate import passkey_accuracy, perplexity

    from .. import __version__

    device = pick_device(args.device)
    print(f"minillama {__version__} | torch {torch.__version__} | device {device} (`minillama doctor` for more)")
    tiny = tiny_model_dir()
    shipped = (tiny / "config.json").exists()
    if shipped:
        model = load_model(tiny, device=device)
        tok = load_tokenizer(tiny, vocab_size=model.args.vocab_size)
        source = f"shipped tiny model ({tiny}, see MODEL_CARD.md)"
    else:
        model, tok = create_model(get_preset("tiny"), device=device, seed=0), None
        source = "randomly initialised 'tiny' preset (data/tiny is missing: run `minillama build-tiny`)"
    a = model.args
    n = sum(p.numel() for p in model.parameters())
    print(f"model: {source}")
    print(f"  dim={a.dim} n_layers={a.n_layers} n_heads={a.n_heads} n_kv_heads={a.n_kv_heads} "
          f"ffn={a.ffn_hidden_dim} vocab={a.vocab_size} max_seq_len={a.max_seq_len}")
    print(f"  parameters: {n:,} ({n * 4 / 1024**2:.1f} MiB in fp32)")

    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, a.vocab_size, (2, min(64, a.max_seq_len)), generator=g).to(device)
    with torch.no_grad():
        sdpa = model(tokens)
        model.set_attn_impl("math")
        math_ = model(tokens)
        model.set_attn_impl(a.attn_impl)
    print(f"  SDPA vs explicit-softmax attention: max |diff| of logits = {(sdpa - math_).abs().max().item():.2e}")

    prompt = "Once upon a time, there was a girl called Lily."
    ids = tok.encode(prompt) if tok else [1, 5, 9, 13]
    print(f"\ngreedy generation, {args.max_new_tokens} new tokens:")
    if tok:
        print(prompt, end="", flush=True)
    t0 = time.perf_counter()
    out = generate(model, ids, args.max_new_tokens, eos_id=tok.eos_id if tok else None)[0]
    dt = time.perf_counter() - t0
    print(tok.decode(ids[1:] + out)[len(prompt):] if tok else out)
    print(f"  ({len(out)} tokens in {dt:.2f} s, {len(out) / dt:.0f} tokens/s, pre-allocated KV cache)")

    if shipped:
        texts = read_jsonl_texts(corpora_dir() / "stories_val.jsonl")
        docs = [d for d in (tok.encode(t) for t in texts) if len(d) > 512][:24]
        model.set_max_seq_len(512)
        rows = [perplexity(model, docs, c, scored_tokens=512) for c in (64, 128, 256, 512)]
        model.set_max_seq_len(a.max_seq_len)
        print(f"\nperplexity of held-out stories by context length (the same first 512 tokens of "
              f"{rows[0]['docs']} long stories):")
        print("\n".join(ppl_table(rows, a.max_seq_len)))
        pk = passkey_accuracy(model, tok, context=a.max_seq_len, trials=20)
        print(f"passkey retrieval at {a.max_seq_len} tokens: {pk['accuracy']:.2f} over {pk['trials']} trials")
    print("\ndemo: OK")
    return 0


def add_parser(sub) -> None:
    d = sub.add_parser("demo", help="the quick-start job: load the tiny model, check it, generate")
    d.add_argument("--device", default="auto")
    d.add_argument("--max-new-tokens", type=int, default=60)
    d.set_defaults(func=run)
