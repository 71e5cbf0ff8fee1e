"""Notebook 00's "will it fit?" explorer (notebooks/_explorer.py) against `minillama plan`, run live: the same
questions must get the same verdicts, peaks and best configurations as the command prints."""

import re
import sys
from pathlib import Path

import pytest

from minillama.cli.main import main
from minillama.measuring.memory import format_bytes

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "notebooks"))
import _explorer  # noqa: E402

LINE = re.compile(r"^\s*(\S+ \w?i?B)\s+(\d+)N  (.+)$")  # format_plan's row: peak, compute, label

QUESTIONS = [  # the issue's question first, then one per preset, method and GPU size
    dict(preset="llama2-7b", method="lora", seq_len=2048, batch=4, gpu_gib=24),
    dict(preset="llama2-7b", method="lora", seq_len=2048, batch=4, gpu_gib=24, checkpointing=True),
    dict(preset="llama2-7b", method="qlora", seq_len=2048, batch=4, gpu_gib=16, accum=2, optimizer="paged_adamw8bit"),
    dict(preset="llama2-7b", method="full", weights="fp32+amp", seq_len=512, batch=8, gpu_gib=80),
    dict(preset="llama2-13b", method="lora", seq_len=4096, batch=2, gpu_gib=40, lora_r=64, lora_targets="all"),
    dict(preset="llama3-8b", method="qlora", seq_len=8192, batch=1, gpu_gib=24, checkpointing=True),
]


