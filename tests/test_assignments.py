"""The assignment tooling (assignments/): the student edition, the grader and its defences, Gradescope.

The reference (this repository) must get full marks and a fresh student edition zero; the student edition
must hold no solution line, marker or hidden test; every results.json must validate against the schema in
assignments/; hostile submissions must end with a complete results.json that scores nothing they did not
genuinely pass. The hostile cases grade two fast hidden tests of assignment 1 only.
"""

import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the tooling sits outside the package, at the repository root
if not (ROOT / "assignments" / "grade.py").exists():
    pytest.skip("the assignment tooling is in the instructor edition only", allow_module_level=True)

from assignments.grade import Limits, grade  # noqa: E402
from assignments.grade_all import grade_all  # noqa: E402
from assignments.manifest import ASSIGNMENTS, Assignment  # noqa: E402
from assignments.markers import MarkerError, find_blocks, scan, student_source  # noqa: E402
from assignments.public import PUBLIC  # noqa: E402
from assignments.release import STUDENT_TOOLS, marked_modules, release, student_readme  # noqa: E402
from assignments.results import build_results, validate  # noqa: E402

SWIGLU = "hidden/test_a1_llama.py::test_swiglu_matches_the_formula"
KV = "hidden/test_a1_llama.py::test_kv_cache_update_writes_in_place_at_an_offset"
MINI = (Assignment("a1", "a1_llama", "LLaMA components", "01_llama_from_scratch.ipynb", ((SWIGLU, 1), (KV, 1))),)
FAST = Limits(per_test=20.0, collect=60.0, overall=240.0, memory=int(2.5 * (1 << 30)))
SOLUTION_LINE = "return self.w2(F.silu(self.w1(x)) * self.w3(x))"


@pytest.fixture(scope="module")
def student(tmp_path_factory):
    out = tmp_path_factory.mktemp("edition") / "student"
    release(ROOT, out)
    return out


# ---- markers and the release ---------------------------------------------------------------------------
@pytest.mark.parametrize("source,problem", [
    ("def f():\n    # BEGIN SOLUTION a1\n    return 1\n", "2: BEGIN SOLUTION is never closed"),
    ("def f():\n    # END SOLUTION\n", "2: END SOLUTION without"),
    ("def f():\n    # BEGIN SOLUTION a1\n    # BEGIN SOLUTION a1\n    # END SOLUTION\n", "3: BEGIN SOLUTION inside"),
    ("def f():\n    # BEGIN SOLUTION\n    return 1\n    # END SOLUTION\n", "2: BEGIN SOLUTION without an assignment tag"),
    ("# BEGIN SOLUTION a1\nx = 1\n# END SOLUTION\n", "1: a solution block must sit inside a function"),
])
def test_bad_markers_are_refused_naming_file_and_line(source, problem):
    with pytest.raises(MarkerError, match="mod.py:" + problem.replace("(", r"\(")):
        find_blocks("mod.py", source)


def test_a_block_becomes_a_stub_keeping_signature_docstring_and_indentation():
    source = ('class A:\n    def f(self, x: int) -> int:\n        """Doc."""\n        # BEGIN PROMPT\n'
              '        # hint\n        # END PROMPT\n        # BEGIN SOLUTION a3\n        return x\n        # END SOLUTION\n')
    assert student_source("m.py", source) == ('class A:\n    def f(self, x: int) -> int:\n        """Doc."""\n'
                                              '        # hint\n        raise NotImplementedError("a3: A.f")\n')


def test_every_assignment_has_blocks_and_a_handout():
    blocks = scan(ROOT, marked_modules(ROOT))
    assert {b.assignment for b in blocks} == {a.id for a in ASSIGNMENTS}
    for a in ASSIGNMENTS:
        handout = (ROOT / "assignments" / a.folder / "README.md").read_text()
        assert all(tid.split("::")[1] in handout for tid, _ in a.tests if tid.startswith("tests/"))


