"""`grade`: run the public and hidden tests on one submission and write Gradescope's results.json.

The grading tree is the student edition of the source (no solution text for the graded functions), with
the submission's marked modules copied over it, and nothing else of the submission (its tests, conftest,
pytest.ini, sitecustomize or .pth files are never used). The hidden tests, the test process and the pytest
configuration sit in a second, private temporary folder (the hidden tests as placeholders only: their
sources reach the test process on its stdin). Each test run is a fresh `python -I -B` process in the
sandbox of sandbox.py (its own session; as root also its own uid, no network, the hidden tests and the
reference out of sight) with a memory limit, a file-size limit and its output drained through a pipe (only
the start is kept); results come back on another pipe, each line carrying a nonce the process received
before any submitted code ran, and are assembled here, in the grader's process, which alone writes
results.json (a private temporary file renamed into place at the end). A test running past the per-test
timeout kills the process; the remaining tests run in a new one.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import resource
import secrets
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from . import sandbox
from .manifest import select
from .markers import scan
from .release import marked_modules, write_edition
from .results import build_results, validate

HERE = Path(__file__).resolve().parent
MAX_FILE = 1 << 20          # a submitted module larger than 1 MiB is refused
KEEP_OUTPUT = 16 << 10      # bytes of the test process's stdout/stderr kept for the log
QUOTE = 24                  # a line of a hidden test or of the reference this long is never shown
PLACEHOLDER = "# The grader passes this hidden test's source to the test process on its stdin.\n"
CANARY = '''import torch


def test_canary_allclose():
    assert torch.allclose(torch.zeros(3), torch.ones(3))


def test_canary_assert_close():
    torch.testing.assert_close(torch.zeros(3), torch.ones(3))


def test_canary_assert():
    assert 1 == 2
'''


@dataclass
class Limits:
    per_test: float = 120.0      # seconds
    collect: float = 0.0         # seconds to import the submission and collect the tests (0: per_test)
    overall: float = 900.0       # seconds, for the whole submission
    memory: int = 6 << 30        # bytes of address space of the test process
    file_size: int = 64 << 20    # bytes: the largest file the test process may write


@dataclass
class Run:
    """What the test processes reported: per pytest item, passed and a message; notes for the log."""
    items: dict = field(default_factory=dict)     # nodeid -> (file key, name)
    results: dict = field(default_factory=dict)   # nodeid -> (passed, message)
    collect_errors: dict = field(default_factory=dict)  # file name -> message
    reason: str = ""                              # why some tests have no result
    tampered: str = ""
    log: str = ""


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def copy_submission(submission: Path, tree: Path, modules: list[str]) -> list[str]:
    """Copy the allowlisted modules found in the submission (at their repository path, or at its top level
    under their file name) over the tree; returns notes, one per module, for the log."""
    notes = []
    for rel in modules:
        candidates = [submission / rel, submission / Path(rel).name]
        src = next((c for c in candidates if os.path.lexists(c)), None)
        if src is None:
            notes.append(f"{rel}: not in the submission (the stub is graded)")
            continue
        if src.is_symlink() or not src.is_file():
            notes.append(f"{rel}: not a regular file in the submission (ignored)")
            continue
        if src.stat().st_size > MAX_FILE:
            notes.append(f"{rel}: larger than {MAX_FILE >> 20} MiB (ignored)")
            continue
        (tree / rel).write_bytes(src.read_bytes())
        notes.append(f"{rel}: from the submission")
    return notes


def _read_only(tree: Path) -> None:
    for p in sorted(tree.rglob("*"), reverse=True):
        if not p.is_symlink():
            os.chmod(p, 0o555 if p.is_dir() else 0o444)


def _limits(limits: Limits, box: sandbox.Sandbox):
    def apply():
        os.setsid()
        resource.setrlimit(resource.RLIMIT_AS, (limits.memory, limits.memory))
        resource.setrlimit(resource.RLIMIT_FSIZE, (limits.file_size, limits.file_size))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writing past the limit fails instead of killing
        sandbox.enter(box)
    return apply


def _env(tree: Path, scratch: Path) -> dict:
    keep = {k: os.environ[k] for k in ("PATH", "LANG", "LC_ALL", "SYSTEMROOT") if k in os.environ}
    return {**keep, "HOME": str(tree), "TMPDIR": str(scratch), "OMP_NUM_THREADS": "2",
            "MINILLAMA_GRADING": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}


def _run_once(tree, private, ids, deselect, limits, deadline, run: Run, given) -> tuple[str, str]:
    """One test process over `ids` (minus `deselect`); fills `run`; returns (ending, current nodeid).
    given: what the process receives from the grader's memory (hashes, hidden sources, runner, sandbox)."""
    nonce = secrets.token_hex(16)
    r, w = os.pipe()
    (private / "pytest.ini").unlink(missing_ok=True)  # fresh: never a file (or link) the submission made
    (private / "pytest.ini").write_text("[pytest]\naddopts =\n")
    args = [sys.executable, "-I", "-B", "-c", given["runner"], str(tree), str(private / "hidden"), str(w),
            str(private / "pytest.ini"), *ids]
    proc = subprocess.Popen(args, cwd=tree, env=_env(tree, private / "tmp"), stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, pass_fds=(w,),
                            preexec_fn=_limits(limits, given["box"]))
    os.close(w)
    try:
        proc.stdin.write("".join(json.dumps(x) + "\n" for x in (nonce, given["hashes"], deselect, given["hidden"]))
                         .encode())
        proc.stdin.close()
    except OSError:
        pass
    sel = selectors.DefaultSelector()
    sel.register(r, selectors.EVENT_READ, "results")
    sel.register(proc.stdout, selectors.EVENT_READ, "output")
    buf, out, out_len, current, started, ending = b"", bytearray(), 0, "", time.monotonic(), ""
    t_start = started
    open_streams = 2
    while open_streams:
        now = time.monotonic()
        if ending == "done" and now - started > 5.0:  # its output still open: a child it left holds it
            break
        if now > deadline:
            ending = "overall"
            break
        if current and now - started > limits.per_test:
            ending = "per_test"
            break
        if not run.items and now - t_start > (limits.collect or limits.per_test):
            ending = "collection"
            break
        for key, _ in sel.select(timeout=0.5):
            data = os.read(key.fd, 65536) if key.data == "results" else proc.stdout.read1(65536)
            if not data:
                sel.unregister(key.fileobj)
                open_streams -= 1
                continue
            if key.data == "output":
                out_len += len(data)
                if len(out) < KEEP_OUTPUT:
                    out += data[:KEEP_OUTPUT - len(out)]
                continue
            buf += data
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                event = _parse(line, nonce)
                if event is None:
                    run.tampered = run.tampered or "a forged line on the result channel"
                    continue
                current, started = _apply(event, run, current, started)
                if event["event"] == "done":  # nothing on the channel after this is read
                    ending, started = "done", time.monotonic()
                    sel.unregister(r)
                    open_streams -= 1
                    break
    if ending in ("per_test", "overall", "collection"):
        _kill(proc)
    else:
        _kill(proc, grace=5.0)
    sel.close()
    os.close(r)
    code = proc.wait()
    sandbox.kill_leftovers(given["box"])
    run.log += out.decode("utf-8", "replace") + (f"\n[... {out_len - len(out)} more bytes of output cut]\n"
                                                  if out_len > len(out) else "")
    if not ending:
        ending = f"exit code {code}"
    return ending, current


