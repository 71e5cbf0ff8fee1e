"""The grader against a student who attacks it (issue 29): a submission cannot write its own score, read the
hidden tests or the reference, or outlive its limits.

One hostile `minillama/model.py` tries, when the grader imports it, every attack in turn and records how
each ended; `FeedForward.forward` then raises that record, so the graded SwiGLU test fails with it in its
message while the KV-cache test (which the attacks leave alone) genuinely passes. As root the record must
show every attack refused, locally (the CLI, since a killed grader must not be this pytest process) and in
the Gradescope layout (autograder.zip unpacked under a fake AUTOGRADER_ROOT); without root the grader must
say which protections are off and still never show a hidden test or the reference. About 60 s on 2 cores.
"""

import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the tooling sits outside the package, at the repository root
if not (ROOT / "assignments" / "grade.py").exists():
    pytest.skip("the assignment tooling is in the instructor edition only", allow_module_level=True)

from assignments import sandbox  # noqa: E402
from assignments.autograder import build_autograder  # noqa: E402
from assignments.grade import grade  # noqa: E402
from assignments.results import validate  # noqa: E402
from test_assignments import FAST, KV, MINI, SOLUTION_LINE, SWIGLU, hostile_submission  # noqa: E402

CLI_LIMITS = ["--only", "a1", "--tests", SWIGLU, KV, "--memory-gib", "2.5", "--per-test-timeout", "20",
              "--timeout", "240"]
HIDDEN_LINE = "def test_swiglu_matches_the_formula():"
ROOT_ONLY = pytest.mark.skipif(not sandbox.is_root(), reason="dropping privileges needs root")

# Run at import of the submitted model.py. SOURCE (what the grader grades from) and MARK (a folder anyone
# may write, where the forked child leaves its pid) are filled in per test.
ATTACKS = r'''
import glob as _glob, json as _json, os as _os, signal as _signal, sys as _sys, time as _time
_RECORD, _LEAKED = [], []
_FAKE = _json.dumps({"score": 999, "execution_time": 0, "stdout_visibility": "visible", "tests": []})


def _try(name, attack):
    try:
        _RECORD.append(f"{name}: {attack()}")
    except Exception as e:
        _RECORD.append(f"{name}: {type(e).__name__}")


def _grader():
    """The nearest ancestor whose command line holds --out, and that path."""
    pid = _os.getppid()
    while pid > 1:
        argv = open(f"/proc/{pid}/cmdline", "rb").read().decode().split("\0")
        if "--out" in argv:
            return pid, argv[argv.index("--out") + 1]
        pid = int(open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[1])
    raise LookupError("no grader among the ancestors")


def _read(paths, needle, keep):
    errors = set()
    for path in paths:
        try:
            text = open(path, errors="replace").read()
        except OSError as e:
            errors.add(type(e).__name__)
            continue
        if needle in text:
            _LEAKED.append(keep(text).replace("\n", " | "))
            return "read " + path
    return f"refused ({', '.join(sorted(errors))})" if errors else "refused (nothing found)"


def _write(paths):
    errors = set()
    for path in paths:
        try:
            open(path, "a").write("\n# changed by the submission\n")
            return "changed " + path
        except OSError as e:
            errors.add(type(e).__name__)
    return f"refused ({', '.join(sorted(errors))})"


def _fork_a_writer():
    """A detached grandchild that keeps trying to write the results for a minute."""
    if _os.fork() == 0:
        _os.setsid()
        if _os.fork() == 0:
            open(f"{MARK}/{_os.getpid()}.pid", "w").close()
            for _ in range(200):
                _time.sleep(0.3)
                try:
                    open(_grader()[1], "w").write(_FAKE)
                except Exception:
                    pass
        _os._exit(0)
    _os.wait()
    return "started"


_hidden = [p for p in _sys.path if p.endswith("hidden")]
'''
TRIES = {  # attack: the line that tries it (in this order)
    "write results": '_try("write results", lambda: open(_grader()[1], "w").write(_FAKE) and "wrote")',
    "read hidden": '_try("read hidden", lambda: _read([SOURCE + "/assignments/hidden/test_a1_llama.py"] + '
                   '[p + "/test_a1_llama.py" for p in _hidden], HIDDEN_LINE, lambda t: t[:400]))',
    "read reference": '_try("read reference", lambda: _read([SOURCE + "/minillama/model.py"], SOLUTION_LINE, '
                      'lambda t: t[t.index(SOLUTION_LINE) - 120:][:240]))',
    "change files": '_try("change files", lambda: _write([_os.getcwd() + "/tests/test_model.py", '
                    '_os.getcwd() + "/tests/conftest.py"] + [p + "/test_a1_llama.py" for p in _hidden] + '
                    '[_os.path.dirname(p) + "/pytest.ini" for p in _hidden] + '
                    '[SOURCE + "/assignments/runner.py", SOURCE + "/assignments/results.py"]))',
    "fork child": '_try("fork child", _fork_a_writer)',
    "kill group": '_try("kill group", lambda: _os.killpg(_os.getpgid(_grader()[0]), _signal.SIGKILL) or "killed")',
    "kill grader": '_try("kill grader", lambda: _os.kill(_grader()[0], _signal.SIGKILL) or "killed")',
}
BODY = 'raise NotImplementedError("attacks: " + "; ".join(_RECORD) + " || " + " || ".join(_LEAKED))'


