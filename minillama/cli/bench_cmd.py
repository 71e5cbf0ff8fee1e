"""`minillama bench`: a grid of configurations measured side by side (minillama.measuring.bench), or with
--compare hf each row through minillama and through transformers + PEFT (minillama.measuring.compare)."""

from ..course.paths import tiny_model_dir
from .common import check_positive, pick_device


def run_compare_hf(args) -> int:
    """bench --compare hf: every row through minillama and through transformers + PEFT, side by side."""
    from ..config import get_preset
    from ..measuring.compare import Settings, format_compare, run_compare

    if args.model is not None:
        raise ValueError("--compare hf builds both models with the same random weights; drop --model PATH.")
    get_preset(args.preset)  # an unknown preset fails here, with the list of known ones
    keys = ("batch", "seq_len", "long_seq_len", "new_tokens", "repeats")
    check_positive(args, *keys)
    sizes = {k: getattr(args, k) for k in keys if getattr(args, k) is not None}
    s = Settings.defaults(args.preset, pick_device(args.device), dtype=args.dtype, compile_hf=args.compile_hf,
                          **sizes)
    rows = run_compare(s, args.rows, out_dir=args.out)
    print()
    print(format_compare(rows, "md", settings=s))
    print(f"\nwrote {args.out}/results.json, results.csv, table.md, speed.png, memory.png")
    return 0


def run(args) -> int:
    from ..measuring.bench import format_effects, format_table, model_factory, run_grid, technique_effects

    if args.compare:
        return run_compare_hf(args)
    if args.compile_hf:
        raise ValueError("--compile-hf is for --compare hf (its *-compiled rows); the grid runs minillama eager.")
    device = pick_device(args.device)
    path = args.model
    if path is None and args.preset == "tiny" and not args.random_weights:
        path = str(tiny_model_dir())
    if path is None and not args.random_weights:
        raise ValueError(f"--preset {args.preset} needs --model PATH (its weights) or --random-weights.")
    make = model_factory(args.preset, model_path=path, random_weights=args.random_weights, device=device,
                         dtype=args.dtype)
    repeats = 3 if args.repeats is None else args.repeats
    rows = run_grid(make, args.grid, preset=args.preset, out_dir=args.out, repeats=repeats)
    print()
    print(format_table(rows, "md"))
    effects = technique_effects(rows)
    if effects:
        print("\nWhat each technique does (median ratio on/off over pairs of rows that differ only in it):\n")
        print(format_effects(effects))
    print(f"\nwrote {args.out}/results.json, results.csv, table.md, memory.png, runtime.png, flops.png")
    return 0


def add_parser(sub) -> None:
    m = sub.add_parser("bench", help="measure a grid of configurations (memory by category, time, FLOPs)")
    m.add_argument("--preset", default="tiny", help="tiny, llama2-7b, llama2-13b, llama3-8b")
    m.add_argument("--grid", default="default", help="default, batch, seq, mode, lora, techniques, qlora, qlora-amp, kernels")
    m.add_argument("--out", required=True, help="output directory")
    m.add_argument("--model", default=None, help="weights to load (default for tiny: the shipped tiny model)")
    m.add_argument("--random-weights", action="store_true", help="build the preset with random weights")
    m.add_argument("--device", default="auto")
    m.add_argument("--dtype", default=None, help="fp32, bf16, fp16 (default: as loaded / fp32)")
    m.add_argument("--repeats", type=int, default=None,
                   help="timed repeats per row (median; default 3, with --compare 9 on CPU and 4 on CUDA)")
    m.add_argument("--compare", choices=("hf",), default=None,
                   help="hf: each row through minillama and through transformers + PEFT side by side "
                        "(same random weights, data and settings); --grid is then not used")
    m.add_argument("--rows", default=None, help="with --compare: comma-separated rows (default: all), of "
                   "lora-qv, lora-all, full, inference, qlora-qv, lora-qv-long, lora-qv-ckpt, lora-all-ckpt, "
                   "lora-qv-compiled, lora-all-compiled, full-compiled")
    m.add_argument("--batch", type=int, default=None, help="with --compare (default: 4 on CPU, 2 on CUDA)")
    m.add_argument("--seq-len", type=int, default=None, help="with --compare (default: 128 on CPU, 512 on CUDA)")
    m.add_argument("--long-seq-len", type=int, default=None, help="with --compare: the long-context row")
    m.add_argument("--new-tokens", type=int, default=None, help="with --compare: tokens generated (inference)")
    m.add_argument("--compile-hf", action="store_true",
                   help="with --compare: in the *-compiled rows (minillama's blocks torch.compiled), compile HF's "
                        "decoder layers too (default: HF eager, as it runs by default)")
    m.set_defaults(func=run)
