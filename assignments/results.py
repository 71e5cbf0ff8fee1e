"""Gradescope's results.json: built from a grading run, and checked against the JSON Schema kept next to
this file (`gradescope_results.schema.json`), with jsonschema when it is installed and a small checker of
the same schema otherwise."""

from __future__ import annotations

import json
from pathlib import Path

SCHEMA = Path(__file__).resolve().parent / "gradescope_results.schema.json"
SAFE_PREFIXES = ("NotImplementedError", "failed; its message was withheld", "timed out", "the test process",
                 "the overall time", "the submission",
                 "test files changed", "skipped", "not collected", "results tampered", "importing the submission")


def _outcome(test_id: str, run, canary_seen: str) -> tuple[bool, str]:
    rel, name = test_id.split("::")
    nodes = [n for n, key in run.items.items() if key == (rel, name)]
    if run.tampered:
        return False, f"results tampered with: {run.tampered}; nothing is counted"
    if canary_seen:
        return False, canary_seen
    if not nodes:
        error = run.collect_errors.get(Path(rel).name) or next(iter(run.collect_errors.values()), "")
        if error:
            return False, f"not collected: {error}"
        return False, run.reason or "not collected (the test process ended before collecting it)"
    for n in nodes:
        if n not in run.results:
            return False, run.reason or "no result (the test process ended)"
        ok, message = run.results[n]
        if not ok:
            params = n.split("::")[-1][len(name):]
            return False, (message or "failed") + (f" [{params.strip('[]')}]" if params else "")
    return True, "passed"


def _hidden_output(message: str) -> str:
    """Hidden tests never show their assertion (it may hold expected values): only its kind."""
    if message == "passed" or message.startswith(SAFE_PREFIXES):
        return message
    kind = message.split(":", 1)[0].split()[0] if message else "failed"
    return f"failed ({kind}); the details of hidden tests are not shown"


WITHHELD = "withheld: it quoted a hidden test or the reference solution, which the grader never shows"


def canary_note(run, canary: str) -> str:
    """One sentence for the log: pytest's summary below counts the canary checks, which must fail, as failures."""
    ran = [n for n, k in run.items.items() if k[0] == f"hidden/{canary}" and n in run.results]
    failed = [n for n in ran if not run.results[n][0]]
    return (f"Not graded: the log below holds {len(ran)} canary checks (test_canary_*), which fail on purpose; "
            f"{len(failed)} of them failed as they must, so pytest's summary counts them among its failures "
            "(an F each), at no cost in points. They show that the submission did not change how tests are judged "
            "(one that passed would void the run).")


def build_results(assignments, run, notes, canary: str, elapsed: float, scrub=(), quotes=lambda text: False) -> dict:
    """Gradescope's results from a run; `scrub` strings become <grader>; a test whose message `quotes`
    flags scores nothing and shows WITHHELD instead, and so does a log that quotes one."""
    canary_passed = [k for n, k in run.items.items() if k[0] == f"hidden/{canary}" and run.results.get(n, (0,))[0]]
    canary_seen = ("results tampered with: a check that must fail passed (the submission changed how tests "
                   "are judged); nothing is counted") if canary_passed else ""
    tests, total, summary = [], 0.0, []
    for a in assignments:
        got = 0.0
        for k, (test_id, points) in enumerate(a.tests, start=1):
            ok, message = _outcome(test_id, run, canary_seen)
            for s in scrub:
                message = message.replace(s, "<grader>")
            if quotes(message):
                ok, message = False, f"failed; its message was {WITHHELD}"
            hidden = test_id.startswith("hidden/")
            score = float(points) if ok else 0.0
            got += score
            tests.append({"name": f"{a.id} {a.title}: {test_id.split('::')[1]}" + (" (hidden)" if hidden else ""),
                          "number": f"{a.id[1:]}.{k}", "score": score, "max_score": float(points),
                          "output": _hidden_output(message) if hidden else message,
                          "visibility": "after_published" if hidden else "visible"})
        total += got
        summary.append(f"{a.id} {a.title}: {got:g} / {a.max_score:g}")
    log = run.log
    for s in scrub:
        log = log.replace(s, "<grader>")
    if quotes(log):
        log = f"[the output of the tests was {WITHHELD}]"
    output = "\n".join(summary + [""] + notes + ([run.reason] if run.reason else []) +
                       ["", canary_note(run, canary), "", log[-8000:]])
    return {"score": total, "execution_time": round(elapsed, 1), "output": output,
            "stdout_visibility": "hidden", "visibility": "after_published", "tests": tests}


def validate(results: dict) -> None:
    """Raise ValueError naming the first field that breaks the schema."""
    schema = json.loads(SCHEMA.read_text())
    try:
        import jsonschema
    except ImportError:
        _check(results, schema, "results")
        return
    try:
        jsonschema.validate(results, schema)
    except jsonschema.ValidationError as e:
        where = "/".join(str(p) for p in e.absolute_path) or "results"
        raise ValueError(f"results.json: {where}: {e.message}") from None


_TYPES = {"object": dict, "array": list, "string": str, "number": (int, float), "integer": int, "boolean": bool}


def _check(value, schema: dict, where: str) -> None:
    """The subset of JSON Schema the results schema uses: type, required, properties, additionalProperties
    (false), items, enum, minimum."""
    kind = schema.get("type")
    if kind and (not isinstance(value, _TYPES[kind]) or (kind in ("number", "integer") and isinstance(value, bool))):
        raise ValueError(f"results.json: {where}: expected {kind}, got {type(value).__name__}")
    if "enum" in schema and value not in schema["enum"]:
        raise ValueError(f"results.json: {where}: {value!r} is not one of {schema['enum']}")
    if "minimum" in schema and value < schema["minimum"]:
        raise ValueError(f"results.json: {where}: {value} is below {schema['minimum']}")
    if isinstance(value, dict):
        for key in schema.get("required", []):
            if key not in value:
                raise ValueError(f"results.json: {where}: '{key}' is a required property")
        props = schema.get("properties", {})
        for key, v in value.items():
            if key in props:
                _check(v, props[key], f"{where}/{key}")
            elif schema.get("additionalProperties") is False:
                raise ValueError(f"results.json: {where}: unexpected property '{key}'")
    if isinstance(value, list) and "items" in schema:
        for i, v in enumerate(value):
            _check(v, schema["items"], f"{where}/{i}")