def cli_plan(capsys, q: dict) -> tuple[dict, list, str]:
    """`minillama plan` for the question, every fitting row printed (--top 10000): ({label: (peak, compute)},
    the labels of its 'best per method' block in order, the whole output)."""
    argv = ["plan", "--preset", q["preset"], "--gpu-mem", f"{q['gpu_gib']}GiB", "--seq-len", str(q["seq_len"]),
            "--batch", str(q["batch"]), "--lora-r", str(q.get("lora_r", _explorer.QUESTION["lora_r"])),
            "--top", "10000"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    printed, best, in_best = {}, [], False
    for line in out.splitlines():
        in_best = line == "best per method:" or (in_best and bool(LINE.match(line)))
        m = LINE.match(line)
        if m:
            printed[m.group(3)] = (m.group(1), int(m.group(2)))
            if in_best:
                best.append(m.group(3))
    return printed, best, out


@pytest.mark.parametrize("q", QUESTIONS, ids=lambda q: f"{q['preset']}-{q['method']}-{q['seq_len']}-{q['gpu_gib']}GiB")
def test_the_explorer_answers_as_minillama_plan_prints(capsys, q):
    ans = _explorer.fit_answer(**q)
    printed, best, out = cli_plan(capsys, q)
    assert not ans.problem and ans.row is not None
    r = ans.row
    if r.fits:  # the CLI lists every fitting configuration: this one, with the same peak and compute
        assert printed[r.label()] == (format_bytes(r.peak_bytes), r.compute_per_token), out
        assert "FITS: predicted peak " + format_bytes(r.peak_bytes) in ans.text()
    else:
        assert r.label() not in printed, out
        assert "DOES NOT FIT: predicted peak " + format_bytes(r.peak_bytes) in ans.text()
    if ans.best is None:
        assert out.splitlines()[1].startswith("Nothing fits") and not best
    else:  # the CLI's first 'best per method' row is the explorer's best; its method's row is there too
        assert best[0] == ans.best.label() and printed[best[0]][0] == format_bytes(ans.best.peak_bytes)
        assert ans.best_same_method is None or ans.best_same_method.label() in best


def test_the_issue_question_gets_a_verdict_and_a_fitting_alternative():
    """Llama-2-7B, LoRA, 2,048 tokens, 24 GiB: the answer names a configuration that fits (whichever it is)."""
    ans = _explorer.fit_answer(preset="llama2-7b", method="lora", seq_len=2048, gpu_gib=24)
    assert ans.best is not None and ans.best.fits and ans.best.peak_bytes <= 24 * 2**30
    assert ans.best_same_method is not None and ans.best_same_method.method == "lora"
    assert ans.measured is None  # only the tiny preset is measured


def test_tiny_preset_shows_a_cached_measurement_beside_the_prediction():
    q = dict(preset="tiny", method="lora", weights="fp32+amp", seq_len=64, batch=2, gpu_gib=16)
    ans = _explorer.fit_answer(**q)
    m = ans.measured
    assert "error" not in m, m
    assert abs(m["predicted_peak_memory_bytes"] / m["peak_memory_bytes"] - 1) <= 0.10  # as tests/test_plan.py
    assert "measured on " in ans.text() and format_bytes(m["peak_memory_bytes"]) in ans.text()
    assert _explorer.fit_answer(**q).measured is m  # a redraw reads the cache, it does not measure again


def test_a_question_the_planner_refuses_gets_its_sentence():
    ans = _explorer.fit_answer(preset="tiny", seq_len=2048)
    assert ans.row is None and "max_seq_len" in ans.problem and ans.problem in ans.text()
    ans = _explorer.fit_answer(batch=4, accum=8)
    assert ans.row is None and "accumulation must divide the batch" in ans.problem
    ans = _explorer.fit_answer(method="qlora", weights="fp32+amp")  # the planner's QLoRA on a GPU is bf16 only
    assert ans.row is None and "choose bf16 weights" in ans.problem
    with pytest.raises(ValueError, match="unknown question key"):
        _explorer.fit_answer(gpu=24)


def test_every_knob_has_a_control():
    widgets = pytest.importorskip("ipywidgets")
    controls = _explorer._controls(widgets, _explorer.QUESTION)
    assert set(controls) == set(_explorer.QUESTION)
    assert all(c.value == _explorer.QUESTION[k] for k, c in controls.items())


def test_without_ipywidgets_the_explorer_shows_a_static_table(monkeypatch, capsys):
    import IPython.display

    shown = []
    monkeypatch.setattr(IPython.display, "display", lambda *objs: shown.extend(objs))
    monkeypatch.setitem(sys.modules, "ipywidgets", None)  # `import ipywidgets` now raises ImportError
    first = _explorer.fit_explorer(gpu_gib=24)
    out = capsys.readouterr().out
    table = "".join(o.data for o in shown if isinstance(o, IPython.display.Markdown))
    assert "ipywidgets is not installed" in out and "| llama2-13b |" in table
    assert f"{first.best.label()}: {format_bytes(first.best.peak_bytes)}" in table  # llama2-7b at 24 GiB
    assert first.best.label() in out  # and the first question's answer, printed


def test_a_redraw_sends_its_figure_even_after_matplotlib_was_switched_to_agg(monkeypatch, capsys):
    """bench's plot files switch matplotlib to Agg, after which pyplot's show() draws nothing: in notebook 00 the
    explorer lost its figure on every redraw after section 5 (seen in tests/test_browser.py)."""
    import IPython.display
    import matplotlib

    matplotlib.use("Agg")
    shown = []
    monkeypatch.setattr(IPython.display, "display", lambda *objs: shown.extend(objs))
    _explorer.show(preset="llama2-7b", seq_len=4096)
    assert "predicted peak" in capsys.readouterr().out
    assert [type(o).__name__ for o in shown] == ["Image"] and shown[0].data[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_saved_copy_shows_the_first_answer_instead_of_the_widget_repr(monkeypatch, capsys):
    """Where widgets do not render (a notebook saved with its outputs), the explorer's cell shows the first
    question's verdict, not `VBox(children=(...`."""
    pytest.importorskip("ipywidgets")
    import IPython.display

    shown = []
    monkeypatch.setattr(IPython.display, "display", lambda *objs, **kw: shown.append((objs, kw)))
    first = _explorer.fit_explorer(**QUESTIONS[0])
    bundles = [objs[0] for objs, kw in shown if kw.get("raw")]
    assert len(bundles) == 1 and "application/vnd.jupyter.widget-view+json" in bundles[0]
    text = bundles[0]["text/plain"]
    assert "VBox(" not in text and text.startswith("llama2-7b, batch 4 x 2048 tokens, one 24 GiB GPU")
    assert "DOES NOT FIT" in text and first.best.label() in text  # 44 GiB of LoRA on 24 GiB; the planner's best
