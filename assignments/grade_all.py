"""`grade-all`: grade every submission of a folder (one folder or .zip per student) into one CSV: a row per
student, a column per test and per assignment. A submission that cannot be graded is a row of zeros with
its reason; the run goes on."""

from __future__ import annotations

import csv
import shutil
import tempfile
import zipfile
from pathlib import Path

from tqdm import tqdm

from .grade import Limits, grade, restrict
from .manifest import select

MAX_UNPACKED = 50 << 20  # bytes a submission's zip may unpack to


def _unpack(archive: Path, dest: Path) -> Path:
    """Extract a zip safely (no absolute paths, no '..', no links, bounded size); returns the folder."""
    with zipfile.ZipFile(archive) as z:
        total = 0
        for info in z.infolist():
            name = Path(info.filename)
            if name.is_absolute() or ".." in name.parts or (info.external_attr >> 16) & 0o170000 == 0o120000:
                raise ValueError(f"{archive.name}: entry {info.filename!r} points outside the submission.")
            total += info.file_size
            if total > MAX_UNPACKED:
                raise ValueError(f"{archive.name}: unpacks to more than {MAX_UNPACKED >> 20} MiB.")
        z.extractall(dest)
    return dest


def columns(assignments) -> list[str]:
    cols = ["student", "total"] + [a.id for a in assignments]
    cols += [f"{a.id}:{tid.split('::')[1]}" for a in assignments for tid, _ in a.tests]
    return cols + ["reason"]


def row_for(student: str, results: dict | None, assignments, reason: str = "") -> dict:
    row = {c: 0.0 for c in columns(assignments)}
    row.update(student=student, reason=reason)
    if results is None:
        return row
    tests = iter(results["tests"])
    for a in assignments:
        for tid, _ in a.tests:
            score = next(tests)["score"]
            row[f"{a.id}:{tid.split('::')[1]}"] = score
            row[a.id] += score
    row["total"] = results["score"]
    return row


def grade_all(source: Path, submissions: Path, csv_path: Path, *, only=None, tests=None, limits: Limits = Limits(),
              assignments=None) -> list[dict]:
    submissions = Path(submissions)
    if not submissions.is_dir():
        raise FileNotFoundError(f"{submissions} is not a folder of submissions.")
    assignments = restrict(assignments or select(only), tests)
    entries = sorted(p for p in submissions.iterdir() if p.is_dir() or p.suffix == ".zip")
    rows = []
    for entry in tqdm(entries, desc="grading", unit="submission"):
        student = entry.stem if entry.suffix == ".zip" else entry.name
        tmp = Path(tempfile.mkdtemp(prefix="submission-"))
        try:
            folder = _unpack(entry, tmp) if entry.suffix == ".zip" else entry
            rows.append(row_for(student, grade(source, folder, limits=limits, assignments=assignments), assignments))
        except Exception as e:  # one bad submission never stops the others
            rows.append(row_for(student, None, assignments, f"{type(e).__name__}: {e}"[:300]))
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    csv_path.parent.mkdir(parents=True, exist_ok=True)
    tmp_csv = csv_path.with_name(f".{csv_path.name}.tmp")
    with open(tmp_csv, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns(assignments))
        writer.writeheader()
        writer.writerows(rows)
    tmp_csv.replace(csv_path)
    return rows