def test_release_is_deterministic_and_holds_no_solution(student, tmp_path):
    again = release(ROOT, tmp_path / "again")
    files = sorted(p.relative_to(student).as_posix() for p in student.rglob("*") if p.is_file())
    assert files == again and all((student / f).read_bytes() == (tmp_path / "again" / f).read_bytes() for f in files)
    assert not (student / "assignments" / "hidden").exists()
    tools = [f for f in files if f.startswith("assignments/") and not f.endswith("README.md")]
    assert tools == sorted(f"assignments/{name}" for name in STUDENT_TOOLS)
    text = {f: (student / f).read_text(errors="replace") for f in files if f.endswith((".py", ".ipynb"))}
    for f, t in text.items():
        assert "BEGIN SOLUTION" not in t and "END SOLUTION" not in t and "BEGIN PROMPT" not in t, f
    blocks = scan(ROOT, marked_modules(ROOT))
    stubs = sum(t.count('raise NotImplementedError("a') for t in text.values())
    assert stubs == len(blocks)
    package = "\n".join(t for f, t in text.items() if f.startswith("minillama/"))
    instructor = "\n".join((ROOT / f).read_text() for f in text if f.startswith("minillama/"))
    everything = "\n".join(text.values())
    for b in blocks:
        assert "\n".join(b.body) not in everything, f"{b.path}:{b.qualname}"
        for line in b.body:  # a solution line survives only as often as it occurs outside the solutions
            line = line.strip()
            if len(line) >= 20 and not line.startswith("#"):
                inside = sum("\n".join(c.body).count(line) for c in blocks)
                assert package.count(line) == instructor.count(line) - inside, f"{b.path}:{b.qualname}: {line}"


def test_student_edition_imports_and_its_cli_starts(student):
    env = {**os.environ, "PYTHONPATH": str(student)}
    code = "import minillama, minillama.lora, minillama.quant, minillama.training.train, minillama.evaluation.evaluate"
    subprocess.run([sys.executable, "-c", code], cwd=student, env=env, check=True, timeout=300)
    out = subprocess.run([sys.executable, "-m", "minillama.cli", "--help"], cwd=student, env=env, timeout=300,
                         capture_output=True, text=True)
    assert out.returncode == 0 and "usage" in out.stdout


def test_student_readme_is_the_students_own(student):
    text = (student / "assignments" / "README.md").read_text()
    assert "This is the student edition" in text and "python -m assignments test a1" in text
    for instructor_only in ("For instructors", "instructor edition", "assignments release", "assignments grade",
                            "assignments autograder", "hidden/", "test_assignments.py"):
        assert instructor_only not in text, instructor_only
    for readme in ("README.md", "ARCHITECTURE.md"):  # true in both editions: no "the package is the solution"
        assert "is the reference solution" not in (student / readme).read_text(), readme
    with pytest.raises(MarkerError, match="assignments/README.md: no line '## For instructors' found"):
        student_readme("# Assignments\n")  # a README the cut cannot find: refused, not shipped whole
    assert student_readme(text) == text  # an edition made from a student edition (the autograder's source)


def test_student_edition_leaves_out_the_executed_notebooks(student):
    """The executed copies print reference code (notebook 03 shows train_step's source): the student edition has
    the notebooks to run, not their outputs, and its README links none of the copies."""
    assert list((ROOT / "docs" / "notebooks").glob("*.ipynb")), "the instructor edition holds executed copies"
    assert not (student / "docs" / "notebooks").exists()
    assert not (student / "tests" / "test_executed_notebooks.py").exists()  # it would fail there, for lack of copies
    readme = (student / "README.md").read_text()
    assert "docs/notebooks/0" not in readme and "run it yourself" in readme


def test_each_assignments_public_command_holds_its_graded_public_tests():
    for a in ASSIGNMENTS:
        graded = {tid for tid, _ in a.tests if tid.startswith("tests/")}
        assert graded <= set(PUBLIC[a.id].tests), a.id
        assert all(need < a.id for need in PUBLIC[a.id].needs), a.id  # only earlier assignments
        assert f"python -m assignments test {a.id}" in (ROOT / "assignments" / a.folder / "README.md").read_text()


