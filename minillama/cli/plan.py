"""`minillama plan`: which configurations of the course's techniques fit on a GPU (minillama.measuring.plan)."""

from ..config import get_preset
from ..measuring.plan import METHODS, format_plan, parse_size, plan


def _model_args(args):
    if args.model:
        from ..checkpoints.weights import read_model_args

        return read_model_args(args.model)
    return get_preset(args.preset)


def cmd_plan(args) -> int:
    margs = _model_args(args)
    gpu_mem = parse_size(args.gpu_mem)
    methods = tuple(m.strip() for m in args.methods.split(",") if m.strip())
    rows = plan(margs, gpu_mem=gpu_mem, seq_len=args.seq_len, batch=args.batch, gpus=args.gpus,
                lora_r=args.lora_r, methods=methods, device=args.device)
    source = args.model or f"preset {args.preset}"
    print(f"{source}: {margs.num_params() / 1e9:.2f}B parameters; batch {args.batch} x {args.seq_len} tokens on "
          f"{args.gpus} x {args.gpu_mem} ({args.device})")
    print(format_plan(rows, gpu_mem=gpu_mem, top=args.top))
    return 0


def add_plan_parser(sub) -> None:
    p = sub.add_parser("plan", help="will it fit? the cheapest technique settings for a GPU (memory model)")
    p.add_argument("--preset", default="llama2-7b",
                   help="tiny, llama2-7b, llama2-13b, llama3-8b, llama3.2-1b, llama3.2-3b, llama3.1-8b")
    p.add_argument("--model", default=None, help="read the shape from a checkpoint's config instead")
    p.add_argument("--gpu-mem", required=True, help="memory per GPU, e.g. 24GiB, 80GB")
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--batch", type=int, default=4, help="rows per optimizer step, over all GPUs")
    p.add_argument("--gpus", type=int, default=1)
    p.add_argument("--lora-r", type=int, default=16)
    p.add_argument("--methods", default=",".join(METHODS), help="any of full,lora,qlora")
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"),
                   help="cuda reserves 1 GiB for the context and 10%% for fragmentation; cpu reserves nothing")
    p.add_argument("--top", type=int, default=8, help="rows to print")
    p.set_defaults(func=cmd_plan)