def _parse(line: bytes, nonce: str):
    try:
        event = json.loads(line)
    except ValueError:
        return None
    if not isinstance(event, dict) or event.get("nonce") != nonce or "event" not in event:
        return None
    return event


def _apply(event, run: Run, current: str, started: float) -> tuple[str, float]:
    kind = event["event"]
    if kind == "collected":
        for nodeid, rel, name in event.get("items", []):
            run.items[str(nodeid)] = (str(rel), str(name))
    elif kind == "start":
        return str(event.get("nodeid")), time.monotonic()
    elif kind == "result":
        nodeid = str(event.get("nodeid"))
        if nodeid in run.results:
            run.tampered = run.tampered or f"two results for {nodeid}"
        run.results[nodeid] = (event.get("passed") is True, str(event.get("message", ""))[:600])
        return "", started
    elif kind == "collect_error":
        run.collect_errors[str(event.get("where"))] = str(event.get("message", ""))[:600]
    elif kind == "tampered":
        run.tampered = str(event.get("message", "tampering"))[:300]
    return current, started


def _kill(proc, grace: float = 0.0) -> None:
    if grace:
        try:
            proc.wait(timeout=grace)
            return
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def run_tests(tree: Path, private: Path, ids: list[str], limits: Limits, given: dict) -> Run:
    """Run the tests, restarting the test process after a crash or a timeout, within the overall limit."""
    run, deselect = Run(), []
    deadline = time.monotonic() + limits.overall
    while True:
        before = len(run.results)
        ending, current = _run_once(tree, private, ids, deselect, limits, deadline, run, given)
        if ending == "done" or run.tampered:
            return run
        if ending == "collection":
            run.reason = ("importing the submission and collecting the tests took longer than "
                          f"{limits.collect or limits.per_test:.0f} s")
            return run
        if ending == "overall":
            run.reason = f"the overall time limit ({limits.overall:.0f} s) ran out"
            if current:
                run.results.setdefault(current, (False, run.reason))
            return run
        if current:  # this test hung or ended the process: it fails, the others get another process
            why = (f"timed out after {limits.per_test:.0f} s" if ending == "per_test"
                   else f"the test process ended during this test ({ending})")
            run.results.setdefault(current, (False, why))
            deselect = sorted(run.results)
            continue
        if len(run.results) == before:  # ended before running any test: at import, say
            run.reason = f"the test process ended before running the remaining tests ({ending})"
            return run
        deselect = sorted(run.results)