def test_public_a1_command_passes_with_only_a1_done(tmp_path):
    """A student edition in which a1's blanks hold the reference code and every other piece is still a stub:
    `python -m assignments test a1` passes, a2's fails on its own stub, and no instructor command exists."""
    edition = tmp_path / "student"
    release(ROOT, edition)
    for rel in marked_modules(ROOT):
        (edition / rel).write_text(student_source(rel, (ROOT / rel).read_text(), solved=("a1",)))
    env = {**os.environ, "PYTHONPATH": str(edition)}
    run = lambda *args: subprocess.run([sys.executable, "-m", "assignments", *args], cwd=edition, env=env,
                                       capture_output=True, text=True, timeout=900)
    a1 = run("test", "a1")
    assert a1.returncode == 0 and re.search(r"\n\d+ passed in", a1.stdout), a1.stdout[-3000:]
    assert "failed" not in a1.stdout and "need nothing else" in a1.stdout and "test_logits_equal_hf" in a1.stdout
    a2 = run("test", "a2")
    assert a2.returncode == 1 and 'NotImplementedError: a2: ' in a2.stdout and "need a1 done" in a2.stdout
    grade_cmd = run("grade", "--submission", ".", "--out", "r.json")
    assert grade_cmd.returncode == 2 and "invalid choice: 'grade'" in grade_cmd.stderr


def test_grade_output_says_the_failing_canaries_cost_nothing():
    from assignments.grade import Run
    run = Run()
    canary = "test_canary_0123abcd.py"
    for name in ("test_canary_allclose", "test_canary_assert_close", "test_canary_assert"):
        run.items[f"h/{canary}::{name}"] = (f"hidden/{canary}", name)
        run.results[f"h/{canary}::{name}"] = (False, "assert False")
    run.items["h/t.py::test_swiglu_matches_the_formula"] = ("hidden/test_a1_llama.py", "test_swiglu_matches_the_formula")
    run.results["h/t.py::test_swiglu_matches_the_formula"] = (True, "")
    run.log = "F.FF\n3 failed, 1 passed"
    results = build_results(MINI, run, [], canary, 1.0)
    assert results["score"] == 1.0 and [t["score"] for t in results["tests"]] == [1.0, 0.0]
    assert "3 canary checks (test_canary_*), which fail on purpose; 3 of them failed as they must" in results["output"]
    assert "at no cost in points" in results["output"]


