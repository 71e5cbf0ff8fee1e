"""The planner's tables in lab/README.md, regenerated from the commands that make them (never typed by hand).

    python scripts/lab_tables.py            # rewrite every table in lab/README.md
    python scripts/lab_tables.py --check    # exit 1, naming the command, if a table is out of date (the tests)

Each table sits between a comment that holds its command and an end marker:

    <!-- minillama plan --preset llama2-7b --seq-len 512 --batch 16 --gpu-mem 24GiB,40GiB,80GiB --format md -->
    ...the command's output...
    <!-- end -->
"""

from __future__ import annotations

import argparse
import contextlib
import io
import re
import shlex
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # the checkout's minillama, installed or not
README = REPO / "lab" / "README.md"
BLOCK = re.compile(r"<!-- (minillama [^>]*?) -->\n(.*?)<!-- end -->", re.S)


def output_of(command: str) -> str:
    """The command's output (this checkout's minillama), its first line a sentence, then the table."""
    from minillama.cli import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        if main(shlex.split(command)[1:]) != 0:
            raise SystemExit(f"`{command}` failed")
    first, _, rest = out.getvalue().strip().partition("\n")
    return f"\n{first}\n\n{rest}\n\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--check", action="store_true", help="only check that every table is current")
    a = p.parse_args(argv)
    text = README.read_text()
    stale = [m.group(1) for m in BLOCK.finditer(text) if m.group(2) != output_of(m.group(1))]
    if a.check:
        for command in stale:
            print(f"{README}: the table of `{command}` is out of date: run python scripts/lab_tables.py",
                  file=sys.stderr)
        return 1 if stale else 0
    new = BLOCK.sub(lambda m: f"<!-- {m.group(1)} -->\n{output_of(m.group(1))}<!-- end -->", text)
    tmp = README.with_suffix(".md.tmp")
    tmp.write_text(new)
    tmp.replace(README)  # written whole, then renamed: never half a README
    print(f"{len(stale)} of {len(BLOCK.findall(text))} tables updated in {README}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
