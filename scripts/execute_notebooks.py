"""Executed copies of the notebooks, for readers who have not run them (GitHub renders them).

    python scripts/execute_notebooks.py                  # run every notebook in CPU mode, write docs/notebooks/
    python scripts/execute_notebooks.py --only 03 05     # just these (by number or name)
    python scripts/execute_notebooks.py --metadata-only  # set each notebook's kernelspec and language_info only

Each notebook runs top to bottom in a fresh kernel, in CPU mode (the GPU-lab variables are removed), from
notebooks/ as its working folder. Its copy, with outputs and figures, goes to docs/notebooks/<name>.ipynb,
stamped in its metadata (`minillama_executed`) and in a first Markdown cell with the machine (CPU model,
cores, load average before and after), the date, the torch and Python versions, the git commit, and the hash
of the source notebook's cells (`source_hash`). tests/test_executed_notebooks.py fails when a copy is missing,
older than its notebook (another hash), or holds an error or a stderr line. The notebooks in notebooks/ stay
without outputs; a notebook that fails leaves its old copy as it was.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from importlib.metadata import version
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = REPO / "notebooks"
COPIES = REPO / "docs" / "notebooks"
STAMP_KEY = "minillama_executed"
# What JupyterLab 4 with ipykernel writes when it saves a notebook: the kernelspec of the venv's kernel and the
# kernel's kernel_info reply (jupyter_client's kernel_info(); version: the Python that runs the kernel), keys
# sorted as nbformat writes them. A notebook saved without them is marked modified the moment it opens.
KERNELSPEC = {"display_name": "Python 3 (ipykernel)", "language": "python", "name": "python3"}
LANGUAGE_INFO = {"codemirror_mode": {"name": "ipython", "version": 3}, "file_extension": ".py",
                 "mimetype": "text/x-python", "name": "python", "nbconvert_exporter": "python",
                 "pygments_lexer": "ipython3", "version": platform.python_version()}
GPU_LAB_VARIABLES = ("MINILLAMA_MODEL", "MINILLAMA_PRESET", "MINILLAMA_DTYPE", "CUDA_VISIBLE_DEVICES")


def source_hash(nb: dict) -> str:
    """sha256 of the notebook's cells as a student sees them (type and source; never outputs or metadata)."""
    cells = [[c["cell_type"], "".join(c["source"]) if isinstance(c["source"], list) else c["source"]]
             for c in nb["cells"]]
    return hashlib.sha256(json.dumps(cells, ensure_ascii=False).encode("utf-8")).hexdigest()


def dumps(nb: dict) -> str:
    """The notebook's text as the committed files have it (nbformat's indent of 1, a trailing newline)."""
    return json.dumps(nb, indent=1, ensure_ascii=False) + "\n"


def write_atomic(path: Path, text: str) -> None:
    """Write text to path through a temporary file in the same folder, then rename (no half-written file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, path.stat().st_mode & 0o777 if path.exists() else 0o644)  # mkstemp's is 0600
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def set_metadata(path: Path) -> bool:
    """Give the notebook JupyterLab's kernelspec and language_info, changing nothing else in the file;
    returns whether the file changed."""
    text = path.read_text(encoding="utf-8")
    nb = json.loads(text)
    if dumps(nb) != text:
        raise ValueError(f"{path}: not in nbformat's layout (indent 1, trailing newline): save it from "
                         "JupyterLab first, so that only the metadata lines change here.")
    nb["metadata"]["kernelspec"] = dict(KERNELSPEC)
    nb["metadata"]["language_info"] = dict(LANGUAGE_INFO)
    if dumps(nb) == text:
        return False
    write_atomic(path, dumps(nb))
    return True


def machine() -> dict:
    """Where the copy was made: CPU model and cores (the load average is added around the run)."""
    cpu = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        names = [ln.split(":", 1)[1].strip() for ln in cpuinfo.read_text().splitlines() if ln.startswith("model name")]
        cpu = names[0] if names else cpu
    return {"cpu": cpu, "cores": os.cpu_count(), "platform": platform.platform()}


def git_commit() -> str:
    """The checkout's commit, with "+changes" when the working tree differs from it."""
    run = lambda *args: subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True).stdout.strip()
    commit = run("rev-parse", "HEAD") or "unknown"
    return commit + ("+changes" if run("status", "--porcelain", "--untracked-files=no") else "")