def attack_submission(folder: Path, source: Path, mark: Path, tries=tuple(TRIES)) -> Path:
    """The reference model.py with the attacks `tries` run at import and FeedForward.forward raising their
    record."""
    constants = f"SOURCE, MARK = {str(source)!r}, {str(mark)!r}\n"
    constants += f"SOLUTION_LINE, HIDDEN_LINE = {SOLUTION_LINE!r}, {HIDDEN_LINE!r}\n"
    return hostile_submission(folder, constants + ATTACKS + "".join(TRIES[t] + "\n" for t in tries), BODY)


def open_folder(mode: int):
    """A folder in /tmp with `mode` (pytest's tmp_path is closed to other users: a refusal there would
    prove nothing about the grader); removed afterwards."""
    path = Path(tempfile.mkdtemp(prefix="grader-attack-"))
    os.chmod(path, mode)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture()
def mark():
    """Where the forked child leaves its pid: a folder anyone may write."""
    yield from open_folder(0o1777)


@pytest.fixture()
def outdir():
    """The folder of results.json: anyone may enter and read it, as /autograder/results."""
    yield from open_folder(0o755)


@pytest.fixture(scope="module")
def gradescope():
    """autograder.zip, built once and unpacked as Gradescope does, under a fake root (mode 0755)."""
    for root in open_folder(0o755):
        build_autograder(ROOT, root / "autograder.zip")
        with zipfile.ZipFile(root / "autograder.zip") as z:
            z.extractall(root / "source")
        yield root


def record_of(results: dict) -> dict:
    """The attacks' record, from the failure message of the SwiGLU test: {attack: how it ended}."""
    message = next(t["output"] for t in results["tests"] if "swiglu" in t["name"])
    assert "attacks: " in message, message
    entries = message.split("attacks: ", 1)[1].split(" ||")[0].split("; ")
    return dict(e.split(": ", 1) for e in entries)


def check_refused(results: dict, mark: Path) -> None:
    """Every attack refused, the results complete and scored only for the genuine pass, no child left."""
    validate(results)
    assert [t["score"] for t in results["tests"]] == [0.0, 2.0] and results["score"] == 2.0, results  # KV: 2
    record = record_of(results)
    assert record["write results"] == "PermissionError", record
    assert record["read hidden"].startswith("refused"), record
    assert record["read reference"].startswith("refused"), record
    assert record["change files"].startswith("refused"), record
    assert record["kill group"] == record["kill grader"] == "PermissionError", record
    assert record["fork child"] == "started", record
    pids = [int(p.stem) for p in mark.glob("*.pid")]
    assert len(pids) == 1
    state = Path(f"/proc/{pids[0]}/status")
    assert not state.exists() or "zombie" in state.read_text(), "the forked child outlived the grading"
    assert "protection off" not in results["output"]
    assert SOLUTION_LINE not in json.dumps(results) and HIDDEN_LINE not in json.dumps(results)


@ROOT_ONLY
def test_attacks_on_the_local_grader_are_refused(tmp_path, mark, outdir):
    sub = attack_submission(tmp_path / "submission", ROOT, mark)
    out = outdir / "results.json"
    out.write_text('{"score": 57}')  # a file from before never survives
    proc = subprocess.run([sys.executable, "-m", "assignments", "grade", "--submission", str(sub), "--out", str(out),
                           *CLI_LIMITS], cwd=ROOT, capture_output=True, text=True, timeout=400,
                          start_new_session=True)  # should the sandbox fail, the attacks kill that session only
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = json.loads(out.read_text())
    check_refused(results, mark)
    assert "sandbox of the test process: its own session, uid/gid" in results["output"]


