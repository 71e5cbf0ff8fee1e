"""`minillama corpora`: write the course's synthetic corpora (minillama.course.corpora)."""

from ..course.paths import corpora_dir


def run(args) -> int:
    from ..course.corpora import main

    return main(["--out", args.out or str(corpora_dir()), "--seed", str(args.seed)]) or 0


def add_parser(sub) -> None:
    c = sub.add_parser("corpora", help="write the synthetic corpora (deterministic from --seed)")
    c.add_argument("--out", default=None, help="default: the shipped corpora folder")
    c.add_argument("--seed", type=int, default=0)
    c.set_defaults(func=run)