# ---- grading: the reference and the student edition ---------------------------------------------------
def test_reference_gets_full_marks_and_the_student_edition_zero(student, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    ref = grade(ROOT, ROOT, tmp_path / "ref.json")
    assert [t["name"] for t in ref["tests"] if t["score"] != t["max_score"]] == []
    assert ref["score"] == sum(a.max_score for a in ASSIGNMENTS)
    validate(json.loads((tmp_path / "ref.json").read_text()))
    stub = grade(ROOT, student, tmp_path / "stub.json")
    assert stub["score"] == 0
    for t in stub["tests"]:
        assert "NotImplementedError" in t["output"], t
    hidden = [t for t in stub["tests"] if t["name"].endswith("(hidden)")]
    assert hidden and all(t["visibility"] == "after_published" for t in hidden)
    assert all(t["visibility"] == "visible" for t in stub["tests"] if t not in hidden)


def test_a_broken_results_file_fails_validation():
    with pytest.raises(ValueError, match="tests"):
        validate({"score": 1, "execution_time": 1, "stdout_visibility": "hidden"})
    with pytest.raises(ValueError, match="visibility"):
        validate({"execution_time": 1, "stdout_visibility": "hidden", "tests": [
            {"name": "t", "number": "1", "score": 0, "max_score": 1, "output": "", "visibility": "sometimes"}]})


# ---- hostile submissions ----------------------------------------------------------------------------------
FIND_SOLUTION = f'''
import os as _os, sys as _sys
_FOUND = None
_places = [_os.path.dirname(_os.path.dirname(_os.path.abspath(__file__))), _os.getcwd(), _os.environ.get("HOME", ""),
           "/proc/self/cwd", "/proc/%d/cwd" % _os.getppid()]
_places += [p for p in _sys.path if p and not p.startswith((_sys.prefix, _sys.base_prefix))]  # not the stdlib
for _place in _places:
    for _dir, _subdirs, _files in _os.walk(_place):
        _subdirs[:] = [d for d in _subdirs if d not in ("proc", "sys", "dev")]
        for _f in _files:
            try:
                _text = open(_os.path.join(_dir, _f), errors="ignore").read()
            except OSError:
                continue
            if {SOLUTION_LINE!r} in _text and not _os.path.samefile(_os.path.join(_dir, _f), __file__):
                _FOUND = _text
'''
REWRITE_TESTS = '''
import os as _os, sys as _sys
_tree = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
for _place in [_os.path.join(_tree, "tests")] + [p for p in _sys.path if "hidden" in p]:
    for _f in _os.listdir(_place):
        if _f.startswith("test_") or _f == "conftest.py":
            _path = _os.path.join(_place, _f)
            _os.chmod(_place, 0o755)
            _os.chmod(_path, 0o644)
            open(_path, "w").write("def test_swiglu_matches_the_formula():\\n    pass\\n"
                                   "def test_kv_cache_update_writes_in_place_at_an_offset():\\n    pass\\n")
'''
FAKE_RESULTS = '''
import json as _json, os as _os
_fake = _json.dumps({"score": 999, "execution_time": 0, "stdout_visibility": "visible", "tests": []})
for _d in {_os.getcwd(), _os.environ.get("HOME", ""), _os.environ.get("TMPDIR", ""), "/proc/%d/cwd" % _os.getppid(),
           _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))}:
    try:
        open(_os.path.join(_d, "results.json"), "w").write(_fake)
    except OSError:
        pass
_line = _json.dumps({"event": "result", "nodeid": "hidden/test_a1_llama.py::test_swiglu_matches_the_formula",
                     "passed": True, "message": "", "nonce": "guess"}) + "\\n"
for _fd in range(3, 30):
    try:
        _os.write(_fd, _line.encode())
    except OSError:
        pass
'''
WRONG = "return torch.zeros_like(x)"
HOSTILE = {  # name: (code run at import, FeedForward.forward's body, expected scores, words in the reason,
    # alternatives separated by |)
    "syntax_error": ("def broken(:\n", None, {SWIGLU: 0, KV: 0}, "SyntaxError"),
    "loop_at_import": ("while True:\n    pass\n", None, {SWIGLU: 0, KV: 0}, "took longer than"),
    "loop_in_tested_function": ("", "while True:\n    pass", {SWIGLU: 0, KV: 1}, "timed out"),
    "os_exit_at_import": ("import os\nos._exit(0)\n", None, {SWIGLU: 0, KV: 0}, "ended"),
    "sys_exit_at_import": ("import sys\nsys.exit(0)\n", None, {SWIGLU: 0, KV: 0}, "SystemExit"),
    "prints_megabytes": ("print('x' * (8 << 20))\n", f"print('y' * (8 << 20))\n{SOLUTION_LINE}", {SWIGLU: 1, KV: 1}, "passed"),
    "allocates_until_oom": ("", "hog = []\nwhile True:\n    hog.append(bytearray(1 << 26))", {SWIGLU: 0, KV: 1}, "MemoryError"),
    # refused as root (the sandbox's uid cannot chmod the grader's files), caught by the hashes otherwise
    "rewrites_test_files": (REWRITE_TESTS, WRONG, {SWIGLU: 0, KV: 0}, "changed|PermissionError"),
    "patches_allclose": ("import torch\ntorch.allclose = lambda *a, **k: True\ntorch.testing.assert_close = lambda *a, **k: None\n",
                         WRONG, {SWIGLU: 0, KV: 0}, "tamper"),
    "patches_pytest": ("import _pytest.reports\n_pytest.reports.TestReport.passed = property(lambda self: True)\n"
                       "_pytest.reports.TestReport.failed = property(lambda self: False)\n"
                       "_pytest.reports.TestReport.outcome = property(lambda self: 'passed', lambda self, v: None)\n",
                       WRONG, {SWIGLU: 0, KV: 0}, "tamper"),
    "reads_solution_from_disk": (FIND_SOLUTION, "if _FOUND is None:\n    return torch.zeros_like(x)\n" + SOLUTION_LINE,
                                 {SWIGLU: 0, KV: 1}, "failed"),
    "writes_fake_results": (FAKE_RESULTS, WRONG, {SWIGLU: 0, KV: 0}, "tamper"),
}


def hostile_submission(folder: Path, at_import: str, body) -> Path:
    source = (ROOT / "minillama" / "model.py").read_text()
    anchor = "from .rope import apply_rope, rope_cos_sin\n"
    source = source.replace(anchor, anchor + at_import)
    if body is not None:  # the whole a1 block of FeedForward.forward becomes `body`
        indented = "\n".join("        " + line for line in body.split("\n"))
        marker = "# BEGIN SOLUTION a1\n"
        begin = source.index(marker, source.index("class FeedForward")) + len(marker)
        end = source.index("        # END SOLUTION", begin)
        source = source[:begin] + indented + "\n" + source[end:]
    (folder / "minillama").mkdir(parents=True)
    (folder / "minillama" / "model.py").write_text(source)
    return folder


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_submission_scores_only_what_genuinely_passed(case, tmp_path, monkeypatch):
    at_import, body, expected, reason = HOSTILE[case]
    sub = hostile_submission(tmp_path / "submission", at_import, body)
    work = tmp_path / "work"  # the grader's own working folder: the submission must learn nothing from it
    work.mkdir()
    monkeypatch.chdir(work)
    out = tmp_path / "out" / "results.json"
    grade(ROOT, sub, out, limits=FAST, assignments=MINI)
    results = json.loads(out.read_text())
    validate(results)
    scores = {t["name"].split(": ")[1].replace(" (hidden)", ""): t["score"] for t in results["tests"]}
    assert scores == {tid.split("::")[1]: float(v) for tid, v in expected.items()}, results["tests"]
    swiglu = results["tests"][0]
    assert any(r in swiglu["output"] + results["output"] for r in reason.split("|")), swiglu
    assert results["execution_time"] < FAST.overall + 30
    assert len(json.dumps(results)) < 200_000
    assert not (work / "results.json").exists() or results["score"] <= 2


# ---- grade-all and Gradescope -----------------------------------------------------------------------------
def test_grade_all_writes_one_row_per_student_with_reasons(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    subs = tmp_path / "subs"
    hostile_submission(subs / "alice", "", None)  # the reference model.py
    with zipfile.ZipFile(subs / "mallory.zip", "w") as z:
        z.writestr("../../escape.py", "x = 1\n")
    rows = grade_all(ROOT, subs, tmp_path / "grades.csv", limits=FAST, assignments=MINI)
    assert [r["student"] for r in rows] == ["alice", "mallory"]
    assert rows[0]["total"] == 2 and rows[0]["a1"] == 2 and rows[0]["reason"] == ""
    assert rows[1]["total"] == 0 and "outside the submission" in rows[1]["reason"]
    header = (tmp_path / "grades.csv").read_text().splitlines()[0].split(",")
    assert header[:3] == ["student", "total", "a1"] and "a1:test_swiglu_matches_the_formula" in header


def test_autograder_zip_runs_in_gradescope_layout(tmp_path, student):
    from assignments.autograder import build_autograder
    build_autograder(ROOT, tmp_path / "autograder.zip")
    root = tmp_path / "gs" / "autograder"
    with zipfile.ZipFile(tmp_path / "autograder.zip") as z:
        z.extractall(root / "source")
        names = z.namelist()
    assert {"setup.sh", "run_autograder", "assignments/hidden/test_a1_llama.py"} <= set(names)
    assert SOLUTION_LINE not in (root / "source" / "minillama" / "model.py").read_text()
    env = {**os.environ, "AUTOGRADER_ROOT": str(root), "AUTOGRADER_PYTHON": sys.executable,
           "GRADE_ARGS": f"--only a1 --tests {SWIGLU} {KV} --memory-gib 2.5"}
    for submission, expected in ((ROOT / "minillama", 3.0), (student / "minillama", 0.0)):  # swiglu 1 + kv 2
        shutil.rmtree(root / "submission", ignore_errors=True)
        shutil.rmtree(root / "results", ignore_errors=True)
        shutil.copytree(submission, root / "submission")  # the files at the top level, as students upload them
        subprocess.run(["bash", str(root / "source" / "run_autograder")], env=env, check=True, timeout=600,
                       cwd=tmp_path)
        results = json.loads((root / "results" / "results.json").read_text())
        validate(results)
        assert results["score"] == expected, results["tests"]