def _private_dir(source: Path) -> tuple[Path, dict]:
    """The private folder: placeholders named like the hidden tests (pytest's node ids need a file), and
    the hidden sources themselves, kept in the grader's memory, with a fresh canary among them."""
    private = Path(tempfile.mkdtemp(prefix="grader-"))
    hidden = private / "hidden"
    hidden.mkdir()
    sources = {f.name: f.read_text(encoding="utf-8") for f in sorted((source / "assignments" / "hidden").glob("*.py"))}
    canary = f"test_canary_{secrets.token_hex(4)}.py"
    sources[canary] = CANARY
    for name in sources:
        (hidden / name).write_text(PLACEHOLDER)
    return private, {"canary": canary, "hidden": sources}


def _quote_finder(source: Path, tree: Path, hidden: dict):
    """A function telling whether a text quotes a line of a hidden test or of the reference solution (a line
    of at least QUOTE characters that the student edition does not hold)."""
    solution = [line for b in scan(source, marked_modules(source)) for line in b.body]
    public = {ln.strip() for p in tree.rglob("*.py") for ln in p.read_text(encoding="utf-8").splitlines()}
    secret = {ln.strip() for text in hidden.values() for ln in text.splitlines()} | {ln.strip() for ln in solution}
    secret = sorted(ln for ln in secret - public if len(ln) >= QUOTE)
    return lambda text: any(ln in text for ln in secret)


def _sandbox(source: Path) -> sandbox.Sandbox:
    """Hide the hidden tests (and, in the instructor edition, the reference solution) from the test user."""
    hide = [source / "assignments"] + ([source / "minillama"] if marked_modules(source) else [])
    return sandbox.plan(hide, source / "assignments" / "hidden")


def _prepare(source: Path, submission: Path, tree: Path, private: Path, info: dict, assignments) -> tuple:
    """The grading tree, read-only, with the submission's modules; returns (notes, hashes, quotes)."""
    write_edition(source, tree)
    quotes = _quote_finder(source, tree, info["hidden"])
    notes = copy_submission(submission, tree, marked_modules(source) or _stub_modules(tree))
    test_files = sorted({tid.split("::")[0] for a in assignments for tid, _ in a.tests})
    hashes = {}
    for path in [tree / rel for rel in test_files + ["tests/conftest.py"] if not rel.startswith("hidden/")]:
        if path.exists():
            hashes[str(path)] = _sha(path)
    _read_only(tree)
    _read_only(private / "hidden")
    os.chmod(tree, 0o555)  # the test user may enter and read, never write
    os.chmod(private, 0o755)
    return notes, hashes, quotes


