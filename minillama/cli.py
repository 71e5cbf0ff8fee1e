"""The `minillama` command line: `minillama doctor | generate | demo`."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Optional

import torch

REPO_DATA = Path(__file__).resolve().parent.parent / "data"
TINY_DIR = REPO_DATA / "tiny"


def _device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def cmd_doctor(args) -> int:
    from .doctor import main

    return main()


def cmd_generate(args) -> int:
    from . import generate, load_model, load_tokenizer

    model = load_model(args.model, device=_device(args.device), dtype=args.dtype)
    tok = load_tokenizer(args.tokenizer or args.model, vocab_size=model.args.vocab_size)
    prompt = tok.encode(args.prompt, bos=True)
    print(args.prompt, end="", flush=True)
    pieces: list[int] = []

    def stream(row: int, token: int) -> None:  # print the text as it grows (decode the whole for spacing)
        before = tok.decode(pieces)
        pieces.append(token)
        print(tok.decode(pieces)[len(before):], end="", flush=True)

    generate(model, prompt, args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
             eos_id=tok.eos_id, seed=args.seed, stream=stream)
    print()
    return 0


def cmd_demo(args) -> int:
    """The main job of the README: a first look at the model on this machine."""
    from . import create_model, generate, get_preset, load_model
    from .doctor import report

    device = _device(args.device)
    info = dict(report())
    print(f"minillama {info['minillama']} | torch {info['torch']} | device {device}")
    if (TINY_DIR / "config.json").exists():
        model = load_model(TINY_DIR, device=device)
        source = f"shipped tiny model ({TINY_DIR})"
    else:
        model = create_model(get_preset("tiny"), device=device, seed=0)
        source = "randomly initialised 'tiny' preset (the pre-trained tiny model is not shipped yet)"
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

    prompts = [[1, 5, 9, 13], [1, 7]]
    for mode in ("prealloc", "concat"):
        t0 = time.perf_counter()
        out = generate(model, prompts, args.max_new_tokens, cache_mode=mode)
        dt = time.perf_counter() - t0
        print(f"  greedy generation, {mode:>8} KV cache: {sum(map(len, out))} tokens in {dt:.2f} s "
              f"({sum(map(len, out)) / dt:.0f} tokens/s); first ids {out[0][:8]}")
    print("demo: OK")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="minillama", description="minillama: LLaMA-2 from scratch, fine-tuned on one GPU.")
    sub = p.add_subparsers(dest="command", required=True)

    sub.add_parser("doctor", help="print the environment (paste it into bug reports)").set_defaults(func=cmd_doctor)

    g = sub.add_parser("generate", help="continue a prompt with a checkpoint (native, HF or Meta)")
    g.add_argument("--model", required=True, help="checkpoint directory")
    g.add_argument("--tokenizer", help="tokenizer.model or its directory (default: the model directory)")
    g.add_argument("--prompt", required=True)
    g.add_argument("--max-new-tokens", type=int, default=64)
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    g.add_argument("--dtype", default=None, help="fp32, fp16 or bf16 (default: as stored)")
    g.set_defaults(func=cmd_generate)

    d = sub.add_parser("demo", help="the quick-start job: load the tiny model, check it, generate")
    d.add_argument("--device", default="auto")
    d.add_argument("--max-new-tokens", type=int, default=32)
    d.set_defaults(func=cmd_demo)
    return p


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"minillama {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
