"""`minillama plan`: which configurations of the course's techniques fit on a GPU (minillama.measuring.plan)."""

from ..config import get_preset
from ..measuring.memory import format_bytes
from ..measuring.plan import METHODS, best_per_method, format_plan, parse_size, plan


def _model_args(args):
    if args.model:
        from ..checkpoints.weights import read_model_args

        return read_model_args(args.model)
    return get_preset(args.preset)


def plan_table(plans: dict, methods) -> str:
    """A markdown table: one row per GPU size, one column per method, each cell the method's best fitting
    configuration with its predicted peak per GPU, or the smallest peak when nothing of that method fits."""
    lines = ["| GPU memory | " + " | ".join(methods) + " |", "|---" * (len(methods) + 1) + "|"]
    for size, rows in plans.items():
        best = {r.method: r for r in best_per_method(rows)}
        cells = []
        for m in methods:
            if m in best:
                cells.append(f"{format_bytes(best[m].peak_bytes)}: {best[m].label()}")
            else:
                low = min((r for r in rows if r.method == m), key=lambda r: r.peak_bytes)
                cells.append(f"does not fit (smallest {format_bytes(low.peak_bytes)}: {low.label()})")
        lines.append(f"| {size} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def run(args) -> int:
    margs = _model_args(args)
    sizes = [s.strip() for s in args.gpu_mem.split(",") if s.strip()] or [args.gpu_mem]
    gpu_mems = [parse_size(s) for s in sizes]  # every size checked before any plan is computed
    methods = tuple(m.strip() for m in args.methods.split(",") if m.strip())
    plans = {s: plan(margs, gpu_mem=g, seq_len=args.seq_len, batch=args.batch, gpus=args.gpus,
                     lora_r=args.lora_r, methods=methods, device=args.device) for s, g in zip(sizes, gpu_mems)}
    source = args.model or f"preset {args.preset}"
    print(f"{source}: {margs.num_params() / 1e9:.2f}B parameters; batch {args.batch} x {args.seq_len} tokens on "
          f"{args.gpus} x {args.gpu_mem} ({args.device})")
    if args.format == "md":
        print(plan_table(plans, methods))
        return 0
    for (size, rows), gpu_mem in zip(plans.items(), gpu_mems):
        print(("" if len(plans) == 1 else f"\n{size}:\n") + format_plan(rows, gpu_mem=gpu_mem, top=args.top))
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("plan", help="will it fit? the cheapest technique settings for a GPU (memory model)")
    p.add_argument("--preset", default="llama2-7b",
                   help="tiny, llama2-7b, llama2-13b, llama3-8b, llama3.2-1b, llama3.2-3b, llama3.1-8b")
    p.add_argument("--model", default=None, help="read the shape from a checkpoint's config instead")
    p.add_argument("--gpu-mem", required=True, help="memory per GPU, e.g. 24GiB, 80GB; or several: 24GiB,40GiB,80GiB")
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--batch", type=int, default=4, help="rows per optimizer step, over all GPUs")
    p.add_argument("--gpus", type=int, default=1)
    p.add_argument("--lora-r", type=int, default=16)
    p.add_argument("--methods", default=",".join(METHODS), help="any of full,lora,qlora")
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"),
                   help="cuda reserves 1 GiB for the context and 10%% for fragmentation; cpu reserves nothing")
    p.add_argument("--top", type=int, default=8, help="rows to print")
    p.add_argument("--format", default="text", choices=("text", "md"),
                   help="md: one table row per --gpu-mem size, the best configuration of each method")
    p.set_defaults(func=run)