def _scratch(private: Path, box: sandbox.Sandbox) -> None:
    """The test process's TMPDIR, its own (pytest refuses a basetemp that another uid created)."""
    (private / "tmp").mkdir(mode=0o700)
    if box.uid is not None:
        os.chown(private / "tmp", box.uid, box.uid)


def grade(source: Path, submission: Path, out: Path | None = None, *, only=None, tests=None,
          limits: Limits = Limits(), assignments=None) -> dict:
    """Grade `submission` against the tests of `source` (the instructor edition, or the autograder's copy
    of the student edition with the hidden tests); returns the results and writes them to `out` (removed
    first: a grader that does not finish leaves no results).

    only: assignment ids to grade (default all); tests: test ids or names to keep (default all);
    assignments: a manifest of its own (the tooling's tests use a short one)."""
    t0 = time.monotonic()
    source, submission = Path(source).resolve(), Path(submission).resolve()
    assignments = restrict(assignments or select(only), tests)
    if not submission.is_dir():
        raise FileNotFoundError(f"--submission {submission} is not a folder.")
    if out is not None:
        Path(out).unlink(missing_ok=True)
    box = _sandbox(source)
    tree = Path(tempfile.mkdtemp(prefix="grading-"))
    private, info = _private_dir(source)
    try:
        notes, hashes, quotes = _prepare(source, submission, tree, private, info, assignments)
        _scratch(private, box)
        ids = [(f"{private}/{tid}" if tid.startswith("hidden/") else tid) for a in assignments for tid, _ in a.tests]
        ids.append(f"{private}/hidden/{info['canary']}")
        given = {"hashes": hashes, "hidden": info["hidden"], "box": box,
                 "runner": (HERE / "runner.py").read_text(encoding="utf-8")}
        run = run_tests(tree, private, ids, limits, given)
        results = build_results(assignments, run, [box.describe(), ""] + notes, info["canary"],
                                time.monotonic() - t0, scrub=(str(tree), str(private)), quotes=quotes)
    finally:
        for d in (tree, private):
            for p in [d, *d.rglob("*")]:
                if p.is_dir() and not p.is_symlink():
                    os.chmod(p, 0o755)
            shutil.rmtree(d, ignore_errors=True)
    validate(results)
    if out is not None:
        write_json(Path(out), results)
    return results


def restrict(assignments, tests) -> tuple:
    """Keep only the tests named in `tests` (full ids or bare test names); refuse a name that matches none."""
    if not tests:
        return tuple(assignments)
    wanted = set(tests)
    kept = tuple(dataclasses.replace(a, tests=tuple(t for t in a.tests if t[0] in wanted or
                                                    t[0].split("::")[1] in wanted)) for a in assignments)
    known = {t[0] for a in assignments for t in a.tests} | {t[0].split("::")[1] for a in assignments for t in a.tests}
    unknown = sorted(wanted - known)
    if unknown:
        raise ValueError(f"--tests {unknown[0]!r} is not a graded test of the chosen assignments.")
    return tuple(a for a in kept if a.tests)


def _stub_modules(tree: Path) -> list[str]:
    """In a student edition (the autograder's source) the marked modules are those holding the stubs."""
    return sorted(p.relative_to(tree).as_posix() for p in (tree / "minillama").rglob("*.py")
                  if 'raise NotImplementedError("a' in p.read_text(encoding="utf-8"))


def write_json(path: Path, data: dict) -> None:
    """Write JSON atomically: a private temporary file next to it (created new, mode 0600, so nobody else
    can have opened it), then a rename over `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(data, indent=2, sort_keys=True) + "\n")
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
