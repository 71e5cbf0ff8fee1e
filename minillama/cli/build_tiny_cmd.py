"""`minillama build-tiny`: the whole recipe of the shipped tiny model (minillama.course.recipe)."""

import sys
from pathlib import Path

from ..course.paths import corpora_dir, tiny_model_dir


def run(args) -> int:
    from ..course.recipe import build_tiny

    args.out = args.out or str(tiny_model_dir())
    args.corpora = args.corpora or str(corpora_dir())
    info = build_tiny(args.out, args.corpora, steps=args.steps, seed=args.seed, batch_size=args.batch_size,
                      lr=args.lr, work_dir=args.work_dir, command="minillama " + " ".join(sys.argv[1:]))
    print(f"wrote {args.out} ({info['total_bytes'] / 1024**2:.2f} MiB); passkey accuracy "
          f"{info['passkey']['accuracy']:.2f}; see {Path(args.out) / 'MODEL_CARD.md'}")
    return 0


def add_parser(sub) -> None:
    b = sub.add_parser("build-tiny", help="the whole recipe of the shipped tiny model (pre-trains from scratch)")
    b.add_argument("--out", default=None, help="default: the shipped tiny model folder")
    b.add_argument("--corpora", default=None, help="default: the shipped corpora folder")
    b.add_argument("--work-dir", default="runs/tiny-pretrain", help="log.jsonl and training checkpoints")
    b.add_argument("--steps", type=int, default=3000)
    b.add_argument("--batch-size", type=int, default=16)
    b.add_argument("--lr", type=float, default=2e-3)
    b.add_argument("--seed", type=int, default=0)
    b.set_defaults(func=run)
