"""`minillama generate`: continue a prompt (or answer a chat message) with a checkpoint, streamed."""

from .common import pick_device


def run(args) -> int:
    from .. import generate, load_model, load_tokenizer
    from ..generate import check_sampling
    from ..tokenizer import TextStream

    device = pick_device(args.device)
    check_sampling(args.temperature, args.top_p, args.max_new_tokens)
    if args.system is not None and not args.chat:
        raise ValueError("--system is a chat's system message: give it with --chat.")
    try:
        args.prompt.encode("utf-8")
    except UnicodeEncodeError as e:  # sys.argv keeps undecodable bytes as surrogates
        raise ValueError(f"--prompt holds bytes that are not valid UTF-8 (character {e.start + 1}): pass the "
                         f"prompt as UTF-8 text.") from None
    model = load_model(args.model, device=device, dtype=args.dtype)
    if args.adapter:
        from ..lora import load_adapter

        load_adapter(model, args.adapter)
    tok = load_tokenizer(args.tokenizer or args.model, vocab_size=model.args.vocab_size)
    if args.chat:  # the model's own chat format; only the answer is printed
        dialog = [{"role": "system", "content": args.system}] if args.system is not None else []
        prompt = tok.encode_chat(dialog + [{"role": "user", "content": args.prompt}])
    else:
        prompt = tok.encode(args.prompt, bos=True)
        print(args.prompt, end="", flush=True)
    text = TextStream(tok, prompt)  # decodes the growing sequence: each token alone would lose its space
    generate(model, prompt, args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
             eos_id=tok.stop_ids, seed=args.seed,  # EOS; for Llama-3 also <|eot_id|>, the end of a chat turn
             stream=lambda row, token: print(text.add(token), end="", flush=True))
    print(text.flush())  # an unfinished character held back at the very end, then the newline
    return 0


def add_parser(sub) -> None:
    g = sub.add_parser("generate", help="continue a prompt with a checkpoint (native, HF or Meta)")
    g.add_argument("--model", required=True, help="checkpoint directory")
    g.add_argument("--tokenizer", help="tokenizer.model or its directory (default: the model directory)")
    g.add_argument("--prompt", required=True)
    g.add_argument("--chat", action="store_true",
                   help="the prompt is a user's message in the model's chat format (Llama-2's [INST], Llama-3's "
                        "headers); prints the answer, which ends at the end of the turn")
    g.add_argument("--system", default=None, help="with --chat: a system message before the prompt")
    g.add_argument("--adapter", metavar="DIR", help="a LoRA adapter (PEFT format, e.g. RUN/checkpoint/adapter)")
    g.add_argument("--max-new-tokens", type=int, default=64)
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    g.add_argument("--dtype", default=None, help="fp32, fp16 or bf16 (default: as stored)")
    g.set_defaults(func=run)
