"""`release`: the student edition, from an allowlist of the repository, with every solution replaced by a
stub. Written to a temporary folder next to the destination, then renamed (atomic); byte-identical
between two runs (files are written in sorted order, with a fixed modification time)."""

from __future__ import annotations

import fnmatch
import os
import re
import shutil
import tempfile
from pathlib import Path

from .markers import ANY_MARKER, MarkerError, student_source

# The student edition's own command: `python -m assignments test aN` (public tests; no grading tooling).
STUDENT_TOOLS = ("__init__.py", "__main__.py", "public.py")
# What the student edition holds (paths relative to the repository root); nothing else is copied.
ALLOW = ("README.md", "ARCHITECTURE.md", "pyproject.toml", "environment.yml", "minillama", "notebooks",
         "tests", "data", "docs", "benchmarks", "assignments/README.md", "assignments/a*/README.md",
         *(f"assignments/{name}" for name in STUDENT_TOOLS))
# Never copied, wherever they are (build outputs, caches, editor files).
EXCLUDE = ("__pycache__", "*.pyc", ".ipynb_checkpoints", "*.egg-info", ".pytest_cache", ".DS_Store", "runs",
           "build", ".git")
INSTRUCTOR_ONLY = ("tests/test_assignments.py", "tests/test_grader_security.py",  # the tooling's own tests
                   "tests/test_executed_notebooks.py")  # (they quote a solution line; the copies are left out)
# The notebooks' executed copies: run on the instructor edition, they print reference code (notebook 03 shows
# train_step's source), so students get the notebooks to run, not their outputs.
INSTRUCTOR_ONLY_DIRS = ("docs/notebooks",)
EXECUTED_LINK = re.compile(r"\[read it run\]\(docs/notebooks/[\w.-]+\.ipynb\)")
FIXED_MTIME = 946684800  # 2000-01-01: the same timestamps in every release
INSTRUCTORS = "\n## For instructors\n"  # assignments/README.md's instructor part: left out of the student edition
STUDENT_NOTE = ("\n## This edition\n\nThis is the student edition: the pieces of the five assignments in `minillama/`\n"
                "raise `NotImplementedError` until you write them, and `python -m assignments test aN` is its one\n"
                "assignment command. Grading runs on the course's side (Gradescope).\n")


def student_readme(text: str) -> str:
    """assignments/README.md for students: its student part, without the instructors' section and commands
    (already the student's when the source is itself a student edition, as in Gradescope's autograder)."""
    if text.endswith(STUDENT_NOTE) and INSTRUCTORS not in text:
        return text
    if INSTRUCTORS not in text:
        raise MarkerError(f"assignments/README.md: no line '{INSTRUCTORS.strip()}' found; the student edition "
                          "keeps the text above it.")
    return text.split(INSTRUCTORS)[0].rstrip("\n") + "\n" + STUDENT_NOTE


def _gitignored(root: Path) -> list[str]:
    """The plain patterns of the repository's .gitignore (large generated files stay out of the edition)."""
    f = root / ".gitignore"
    if not f.exists():
        return []
    lines = [ln.strip() for ln in f.read_text().splitlines()]
    return [ln.rstrip("/") for ln in lines if ln and not ln.startswith(("#", "!"))]


def _excluded(rel: str, ignored: list[str]) -> bool:
    parts = rel.split("/")
    if any(fnmatch.fnmatch(p, pat) for p in parts for pat in EXCLUDE):
        return True
    return any(fnmatch.fnmatch(rel, pat) or rel.startswith(pat + "/") or
               ("/" not in pat and any(fnmatch.fnmatch(p, pat) for p in parts)) for pat in ignored)


def allowed_files(root: Path) -> list[str]:
    """Sorted relative paths of the files the student edition holds (before stubbing)."""
    ignored = _gitignored(root)
    found = set()
    for pattern in ALLOW:
        for top in sorted(root.glob(pattern)):
            paths = [top] if top.is_file() else [p for p in top.rglob("*") if p.is_file()]
            for p in paths:
                rel = p.relative_to(root).as_posix()
                if (not p.is_symlink() and not _excluded(rel, ignored) and rel not in INSTRUCTOR_ONLY
                        and not rel.startswith(tuple(d + "/" for d in INSTRUCTOR_ONLY_DIRS))):
                    found.add(rel)
    return sorted(found)


def marked_modules(root: Path) -> list[str]:
    """The package modules holding solution blocks: the only files a submission may replace."""
    return [rel for rel in allowed_files(root) if rel.startswith("minillama/") and rel.endswith(".py")
            and "# BEGIN SOLUTION" in (root / rel).read_text(encoding="utf-8")]


def write_edition(root: Path, dest: Path) -> list[str]:
    """Write the student edition of `root` into the (new, empty) folder dest; returns the files written."""
    files = allowed_files(root)
    for rel in files:
        src, out = root / rel, dest / rel
        out.parent.mkdir(parents=True, exist_ok=True)
        if rel.endswith(".py"):
            text = student_source(rel, src.read_text(encoding="utf-8"))
            out.write_bytes(text.encode("utf-8"))
        elif rel == "assignments/README.md":
            out.write_bytes(student_readme(src.read_text(encoding="utf-8")).encode("utf-8"))
        elif rel == "README.md":  # its links to the executed copies, which this edition leaves out
            out.write_bytes(EXECUTED_LINK.sub("run it yourself", src.read_text(encoding="utf-8")).encode("utf-8"))
        else:
            data = src.read_bytes()
            if rel.endswith(".ipynb") and ANY_MARKER.search(
                    data.decode("utf-8", "replace")):
                raise MarkerError(f"{rel}: holds a solution marker; markers belong in minillama's .py files only.")
            out.write_bytes(data)
        os.chmod(out, 0o644)
    for p in sorted(dest.rglob("*"), reverse=True):
        os.utime(p, (FIXED_MTIME, FIXED_MTIME), follow_symlinks=False)
    return files


def release(root: Path, out: Path) -> list[str]:
    """Build the student edition of `root` at `out` atomically (a temporary folder, then a rename); an
    existing `out` is replaced. Raises MarkerError (naming file and line) before anything is written."""
    root, out = Path(root).resolve(), Path(out).resolve()
    if out == root or root in out.parents:
        raise ValueError(f"--out {out} is inside the repository {root}: choose a folder outside it.")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        files = write_edition(root, tmp)
        os.chmod(tmp, 0o755)
        if out.exists():
            old = out.with_name(f".{out.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return files
