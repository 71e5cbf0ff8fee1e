"""`minillama longctx`: the long-context sweep of the tiny model (minillama.course.context_extension)."""


def run(args) -> int:
    from ..course.context_extension import sweep_from_args

    sweep_from_args(args)
    return 0


def add_parser(sub) -> None:
    from ..course.context_extension import add_arguments

    lc = sub.add_parser("longctx", help="the long-context sweep: tiny from 256 to 1,024 tokens (scalings x LoRA)")
    add_arguments(lc)
    lc.set_defaults(func=run)
