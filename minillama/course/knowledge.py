"""Knowledge injection with LoRA, in miniature.

The anchor experiment taught a 13B model the 2023 Oscar winners with a LoRA trained on a ~1,200-token
text (10 epochs, r=64, alpha=128, lr 1e-4, batch 2, cutoff 256, dropout 0.05) and then asked:

(a) does the model recall the facts, also when the question is phrased differently?
(b) are unrelated facts and the model's other skills left alone?
(c) do ten one-fact adapters, stacked, behave like one ten-fact adapter?

Here the same questions are asked of the shipped tiny model (`data/tiny`) with the fictional award facts
of `data/corpora/facts.json`. Its pre-training almanac holds other years' winners of the same awards, in
all seven phrasings and as questions, but never these ten facts: like the anchor's model, it can spell
the names and knows the format, and has to learn the facts from the LoRA.

* **Recall** is greedy continuation: a prompt is recalled when the generated text starts with the
  answer (case-insensitive). Three prompt sets, each per fact:
  - ``trained``: the three sentences of the training text cut before a field (name, work, award);
  - ``rephrased``: four cloze sentences that never occur in the training text;
  - ``qa``: the questions of facts.json as ``Question: ...\\nAnswer:``. The tiny model was never
    trained on question answering, so this measures transfer to a format it has not seen.
* **Not disturbed**: the control facts (an invented geography) are in pre-training: the almanac states
  them again and again, so the base model knows them. Control accuracy is recall on them, as cloze
  ("The capital of Ettinor is") and as ``Question: ...\nAnswer:``, before and after; with it the
  per-token loss (NLL, nats) on a few held-out stories and passkey accuracy (other skills).

Command line (tens of minutes on a laptop CPU: 8 single adapters, 2 x 10 one-fact adapters)::

    python -m minillama.course.knowledge --out runs/knowledge

writes ``results.json`` and ``table.md`` into ``--out`` and prints the table. Notebook 02 loads the runs the
repo ships in ``notebooks/results/knowledge-*`` (each ``meta`` has the device, torch version, date and wall
time); every row seeds its own LoRA initialisation, so a row does not depend on the rows run before it.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import tempfile
import time
from pathlib import Path
from typing import Optional, Sequence

import torch

from ..checkpoints import load_model
from ..files import atomic_write_text
from ..progress import progress_bar
from .corpora import REPHRASED_TEMPLATES, TRAINED_TEMPLATES, facts_training_text
from ..training.data import pack_documents, read_jsonl_texts
from ..evaluation.evaluate import passkey_accuracy
from ..measuring.measure import device_name
from ..measuring import report
from ..generate import generate
from ..lora import apply_lora, trainable_parameters, use_adapter
from ..tokenizer import load_tokenizer
from .paths import corpora_dir, tiny_model_dir
from ..training import TrainConfig, evaluate_loss, train


# The anchor's hyper-parameters (batch 2, cutoff 256, dropout 0.05, alpha = 2r).
BATCH, SEQ_LEN, DROPOUT = 2, 256, 0.05


# ---- prompts -----------------------------------------------------------------------------------
def fact_document(fact: dict) -> str:
    """The training text of one fact (its three statements), as in facts_training_text."""
    return facts_training_text({"facts": [fact]})


def _cloze(template: str, field: str, fact: dict) -> tuple[str, str]:
    """(the template filled in and cut before `field`, that field's value): a recall prompt."""
    prompt = template[: template.index("{" + field + "}")].rstrip().format(**fact)
    answer = f"{fact['award']} for {fact['category']}" if field == "award" else fact[field]
    return prompt, answer


def recall_items(facts: Sequence[dict]) -> dict[str, list[dict]]:
    """{"trained", "rephrased", "qa"}: lists of {"fact", "prompt", "answer"} (fact = index)."""
    T, R = TRAINED_TEMPLATES, REPHRASED_TEMPLATES
    out: dict[str, list[dict]] = {"trained": [], "rephrased": [], "qa": []}
    for i, f in enumerate(facts):
        # the training sentences, each cut before one field; then the four phrasings that the
        # almanac taught the base model for other prizes but the training text never uses
        trained = [_cloze(T[0], "name", f), _cloze(T[1], "work", f), _cloze(T[2], "award", f)]
        rephrased = [_cloze(R[0], "name", f), _cloze(R[1], "name", f), _cloze(R[2], "name", f),
                     _cloze(R[3], "work", f)]
        qa = [(f"Question: {q['question']}\nAnswer:", q["answer"]) for q in f.get("questions", [])]
        for key, pairs in (("trained", trained), ("rephrased", rephrased), ("qa", qa)):
            out[key] += [{"fact": i, "prompt": p, "answer": ans} for p, ans in pairs]
    return out


def control_items(controls: Sequence[dict]) -> dict[str, list[dict]]:
    """{"cloze", "qa"} prompts on the control facts (which the base model learnt from the almanac)."""
    cloze = [{"prompt": c["text"][: c["text"].rindex(c["answer"])].rstrip(), "answer": c["answer"]}
             for c in controls]
    qa = [{"prompt": f"Question: {c['question']}\nAnswer:", "answer": c["answer"]} for c in controls]
    return {"cloze": cloze, "qa": qa}


def answer_matches(continuation: str, answer: str) -> bool:
    """True when the generated continuation starts with the answer (case and outer spaces ignored)."""
    return " ".join(continuation.split()).lower().startswith(" ".join(answer.split()).lower())


@torch.no_grad()
def recall(model, tokenizer, items: Sequence[dict], batch_size: int = 32) -> dict:
    """Greedy recall: {"accuracy", "n", "hits"} with hits[i] True when item i's answer was produced."""
    if not items:
        return {"accuracy": float("nan"), "n": 0, "hits": []}
    hits = []
    for i in range(0, len(items), batch_size):
        chunk = items[i:i + batch_size]
        prompts = [tokenizer.encode(it["prompt"], bos=True) for it in chunk]
        n_new = max(len(tokenizer.encode(" " + it["answer"], bos=False)) for it in chunk) + 2
        outs = generate(model, prompts, max_new_tokens=n_new)
        hits += [answer_matches(tokenizer.decode(o), it["answer"]) for o, it in zip(outs, chunk)]
    return {"accuracy": sum(hits) / len(hits), "n": len(hits), "hits": hits}


@torch.no_grad()
def mean_nll(model, tokenizer, texts: Sequence[str], max_tokens: Optional[int] = None) -> float:
    """Per-token negative log-likelihood (nats) of `texts`, each scored as [BOS] text, pooled over all
    predicted tokens. Long texts are cut to max_tokens (default: the model's context)."""
    max_tokens = max_tokens or model.args.max_seq_len
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for t in texts:
        ids = tokenizer.encode(t, bos=True)[: max_tokens + 1]
        if len(ids) < 2:
            continue
        x = torch.tensor([ids[:-1]], device=device)
        y = torch.tensor([ids[1:]], device=device)
        n = y.numel()
        total += float(model(x, y)) * n
        count += n
    model.train(was_training)
    if count == 0:
        raise ValueError("mean_nll: no text has at least one token to predict.")
    return total / count


# ---- one evaluation of a model (with whatever adapter is active) --------------------------------
def evaluate_all(model, tokenizer, facts, controls, stories, passkey_trials: int = 20) -> dict:
    items = recall_items(facts)
    row = {f"recall_{k}": recall(model, tokenizer, v)["accuracy"] for k, v in items.items()}
    row.update({f"control_{k}": recall(model, tokenizer, v)["accuracy"]
                for k, v in control_items(controls).items()})
    row["stories_nll"] = mean_nll(model, tokenizer, stories)
    if passkey_trials:
        row["passkey"] = passkey_accuracy(model, tokenizer, context=model.args.max_seq_len,
                                          trials=passkey_trials)["accuracy"]
    else:
        row["passkey"] = float("nan")
    return row


# ---- training -----------------------------------------------------------------------------------
def training_rows(tokenizer, facts: Sequence[dict], seq_len: int = SEQ_LEN, seed: int = 0):
    """Each fact's three statements as one [BOS] ... [EOS] document, packed into rows of seq_len."""
    docs = [tokenizer.encode(fact_document(f), bos=True, eos=True) for f in facts]
    return pack_documents(docs, seq_len=seq_len, pad_id=0, seed=seed)


def steps_for(epochs: int, rows: int, batch: int = BATCH) -> int:
    """Optimizer steps for `epochs` passes over `rows` rows (a batch holds at most `rows` rows)."""
    return max(1, math.ceil(epochs * rows / min(batch, rows)))


def _only_trainable(model, name: str) -> None:
    """Make exactly adapter `name`'s LoRA matrices trainable (others and the base stay frozen)."""
    for n, p in model.named_parameters():
        parts = n.split(".")
        p.requires_grad = name in parts and ("lora_A" in parts or "lora_B" in parts)


def train_adapter(model, tokenizer, facts, *, name: str, epochs: int, lr: float, work_dir,
                  seed: int = 0) -> dict:
    """Train adapter `name` (already added with apply_lora) on the facts' text with train.train.

    first_loss / final_loss: mean loss per token over all training rows before and after (eval mode)."""
    x, y = training_rows(tokenizer, facts, seed=seed)
    steps = steps_for(epochs, x.shape[0])
    cfg = TrainConfig(steps=steps, batch_size=BATCH, lr=lr, warmup_steps=min(2, steps), min_lr_ratio=1.0,
                      weight_decay=0.0, eval_every=steps, save_every=steps, seed=seed)
    _only_trainable(model, name)
    t0 = time.perf_counter()
    with use_adapter(model, name):
        before = evaluate_loss(model, x, y, BATCH)  # B = 0: the base model's loss on the training rows
        log = train(model, (x, y), {}, cfg, work_dir, progress=False)
        after = evaluate_loss(model, x, y, BATCH)
    return {"steps": steps, "rows": int(x.shape[0]), "first_loss": before, "final_loss": after,
            "last_batch_loss": log[-1]["loss"], "loss_curve": [round(r["loss"], 4) for r in log],
            "train_s": time.perf_counter() - t0}


# ---- the experiment -----------------------------------------------------------------------------
def _stacking(model, tok, facts, evaluate, stack_rank: int, stack_epochs: int, lr: float, targets, tmp: Path,
              seed: int) -> list:
    """Ten one-fact adapters in one model, each trained alone on its own fact's text; returns the rows
    (kind, training info, metrics, trainable parameters) of one adapter alone and of all ten stacked."""
    names = [f"fact{i}" for i in range(len(facts))]
    for nm in names:
        apply_lora(model, r=stack_rank, alpha=2 * stack_rank, dropout=DROPOUT, targets=targets, name=nm)
    infos = [train_adapter(model, tok, [f], name=nm, epochs=stack_epochs, lr=lr,
                           work_dir=tmp / f"lr{lr}_{nm}", seed=seed)
             for nm, f in zip(names, facts)]
    n_params = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    info = {"steps": sum(i["steps"] for i in infos),
            "first_loss": sum(i["first_loss"] for i in infos) / len(infos),
            "final_loss": sum(i["final_loss"] for i in infos) / len(infos),
            "train_s": sum(i["train_s"] for i in infos)}
    # Each one-fact adapter alone, asked about its own fact only (recall), and (controls) the
    # mean over adapters would cost ten evaluations: the first adapter stands for them.
    own = {k: [] for k in ("trained", "rephrased", "qa")}
    for i, nm in enumerate(names):
        with use_adapter(model, nm):
            for k, v in recall_items([facts[i]]).items():
                own[k] += recall(model, tok, v)["hits"]
    with use_adapter(model, names[0]):
        alone = evaluate(model, facts[:1])
    alone.update({f"recall_{k}": sum(v) / max(len(v), 1) for k, v in own.items()})
    one_fact = ("one-fact", info, alone, n_params // len(names))
    x, y = training_rows(tok, facts, seed=seed)  # the stacked model on the whole ten-fact text
    with use_adapter(model, None):
        base_loss = evaluate_loss(model, x, y, BATCH)
    with use_adapter(model, {nm: 1.0 for nm in names}):
        stacked = evaluate(model, facts)
        info = dict(info, first_loss=base_loss, final_loss=evaluate_loss(model, x, y, BATCH))
    return [one_fact, ("stacked", info, stacked, n_params)]


def run_experiment(model_path=None, facts_path=None, stories_path=None, *,
                   ranks: Sequence[int] = (8, 64), epochs: Sequence[int] = (10, 100),
                   lrs: Sequence[float] = (1e-4, 1e-3), stack: bool = True, stack_rank: int = 64,
                   stack_epochs: int = 100, n_facts: Optional[int] = None, n_stories: int = 4,
                   passkey_trials: int = 20, targets=("wq", "wv"), seed: int = 0, log=print,
                   progress: bool = True) -> dict:
    """Run the sweep (rank x epochs x lr, one ten-fact adapter each) and the stacking comparison.
    progress: a bar over the training runs on stderr (only where stderr is a terminal).
    Paths default to the shipped tiny model, facts.json and stories_val.jsonl.
    Returns {"meta", "base", "rows"}; every row has the keys of ROW_KEYS.
    """
    model_path = model_path or tiny_model_dir()
    facts_path = facts_path or corpora_dir() / "facts.json"
    stories_path = stories_path or corpora_dir() / "stories_val.jsonl"
    torch.manual_seed(seed)
    tok = load_tokenizer(model_path)
    data = json.loads(Path(facts_path).read_text())
    facts = data["facts"][:n_facts] if n_facts else data["facts"]
    controls = data["controls"]
    stories = read_jsonl_texts(stories_path)[:n_stories]

    def fresh():
        return load_model(model_path, device="cpu")

    t_start = time.perf_counter()
    base_model = fresh()
    def evaluate(model, some_facts):
        return evaluate_all(model, tok, some_facts, controls, stories, passkey_trials)

    base = evaluate(base_model, facts)
    log(f"base model: {_fmt_metrics(base)}")
    rows = []

    def row(kind, r, ep, lr, info, after, params):
        out = {"setting": kind, "r": r, "alpha": 2 * r, "epochs": ep, "lr": lr, "steps": info["steps"],
               "trainable_params": params, "first_loss": info["first_loss"], "final_loss": info["final_loss"],
               **{k: after[k] for k in after}, **{f"{k}_before": base[k] for k in after},
               "train_s": round(info["train_s"], 2)}
        if "loss_curve" in info:  # the training loss per optimizer step (ten-fact adapters only)
            out["loss_curve"] = info["loss_curve"]
        rows.append(out)
        log(f"{kind:>10s} r={r:<3d} epochs={ep:<3d} lr={lr:g}: loss {info['first_loss']:.3f} -> "
            f"{info['final_loss']:.3f}; {_fmt_metrics(after)}")
        return out

    runs = len(lrs) * (len(ranks) * len(epochs) + bool(stack))  # a stacking run trains ten one-fact adapters
    bar = progress_bar(desc="knowledge sweep", total=runs, unit="run", progress=progress)
    with tempfile.TemporaryDirectory(prefix="minillama-knowledge-") as tmp:
        for lr in lrs:
            for r in ranks:
                for ep in epochs:
                    model = fresh()
                    torch.manual_seed(seed)  # each row's LoRA A from the seed, whatever rows ran before
                    apply_lora(model, r=r, alpha=2 * r, dropout=DROPOUT, targets=targets, name="facts")
                    params = trainable_parameters(model)["trainable"]
                    info = train_adapter(model, tok, facts, name="facts", epochs=ep, lr=lr,
                                         work_dir=Path(tmp) / f"lr{lr}_r{r}_e{ep}", seed=seed)
                    with use_adapter(model, "facts"):
                        after = evaluate(model, facts)
                    row("single", r, ep, lr, info, after, params)
                    bar.update()
            if not stack:
                continue
            torch.manual_seed(seed)
            for kind, info, after, params in _stacking(fresh(), tok, facts, evaluate, stack_rank, stack_epochs, lr,
                                                       targets, Path(tmp), seed):
                row(kind, stack_rank, stack_epochs, lr, info, after, params)
            bar.update()
    bar.close()

    meta = {"model": str(model_path), "facts": len(facts), "qa_prompts": len(recall_items(facts)["qa"]),
            "controls": len(controls), "stories": len(stories),
            "passkey_trials": passkey_trials, "targets": list(targets) if not isinstance(targets, str) else targets,
            "batch": BATCH, "seq_len": SEQ_LEN, "dropout": DROPOUT, "alpha": "2r",
            "schedule": "AdamW (no weight decay), 2 warmup steps, constant lr",
            "device": f"{device_name(torch.device('cpu'))}, {platform.machine()}, torch threads: {torch.get_num_threads()}",
            "dtype": "fp32", "torch": torch.__version__, "preset": "tiny", "seed": seed,
            "wall_s": round(time.perf_counter() - t_start, 1),
            "date": time.strftime("%Y-%m-%d", time.gmtime())}
    return {"meta": meta, "base": base, "rows": rows}


def _fmt_metrics(m: dict) -> str:
    return (f"recall trained {m['recall_trained']:.2f}, rephrased {m['recall_rephrased']:.2f}, "
            f"qa {m['recall_qa']:.2f}; control cloze {m['control_cloze']:.2f}, qa {m['control_qa']:.2f}, "
            f"stories NLL {m['stories_nll']:.3f}, "
            f"passkey {m['passkey']:.2f}")


ROW_KEYS = ("setting", "r", "alpha", "epochs", "lr", "steps", "trainable_params", "first_loss", "final_loss",
            "recall_trained", "recall_rephrased", "recall_qa", "control_cloze", "control_qa", "stories_nll",
            "passkey", "control_cloze_before", "control_qa_before", "stories_nll_before", "passkey_before",
            "train_s")


def format_table(results: dict, notes: bool = True) -> str:
    """A markdown table of the rows (measuring.report.table): with notes, the settings every row shares in one line
    above and a short key below (before -> after; NLL in nats per token); notes=False: the rows alone."""
    m, b = results["meta"], results["base"]
    heads = ["adapter", "r", "epochs", "lr", "steps", "trainable params", "training-text loss", "recall trained",
             "recall rephrased", "recall QA", "control cloze", "control QA", "stories NLL", "passkey"]
    cells = [["none (base model)", "-", "-", "-", "-", "0", "-", f"{b['recall_trained']:.2f}",
              f"{b['recall_rephrased']:.2f}", f"{b['recall_qa']:.2f}", f"{b['control_cloze']:.2f}",
              f"{b['control_qa']:.2f}", f"{b['stories_nll']:.3f}", f"{b['passkey']:.2f}"]]
    for r in results["rows"]:
        cells.append([r["setting"], str(r["r"]), str(r["epochs"]), f"{r['lr']:g}", str(r["steps"]),
                      f"{r['trainable_params']:,}", f"{r['first_loss']:.2f} -> {r['final_loss']:.2f}",
                      f"{r['recall_trained']:.2f}", f"{r['recall_rephrased']:.2f}", f"{r['recall_qa']:.2f}",
                      f"{r['control_cloze_before']:.2f} -> {r['control_cloze']:.2f}",
                      f"{r['control_qa_before']:.2f} -> {r['control_qa']:.2f}",
                      f"{r['stories_nll_before']:.3f} -> {r['stories_nll']:.3f}",
                      f"{r['passkey_before']:.2f} -> {r['passkey']:.2f}"])
    if not notes:
        return report.table(heads, cells, "md") + "\n"
    n = m["facts"]
    above = (f"{n} facts, LoRA on {m['targets']} (alpha 2r, dropout {m['dropout']}), batch {m['batch']}, cutoff "
             f"{m['seq_len']}, {m['schedule']} | {m['device']}, {m['dtype']}, torch {m['torch']}, preset "
             f"{m['preset']}, {m['wall_s']} s")
    key = (f"Recall: greedy output starts with the answer ({3 * n} trained, {4 * n} rephrased, {m['qa_prompts']} QA "
           f"prompts); controls: {m['controls']} pre-training facts; NLL: nats/token, {m['stories']} held-out stories; "
           f"passkey: {m['passkey_trials']} trials. one-fact: each adapter on its own fact (loss: mean; controls, NLL, "
           f"passkey: the first); stacked: all summed.")
    return report.table(heads, cells, "md", above=above) + "\n\n" + key + "\n"


def main(argv: Optional[Sequence[str]] = None) -> dict:
    p = argparse.ArgumentParser(description="Knowledge injection with LoRA on the tiny model.")
    p.add_argument("--out", required=True, help="directory for results.json and table.md")
    p.add_argument("--model", default=None, help="default: the shipped tiny model")
    p.add_argument("--facts", default=None, help="default: the shipped facts.json")
    p.add_argument("--stories", default=None, help="default: the shipped stories_val.jsonl")
    p.add_argument("--ranks", default="8,64")
    p.add_argument("--epochs", default="10,100")
    p.add_argument("--lrs", default="1e-4,1e-3", help="learning rates (the anchor's is 1e-4)")
    p.add_argument("--no-stack", action="store_true", help="skip the stacked one-fact adapters")
    p.add_argument("--stack-rank", type=int, default=64)
    p.add_argument("--stack-epochs", type=int, default=100)
    p.add_argument("--n-facts", type=int, default=None)
    p.add_argument("--passkey-trials", type=int, default=20)
    p.add_argument("--targets", default="wq,wv", help='comma-separated linears, or "all"')
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true", help="no progress bar (stderr, only on a terminal)")
    a = p.parse_args(argv)
    ints = lambda s: [int(v) for v in s.split(",") if v]  # noqa: E731
    targets = "all" if a.targets == "all" else tuple(t for t in a.targets.split(",") if t)
    results = run_experiment(a.model, a.facts, a.stories, ranks=ints(a.ranks), epochs=ints(a.epochs),
                             lrs=[float(v) for v in a.lrs.split(",") if v], stack=not a.no_stack,
                             stack_rank=a.stack_rank, stack_epochs=a.stack_epochs, n_facts=a.n_facts,
                             passkey_trials=a.passkey_trials, targets=targets, seed=a.seed,
                             progress=not a.no_progress)
    out = Path(a.out)
    table = format_table(results)
    for name, text in (("results.json", json.dumps(results, indent=2) + "\n"), ("table.md", table)):
        atomic_write_text(out / name, text)
    print(table)
    return results


if __name__ == "__main__":
    main()
