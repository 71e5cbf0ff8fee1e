"""`python -m assignments <command>`, run from the repository root (see assignments/README.md)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
INSTRUCTOR = (ROOT / "assignments" / "grade.py").exists()  # the student edition holds only `test`


def _limits(args):
    from .grade import Limits
    return Limits(per_test=args.per_test_timeout, overall=args.timeout, memory=int(args.memory_gib * (1 << 30)))


def _release(args) -> int:
    from .release import release
    files = release(ROOT, Path(args.out))
    print(f"student edition: {len(files)} files in {args.out}")
    return 0


def _test(args) -> int:
    from .public import run_public_tests
    return run_public_tests(args.assignment, ROOT)


def _grade(args) -> int:
    from .grade import grade
    r = grade(ROOT, Path(args.submission), Path(args.out), only=args.only, tests=args.tests,
              limits=_limits(args))
    for line in r["output"].splitlines():  # the sandbox's protections that this machine left off
        if line.startswith("protection off:"):
            print(f"warning: {line}", file=sys.stderr)
    print(f"score {r['score']:g} / {sum(t['max_score'] for t in r['tests']):g} "
          f"({r['execution_time']:.0f} s); results in {args.out}")
    return 0


def _grade_all(args) -> int:
    from .grade_all import grade_all
    grade_all(ROOT, Path(args.submissions), Path(args.csv), only=args.only, tests=args.tests,
              limits=_limits(args))
    print(f"grades in {args.csv}")
    return 0


def _autograder(args) -> int:
    from .autograder import build_autograder
    build_autograder(ROOT, Path(args.out))
    print(f"Gradescope autograder in {args.out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m assignments", description="Public tests per assignment; in the "
                                "instructor edition also the student edition, grading, Gradescope.")
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("test", help="run one assignment's public tests")
    t.add_argument("assignment", help="a1 ... a5")
    t.set_defaults(func=_test)
    if INSTRUCTOR:
        _instructor_commands(sub)
    return p


def _instructor_commands(sub) -> None:
    """release, grade, grade-all, autograder: the instructor edition's tooling (not in the student edition)."""
    r = sub.add_parser("release", help="write the student edition")
    r.add_argument("--out", required=True)
    r.set_defaults(func=_release)
    for name, func, helptext in (("grade", _grade, "grade one submission"),
                                 ("grade-all", _grade_all, "grade a folder of submissions into a CSV")):
        g = sub.add_parser(name, help=helptext)
        if name == "grade":
            g.add_argument("--submission", required=True, help="a folder: a copy of the repository or just the files")
            g.add_argument("--out", required=True, help="results.json to write")
        else:
            g.add_argument("submissions", help="a folder with one folder (or .zip) per student")
            g.add_argument("--csv", required=True)
        g.add_argument("--only", nargs="*", help="grade only these assignments (a1 ... a5)")
        g.add_argument("--tests", nargs="*", help="grade only these tests (ids or names)")
        g.add_argument("--per-test-timeout", type=float, default=120.0, help="seconds (default 120)")
        g.add_argument("--timeout", type=float, default=900.0, help="seconds per submission (default 900)")
        g.add_argument("--memory-gib", type=float, default=6.0, help="address-space limit of the tests (GiB)")
        g.set_defaults(func=func)
    a = sub.add_parser("autograder", help="write Gradescope's autograder.zip")
    a.add_argument("--out", required=True)
    a.set_defaults(func=_autograder)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, OSError) as e:  # MarkerError is a ValueError
        print(f"python -m assignments {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