def stamp_cell(stamp: dict) -> dict:
    m = stamp["machine"]
    text = (f"**Executed copy** of [`notebooks/{stamp['notebook']}`](../../notebooks/{stamp['notebook']}), made by "
            f"`python scripts/execute_notebooks.py` in CPU mode: read it here, run the notebook itself.\n\n"
            f"| made | |\n| --- | --- |\n| date | {stamp['date']} |\n| machine | {m['cpu']}, {m['cores']} cores, "
            f"load average {m['load_before']} before, {m['load_after']} after |\n"
            f"| versions | torch {stamp['torch']}, Python {stamp['python']} |\n| git commit | `{stamp['commit']}` |\n"
            f"| source cells (sha256) | `{stamp['source_hash']}` |\n| run time | {stamp['seconds']} s |")
    return {"cell_type": "markdown", "id": "executed-copy-stamp", "metadata": {}, "source": text.splitlines(True)}


def cpu_mode_environment() -> None:
    """The kernels' environment: CPU mode, this checkout first on the path, and notebooks/kernel_wakeup.py as
    an IPython startup file in a private IPYTHONDIR (as the test run does; see that file)."""
    for name in GPU_LAB_VARIABLES:
        os.environ.pop(name, None)
    os.environ["MINILLAMA_DEVICE"] = "cpu"
    os.environ["PYTHONPATH"] = os.pathsep.join([str(REPO)] + [p for p in [os.environ.get("PYTHONPATH")] if p])
    ipython_dir = Path(tempfile.mkdtemp(prefix="minillama-ipython-"))
    (ipython_dir / "profile_default" / "startup").mkdir(parents=True)
    shutil.copy(NOTEBOOKS / "kernel_wakeup.py", ipython_dir / "profile_default" / "startup" / "00_wakeup.py")
    os.environ["IPYTHONDIR"] = str(ipython_dir)


def execute(path: Path, timeout: int) -> Path:
    """Run one notebook in a fresh kernel and write its stamped copy; returns the copy's path."""
    import nbclient
    import nbformat

    nb = nbformat.reads(path.read_text(encoding="utf-8"), as_version=4)
    stamp = {"notebook": path.name, "source_hash": source_hash(nb), "commit": git_commit(),
             "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
             "torch": version("torch"), "python": platform.python_version(), "machine": machine()}
    stamp["machine"]["load_before"] = " / ".join(f"{x:.2f}" for x in os.getloadavg())
    started = datetime.datetime.now().timestamp()
    try:
        nbclient.NotebookClient(nb, timeout=timeout, kernel_name="python3",
                                resources={"metadata": {"path": str(NOTEBOOKS)}}).execute()
    except nbclient.exceptions.CellExecutionError as e:
        raise RuntimeError(f"{path.name}: a cell failed, so no copy was written:\n{e}") from None
    stamp["machine"]["load_after"] = " / ".join(f"{x:.2f}" for x in os.getloadavg())
    stamp["seconds"] = round(datetime.datetime.now().timestamp() - started)
    nb.metadata["kernelspec"], nb.metadata["language_info"] = dict(KERNELSPEC), dict(LANGUAGE_INFO)
    nb.metadata[STAMP_KEY] = stamp
    nb.cells.insert(0, nbformat.from_dict(stamp_cell(stamp)))
    out = COPIES / path.name
    write_atomic(out, dumps(nb))
    return out


def select(only) -> list[Path]:
    """The notebooks named in `only` (by number, "03", or name), or all of them."""
    every = sorted(NOTEBOOKS.glob("[0-9][0-9]_*.ipynb"))
    if not only:
        return every
    chosen = [p for p in every if any(p.name == o or p.name.startswith(o.zfill(2) + "_") for o in only)]
    missing = [o for o in only if not any(p.name == o or p.name.startswith(o.zfill(2) + "_") for p in chosen)]
    if missing:
        raise SystemExit(f"--only {missing[0]}: no such notebook; expected a number or a name of "
                         f"{[p.name for p in every]}.")
    return chosen


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--only", nargs="+", help="notebooks by number (03) or file name")
    p.add_argument("--metadata-only", action="store_true", help="only set each notebook's kernelspec metadata")
    p.add_argument("--timeout", type=int, default=600, help="seconds per cell (default 600)")
    args = p.parse_args(argv)
    paths = select(args.only)
    if args.metadata_only:
        for path in paths:
            print(f"{path.name}: {'metadata set' if set_metadata(path) else 'already set'}")
        return 0
    cpu_mode_environment()
    for path in paths:
        try:
            out = execute(path, args.timeout)
        except RuntimeError as e:  # a failed cell: its copy is left as it was
            print(f"execute_notebooks: {e}", file=sys.stderr)
            return 1
        print(f"{path.name}: {json.loads(out.read_text())['metadata'][STAMP_KEY]['seconds']} s -> "
              f"{out.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
