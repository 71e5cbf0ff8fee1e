"""The notebooks' saved metadata, and their executed copies in docs/notebooks/ (scripts/execute_notebooks.py).

Strict on purpose: a copy that is missing, or made from other cells than its notebook's current ones, fails
(rerun `python scripts/execute_notebooks.py --only NN`), and so does a copy that shows an error or a stderr line.
"""

import hashlib
import importlib.util
import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((REPO / "notebooks").glob("[0-9][0-9]_*.ipynb"))
_spec = importlib.util.spec_from_file_location("execute_notebooks", REPO / "scripts" / "execute_notebooks.py")
execute_notebooks = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(execute_notebooks)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_saves_jupyterlabs_kernelspec(path):
    """JupyterLab 4 marks a notebook modified on opening when these are missing (values: ipykernel's
    kernelspec and its kernel_info reply, as JupyterLab saves them)."""
    meta = json.loads(path.read_text())["metadata"]
    assert meta["kernelspec"] == {"display_name": "Python 3 (ipykernel)", "language": "python", "name": "python3"}
    info = meta["language_info"]
    assert {k: info[k] for k in ("name", "pygments_lexer", "mimetype", "file_extension", "nbconvert_exporter")} == {
        "name": "python", "pygments_lexer": "ipython3", "mimetype": "text/x-python", "file_extension": ".py",
        "nbconvert_exporter": "python"}, path.name
    assert info["codemirror_mode"] == {"name": "ipython", "version": 3} and info["version"].startswith("3.")


def test_set_metadata_changes_only_the_metadata_lines(tmp_path):
    nb = {"cells": [{"cell_type": "code", "execution_count": None, "id": "a", "metadata": {}, "outputs": [],
                     "source": ["x = 1"]}], "metadata": {"kernelspec": {"name": "python3"}}, "nbformat": 4,
          "nbformat_minor": 5}
    path = tmp_path / "n.ipynb"
    path.write_text(json.dumps(nb, indent=1) + "\n")
    before = path.read_text().splitlines()
    assert execute_notebooks.set_metadata(path) and not execute_notebooks.set_metadata(path)
    after = path.read_text().splitlines()
    assert after[:before.index(' "metadata": {')] == before[:before.index(' "metadata": {')]
    assert after[-3:] == before[-3:] and path.read_text().endswith("}\n")
    path.write_text(json.dumps(nb, indent=2))  # another layout: refused, the file left as it was
    with pytest.raises(ValueError, match="n.ipynb: not in nbformat's layout"):
        execute_notebooks.set_metadata(path)
    assert path.read_text() == json.dumps(nb, indent=2)


def test_source_hash_follows_the_cells_not_the_outputs():
    cell = {"cell_type": "code", "source": "x = 1", "outputs": [], "metadata": {}}
    nb = {"cells": [cell], "metadata": {}}
    expected = hashlib.sha256(json.dumps([["code", "x = 1"]]).encode()).hexdigest()  # the recipe, by hand
    assert execute_notebooks.source_hash(nb) == expected
    ran = {"cells": [{**cell, "source": ["x ", "= 1"], "outputs": [{"output_type": "stream"}]}], "metadata": {"a": 1}}
    assert execute_notebooks.source_hash(ran) == expected
    assert execute_notebooks.source_hash({"cells": [{**cell, "source": "x = 2"}]}) != expected


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_executed_copy_is_fresh_stamped_and_clean(path):
    copy = REPO / "docs" / "notebooks" / path.name
    assert copy.exists(), f"docs/notebooks/{path.name} is missing: run python scripts/execute_notebooks.py --only {path.name[:2]}"
    nb = json.loads(copy.read_text())
    stamp = nb["metadata"].get("minillama_executed", {})
    current = execute_notebooks.source_hash(json.loads(path.read_text()))
    assert stamp.get("source_hash") == current, (
        f"docs/notebooks/{path.name} was made from other cells than notebooks/{path.name} holds now: "
        f"run python scripts/execute_notebooks.py --only {path.name[:2]}")
    for key in ("date", "torch", "python", "commit"):
        assert stamp.get(key), f"docs/notebooks/{path.name}: its stamp lacks {key!r}"
    assert {"cpu", "cores", "load_before", "load_after"} <= set(stamp["machine"]), path.name
    first = "".join(nb["cells"][0]["source"])
    assert nb["cells"][0]["cell_type"] == "markdown" and current in first and stamp["commit"] in first
    ran = [c for c in nb["cells"] if c["cell_type"] == "code"]
    assert ran and all(c["execution_count"] for c in ran), f"docs/notebooks/{path.name}: not every cell ran"
    for i, cell in enumerate(nb["cells"]):
        for out in cell.get("outputs", []):
            assert out["output_type"] != "error", f"docs/notebooks/{path.name} cell {i}: an error"
            assert not (out["output_type"] == "stream" and out["name"] == "stderr"), (
                f"docs/notebooks/{path.name} cell {i}: stderr output: {''.join(out['text'])[:200]}")


def test_readme_links_every_executed_copy():
    readme = (REPO / "README.md").read_text()
    for path in NOTEBOOKS:
        assert f"](docs/notebooks/{path.name})" in readme, path.name


def test_execute_writes_a_stamped_copy_and_nothing_for_a_failing_notebook(tmp_path, monkeypatch):
    """A two-cell notebook runs into a stamped copy that the freshness checks accept; one whose cell raises
    leaves no copy behind and names the notebook."""
    monkeypatch.setattr(execute_notebooks, "NOTEBOOKS", tmp_path)
    monkeypatch.setattr(execute_notebooks, "COPIES", tmp_path / "copies")
    cell = lambda src: {"cell_type": "code", "execution_count": None, "id": f"c{len(src)}", "metadata": {},
                        "outputs": [], "source": src}
    good = {"cells": [cell("x = 6 * 7"), cell("print(x)")], "metadata": {}, "nbformat": 4, "nbformat_minor": 5}
    (tmp_path / "98_good.ipynb").write_text(json.dumps(good, indent=1) + "\n")
    copy = json.loads(execute_notebooks.execute(tmp_path / "98_good.ipynb", timeout=120).read_text())
    assert copy["metadata"]["minillama_executed"]["source_hash"] == execute_notebooks.source_hash(good)
    assert copy["cells"][0]["cell_type"] == "markdown" and copy["cells"][2]["outputs"][0]["text"] == "42\n"
    bad = {**good, "cells": [cell("raise ValueError('broken on purpose')")]}
    (tmp_path / "99_bad.ipynb").write_text(json.dumps(bad, indent=1) + "\n")
    with pytest.raises(RuntimeError, match="99_bad.ipynb: a cell failed, so no copy was written"):
        execute_notebooks.execute(tmp_path / "99_bad.ipynb", timeout=120)
    assert sorted(p.name for p in (tmp_path / "copies").iterdir()) == ["98_good.ipynb"]