@ROOT_ONLY
def test_attacks_in_the_gradescope_layout_are_refused(gradescope, tmp_path, mark):
    root = gradescope
    shutil.rmtree(root / "submission", ignore_errors=True)
    shutil.rmtree(root / "results", ignore_errors=True)
    sub = attack_submission(tmp_path / "submission", root / "source", mark)
    shutil.copytree(sub / "minillama", root / "submission")  # the files at the top level, as students upload
    env = {**os.environ, "AUTOGRADER_ROOT": str(root), "AUTOGRADER_PYTHON": sys.executable,
           "GRADE_ARGS": " ".join(CLI_LIMITS)}
    subprocess.run(["bash", str(root / "source" / "run_autograder")], env=env, check=True, timeout=400, cwd=tmp_path,
                   start_new_session=True)
    results = json.loads((root / "results" / "results.json").read_text())
    check_refused(results, mark)


def test_without_root_the_grader_says_what_is_off_and_shows_no_hidden_text(tmp_path, mark, monkeypatch):
    """The TA's laptop: no privilege drop, so the attacks may read; the grader still shows none of it."""
    monkeypatch.setattr(sandbox, "is_root", lambda: False)
    monkeypatch.chdir(tmp_path)
    # only the reads: the test process really runs as this pytest's user here (root, say), unsandboxed
    sub = attack_submission(tmp_path / "submission", ROOT, mark, tries=("read hidden", "read reference"))
    results = grade(ROOT, sub, tmp_path / "results.json", limits=FAST, assignments=MINI)
    validate(results)
    assert [t["score"] for t in results["tests"]] == [0.0, 1.0], results["tests"]
    assert "protection off: the grader is not root" in results["output"]
    swiglu = results["tests"][0]["output"]
    assert "withheld: it quoted a hidden test or the reference solution" in swiglu, swiglu
    everything = json.dumps(results)
    assert SOLUTION_LINE not in everything and HIDDEN_LINE not in everything
    assert "Hidden tests of assignment 1" not in everything


FAKE_GRADERS = {  # what a grader that does not finish leaves: run_autograder must score nothing
    "killed_after_writing_full_marks": "write; os.kill(os.getpid(), signal.SIGKILL)",
    "exits_1_after_writing_full_marks": "write; sys.exit(1)",
    "exits_0_without_writing": "pass",
}


@pytest.mark.parametrize("case", sorted(FAKE_GRADERS))
def test_run_autograder_never_keeps_results_of_a_grader_that_failed(gradescope, tmp_path, case):
    fake = tmp_path / "python"
    fake.write_text(f"#!{sys.executable}\nimport json, os, signal, sys\nout = sys.argv[sys.argv.index('--out') + 1]\n"
                    "write = lambda: open(out, 'w').write(json.dumps({'score': 57, 'execution_time': 0, "
                    "'stdout_visibility': 'visible', 'tests': []}))\n"
                    + FAKE_GRADERS[case].replace("write; ", "write(); ") + "\n")
    fake.chmod(0o755)
    root = tmp_path / "autograder"  # a copy of the layout: the tooling's script, a results.json from before
    (root / "results").mkdir(parents=True)
    (root / "submission").mkdir()
    (root / "source").mkdir()
    shutil.copy(gradescope / "source" / "run_autograder", root / "source" / "run_autograder")
    (root / "results" / "results.json").write_text('{"score": 57, "tests": []}')
    env = {**os.environ, "AUTOGRADER_ROOT": str(root), "AUTOGRADER_PYTHON": str(fake)}
    subprocess.run(["bash", str(root / "source" / "run_autograder")], env=env, check=True, timeout=60)
    results = json.loads((root / "results" / "results.json").read_text())
    validate(results)
    assert results["score"] == 0 and "The autograder failed" in results["output"], results
    assert [p.name for p in (root / "results").iterdir()] == ["results.json"]


def test_where_namespaces_are_refused_the_hidden_folder_is_closed_and_the_rest_listed(monkeypatch):
    """A container that refuses unshare (Docker's default): the uid still drops, the hidden tests' folder
    becomes owner-only, and what stays readable (the reference) is named as a protection that is off."""
    for source in open_folder(0o755):
        hidden, reference = source / "assignments" / "hidden", source / "minillama"
        hidden.mkdir(parents=True)
        reference.mkdir()
        monkeypatch.setattr(sandbox, "is_root", lambda: True)
        monkeypatch.setattr(sandbox, "_works", lambda box: not box.hide and not box.network)
        box = sandbox.plan([hidden.parent, reference], hidden)
        assert box.uid is not None and not box.hide and not box.network
        assert stat.S_IMODE(hidden.stat().st_mode) == 0o700
        off = "\n".join(box.off)
        assert "no network namespace" in off and f"{reference} stays readable" in off, off
        assert f"{hidden.parent} stays" not in off
        assert all(f"protection off: {why}." in box.describe() for why in box.off)
