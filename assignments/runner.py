"""The test process (started by grade.py; never imported by the grader itself).

    python -I -B -c "$(cat runner.py)" TREE HIDDEN_DIR RESULT_FD INI NODE_ID...
    (stdin: the nonce, the hashes, the tests already run, the hidden tests' sources: one JSON line each)

The grader passes this file's text on the command line and the hidden tests' sources on stdin, so the test
process never reads a file the submission could have changed, and the hidden tests are nowhere on its disk
(HIDDEN_DIR holds placeholders with their names, for pytest's node ids; a finder serves the real modules).
Runs the given tests with pytest and reports to the parent through the inherited pipe RESULT_FD, one JSON
line per event, each carrying the nonce that the parent sent on stdin (read, and stdin closed, before any
submitted code is imported). Before the first test it records which function torch.allclose,
torch.testing.assert_close, ... and pytest's reporting are; a test after which any of them has changed
fails. After collection it checks that no test file on disk changed.
"""

import hashlib
import importlib.abc
import importlib.util
import inspect
import json
import os
import sys

NONCE_AND_HASHES = sys.stdin.readline(), sys.stdin.readline(), sys.stdin.readline(), sys.stdin.readline()
sys.stdin.close()
os.close(0)
TREE, HIDDEN, FD, INI, IDS = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4], sys.argv[5:]
NONCE = json.loads(NONCE_AND_HASHES[0])
HASHES = json.loads(NONCE_AND_HASHES[1])
DONE = set(json.loads(NONCE_AND_HASHES[2]))  # tests an earlier process already ran
os.set_inheritable(FD, False)
os.chdir(TREE)
sys.path[:0] = [TREE, HIDDEN]
# the hidden test modules, compiled now and their text dropped (submitted code could still inspect the code
# objects, docstrings included: the grader withholds any message that quotes a hidden line)
HIDDEN_CODE = {name: compile(text, os.path.join(HIDDEN, name), "exec", dont_inherit=True)
               for name, text in json.loads(NONCE_AND_HASHES[3]).items()}
del NONCE_AND_HASHES
MAX_MESSAGE = 600


def emit(**event) -> None:
    event["nonce"] = NONCE
    try:
        os.write(FD, (json.dumps(event) + "\n").encode())
    except OSError:
        pass  # the channel was closed (by the submission): the parent counts missing results as failures


import _pytest.python  # noqa: E402  (imported before any submitted code)
import _pytest.reports  # noqa: E402
import _pytest.runner  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
import torch.testing  # noqa: E402

GUARDED = [(torch, "allclose"), (torch, "equal"), (torch, "isclose"), (torch.testing, "assert_close"),
           (torch.Tensor, "__eq__"), (torch.Tensor, "allclose"), (torch.Tensor, "equal"),
           (pytest, "approx"), (pytest, "raises"), (pytest, "fail"),
           (_pytest.runner, "call_and_report"), (_pytest.runner, "pytest_runtest_call"),
           (_pytest.runner.CallInfo, "from_call"), (_pytest.reports.TestReport, "from_item_and_call"),
           (_pytest.python, "pytest_pyfunc_call"), (_pytest.python.Function, "runtest")]
ORIGINAL = {(id(o), name): inspect.getattr_static(o, name) for o, name in GUARDED}


def tampered():
    for o, name in GUARDED:
        if inspect.getattr_static(o, name, None) is not ORIGINAL[(id(o), name)]:
            return f"{getattr(o, '__name__', o)}.{name}"
    if not isinstance(_pytest.reports.BaseReport.__dict__.get("passed"), property) or "passed" in vars(
            _pytest.reports.TestReport):
        return "pytest's TestReport.passed"
    return None


class HiddenFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Serves the hidden test modules, compiled from the sources received on stdin, at their placeholders'
    paths."""

    def find_spec(self, name, path=None, target=None):
        if "." in name or f"{name}.py" not in HIDDEN_CODE:
            return None
        return importlib.util.spec_from_loader(name, self, origin=os.path.join(HIDDEN, f"{name}.py"))

    def create_module(self, spec):
        return None

    def exec_module(self, module):
        module.__file__ = module.__spec__.origin
        exec(HIDDEN_CODE[os.path.basename(module.__file__)], module.__dict__)


def key_of(item):
    """(file key, test name without parameters) of a pytest item: "hidden/x.py" or "tests/x.py"."""
    path = os.path.realpath(str(item.path))
    if path.startswith(os.path.realpath(HIDDEN) + os.sep):
        rel = "hidden/" + os.path.relpath(path, os.path.realpath(HIDDEN))
    else:
        rel = os.path.relpath(path, os.path.realpath(TREE))
    return rel, item.originalname, f"{rel}::{item.name}"


def changed_files():
    bad = []
    for path, digest in sorted(HASHES.items()):
        try:
            with open(path, "rb") as f:
                ok = hashlib.sha256(f.read()).hexdigest() == digest
        except OSError:
            ok = False
        if not ok:
            bad.append(os.path.basename(path))
    return bad


def short(excinfo) -> str:
    if excinfo is None:
        return ""
    text = f"{excinfo.typename}: {excinfo.value}".strip().splitlines()
    return (text[0] if text else excinfo.typename)[:MAX_MESSAGE]


class Reporter:
    def __init__(self):
        self.items, self.failed, self.message = {}, {}, {}

    def pytest_sessionstart(self, session):
        sys.meta_path.insert(0, HiddenFinder())  # ahead of pytest's assertion rewriter (it reads the disk)

    def pytest_collectreport(self, report):
        if report.outcome == "failed":
            lines = [ln[1:].strip() for ln in str(report.longrepr).splitlines() if ln.startswith("E ")]
            where = os.path.basename(str(getattr(report, "fspath", "") or report.nodeid).split("::")[0])
            emit(event="collect_error", where=where, message=(lines[-1] if lines else "import failed")[:MAX_MESSAGE])

    def pytest_collection_finish(self, session):
        bad = changed_files()
        if bad:
            emit(event="tampered", message=f"test files changed on disk before the tests ran: {', '.join(bad)}")
            os._exit(3)
        for item in session.items:
            self.items[item.nodeid] = key_of(item)
        emit(event="collected", items=[[k[2], k[0], k[1]] for k in self.items.values()])

    def pytest_collection_modifyitems(self, session, config, items):
        items[:] = [it for it in items if key_of(it)[2] not in DONE]

    def pytest_runtest_logstart(self, nodeid, location):
        emit(event="start", nodeid=self.items[nodeid][2])

    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_makereport(self, item, call):
        outcome = yield
        report = outcome.get_result()
        what = tampered()
        if what:
            report.outcome = "failed"
            self.message.setdefault(item.nodeid, f"the submission replaced {what} (tampering)")
        elif report.outcome == "failed":
            self.message.setdefault(item.nodeid, short(call.excinfo) or "failed")
        if report.outcome == "skipped":
            self.message.setdefault(item.nodeid, "skipped: " + short(call.excinfo))
            report.outcome = "failed"  # a skipped graded test scores nothing
        if report.outcome != "passed":
            self.failed[item.nodeid] = True
        if call.when == "teardown":
            ok = not self.failed.get(item.nodeid) and tampered() is None
            emit(event="result", nodeid=self.items[item.nodeid][2], passed=ok,
                 message=self.message.get(item.nodeid, ""))


def main() -> None:
    args = [*IDS, "-c", INI, "--rootdir", TREE, "-q", "-p", "no:cacheprovider", "-p", "no:randomly",
            "--capture=fd", "--tb=no", "-rN", "-o", "console_output_style=classic", "--no-header"]
    code = pytest.main(args, plugins=[Reporter()])
    emit(event="done", code=int(code))
    sys.stdout.flush()
    os._exit(0)


main()
