"""Notebooks are committed clean (nbmake executes them as part of the test command)."""

import json
import re
from pathlib import Path

import pytest

NOTEBOOKS = sorted((Path(__file__).resolve().parent.parent / "notebooks").glob("*.ipynb"))


def test_there_are_notebooks_in_teaching_order():
    names = [p.name for p in NOTEBOOKS]
    assert names and all(n[:2].isdigit() and n[2] == "_" for n in names)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_is_committed_without_outputs(path):
    nb = json.loads(path.read_text())
    for i, cell in enumerate(nb["cells"]):
        if cell["cell_type"] == "code":
            assert cell.get("outputs") == [] and cell.get("execution_count") is None, f"{path.name} cell {i}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_cites_only_what_is_in_the_repository(path):
    """Every Markdown file a notebook names exists in the repository, every `../` path stays inside it, and no
    absolute path to a machine's folders appears: a student has only the repository."""
    text = path.read_text()
    repo = path.resolve().parent.parent
    known = {p.name for p in repo.rglob("*.md") if ".venv" not in p.parts}
    for name in re.findall(r"[\w./-]*\w\.md\b", text):
        assert Path(name).name in known, f"{path.name} cites {name}, which is not in the repository: use docs/references.md"
    for rel in re.findall(r"\.\./[\w./-]+", text):
        target = (path.parent / rel).resolve()
        assert target.is_relative_to(repo), f"{path.name} points outside the repository ({rel})"
    assert not re.search(r"(?<![\w.])/(work|home|root|tmp|Users)/", text), f"{path.name} holds an absolute machine path"


# Notebook 02 loads these instead of rerunning the long sweep (MINILLAMA_FULL=1 reruns it).
SWEEP = {(8, 10), (8, 100), (64, 10), (64, 100)}  # (rank, epochs) of the single ten-fact adapters
SHIPPED_KNOWLEDGE = {"knowledge-all": ("all", [1e-3], SWEEP, 10), "knowledge-qv": (["wq", "wv"], [1e-3], SWEEP, 10),
                     "knowledge-qv-lr1e-4": (["wq", "wv"], [1e-4], SWEEP, 10),
                     "knowledge-all-3facts": ("all", [1e-3], {(64, 100)}, 3)}


@pytest.mark.parametrize("name", sorted(SHIPPED_KNOWLEDGE))
def test_shipped_knowledge_results_say_where_they_come_from(name):
    path = Path(__file__).resolve().parent.parent / "notebooks" / "results" / name / "results.json"
    res = json.loads(path.read_text())
    targets, lrs, singles_expected, n_facts = SHIPPED_KNOWLEDGE[name]
    meta = res["meta"]
    assert meta["targets"] == targets and meta["facts"] == n_facts
    assert meta["device"] and meta["torch"] and meta["date"]
    assert sorted({r["lr"] for r in res["rows"]}) == lrs
    singles = [r for r in res["rows"] if r["setting"] == "single"]
    assert {(r["r"], r["epochs"]) for r in singles} == singles_expected
    for r in singles:
        assert len(r["loss_curve"]) == r["steps"]  # the notebook's loss curves
    assert (path.parent / "table.md").exists()


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_imports_by_name(path):
    """One setup style (issue 25): a student sees where make_model, BATCH or verdict come from, so no cell uses
    `from ... import *`."""
    nb = json.loads(path.read_text())
    for i, cell in enumerate(nb["cells"]):
        if cell["cell_type"] == "code":
            assert not re.search(r"^\s*from\s+\S+\s+import\s+\*", "".join(cell["source"]), flags=re.M), \
                f"{path.name} cell {i} imports with '*': import the names it uses"
