"""`autograder`: Gradescope's autograder.zip. At its root: `setup.sh` (installs the CPU build of torch and the
package with its test dependencies), `run_autograder` (grades /autograder/submission into
/autograder/results/results.json), and the source it grades with: the STUDENT edition (no solution text: the
submission runs next to it), the hidden tests and this tooling. Gradescope unpacks it into /autograder/source.
The paths can be moved under another root with AUTOGRADER_ROOT (the tests do), and the Python chosen with
AUTOGRADER_PYTHON."""

from __future__ import annotations

import os
import shutil
import tempfile
import zipfile
from pathlib import Path

from .release import write_edition

TOOLING = ("__init__.py", "__main__.py", "markers.py", "release.py", "manifest.py", "runner.py", "sandbox.py",
           "grade.py", "results.py", "grade_all.py", "autograder.py", "gradescope_results.schema.json")

SETUP = """#!/usr/bin/env bash
# Gradescope runs this once, as root, when the autograder is built (Ubuntu image with python3).
set -euo pipefail
cd /autograder/source
python3 -m pip install --upgrade pip
python3 -m pip install torch --index-url https://download.pytorch.org/whl/cpu
python3 -m pip install -e '.[dev,quant]' jsonschema
"""

RUN = """#!/usr/bin/env bash
# Gradescope runs this for every submission; it writes $ROOT/results/results.json. Only a grader that ran to
# the end (exit status 0) leaves its results there: any file from before, or left by a grader that failed or
# was killed, is replaced by a failure that scores nothing.
set -uo pipefail
ROOT="${AUTOGRADER_ROOT:-/autograder}"
PY="${AUTOGRADER_PYTHON:-python3}"
RESULTS="$ROOT/results/results.json"
mkdir -p "$ROOT/results"
rm -f "$RESULTS"
cd "$ROOT/source"
"$PY" -m assignments grade --submission "$ROOT/submission" --out "$RESULTS" ${GRADE_ARGS:-}
status=$?
if [ "$status" -ne 0 ] || [ ! -s "$RESULTS" ]; then  # the grader failed or was killed: say so, score nothing
  tmp="$(mktemp "$ROOT/results/.failure.XXXXXX")"
  printf '{"score": 0, "execution_time": 0, "stdout_visibility": "visible", "tests": [], "output": "%s"}\\n' \\
    "The autograder failed (exit code $status); please tell the course staff." > "$tmp"
  chmod 644 "$tmp"
  mv -f "$tmp" "$RESULTS"
fi
"""


def _add(z: zipfile.ZipFile, name: str, data: bytes, mode: int = 0o644) -> None:
    info = zipfile.ZipInfo(name, date_time=(2000, 1, 1, 0, 0, 0))
    info.external_attr = (0o100000 | mode) << 16
    info.compress_type = zipfile.ZIP_DEFLATED
    z.writestr(info, data)


def build_autograder(root: Path, out: Path) -> None:
    """Write autograder.zip (deterministic: sorted entries, fixed dates), atomically."""
    root, out = Path(root).resolve(), Path(out).resolve()
    tmp_dir = Path(tempfile.mkdtemp(prefix="autograder-"))
    try:
        files = write_edition(root, tmp_dir)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp_zip = out.with_name(f".{out.name}.tmp")
        with zipfile.ZipFile(tmp_zip, "w") as z:
            _add(z, "setup.sh", SETUP.encode(), 0o755)
            _add(z, "run_autograder", RUN.encode(), 0o755)
            for rel in files:
                _add(z, rel, (tmp_dir / rel).read_bytes())
            for name in (n for n in TOOLING if f"assignments/{n}" not in files):  # not twice
                _add(z, f"assignments/{name}", (root / "assignments" / name).read_bytes())
            for f in sorted((root / "assignments" / "hidden").glob("*.py")):
                _add(z, f"assignments/hidden/{f.name}", f.read_bytes())
        os.replace(tmp_zip, out)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
