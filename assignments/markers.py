"""Solution markers: find the `# BEGIN SOLUTION aN` ... `# END SOLUTION` blocks of a file and write its
student version, in which each block becomes `raise NotImplementedError("aN: Qualified.name")`.

A block may be preceded by `# BEGIN PROMPT` ... `# END PROMPT`: comment lines for the student, kept in the
student edition without their two marker lines. Markers must be balanced, not nested, and tagged.
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass
from pathlib import Path

BEGIN = re.compile(r"^(?P<indent>\s*)# BEGIN SOLUTION(?P<rest>.*)$")
END = re.compile(r"^\s*# END SOLUTION\s*$")
BEGIN_PROMPT = re.compile(r"^\s*# BEGIN PROMPT\s*$")
END_PROMPT = re.compile(r"^\s*# END PROMPT\s*$")
TAG = re.compile(r"^ (a\d+)\s*$")
ANY_MARKER = re.compile(r"#\s*(BEGIN|END) (SOLUTION|PROMPT)")


class MarkerError(ValueError):
    """A badly placed marker; the message names the file and the line."""


@dataclass(frozen=True)
class Block:
    path: str          # as given (relative to the repository root in the tools)
    assignment: str    # "a1"
    begin: int         # 1-based line numbers of the two marker lines
    end: int
    indent: str
    qualname: str      # "RMSNorm.forward"
    body: tuple        # the solution's lines (without the markers)

    @property
    def message(self) -> str:
        return f"{self.assignment}: {self.qualname}"


def _qualnames(source: str) -> dict[int, str]:
    """Line number -> qualified name of the innermost function or class around it."""
    names: dict[int, str] = {}

    def visit(node, prefix):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                q = f"{prefix}.{child.name}" if prefix else child.name
                for line in range(child.lineno, (child.end_lineno or child.lineno) + 1):
                    names[line] = q  # inner definitions are visited later and win
                visit(child, q)
            else:
                visit(child, prefix)

    visit(ast.parse(source), "")
    return names


def find_blocks(path: str, source: str) -> list[Block]:
    """The solution blocks of one file, checked: refuses unbalanced, nested or untagged markers."""
    lines = source.split("\n")
    blocks, open_at, prompt_at = [], None, None
    for i, line in enumerate(lines, start=1):
        m = BEGIN.match(line)
        if m:
            if open_at is not None:
                raise MarkerError(f"{path}:{i}: BEGIN SOLUTION inside the block opened at line {open_at[0]} "
                                  f"(markers cannot nest).")
            if prompt_at is not None:
                raise MarkerError(f"{path}:{i}: BEGIN SOLUTION inside the PROMPT opened at line {prompt_at}.")
            tag = TAG.match(m.group("rest"))
            if not tag:
                raise MarkerError(f"{path}:{i}: BEGIN SOLUTION without an assignment tag: expected "
                                  f"'# BEGIN SOLUTION a1' (a, then the assignment number).")
            open_at = (i, tag.group(1), m.group("indent"))
        elif END.match(line):
            if open_at is None:
                raise MarkerError(f"{path}:{i}: END SOLUTION without a BEGIN SOLUTION before it.")
            blocks.append((open_at, i))
            open_at = None
        elif BEGIN_PROMPT.match(line):
            if open_at is not None or prompt_at is not None:
                raise MarkerError(f"{path}:{i}: BEGIN PROMPT inside another block (markers cannot nest).")
            prompt_at = i
        elif END_PROMPT.match(line):
            if prompt_at is None:
                raise MarkerError(f"{path}:{i}: END PROMPT without a BEGIN PROMPT before it.")
            prompt_at = None
        elif ANY_MARKER.search(line):
            raise MarkerError(f"{path}:{i}: malformed marker {line.strip()!r}: expected exactly "
                              f"'# BEGIN SOLUTION aN', '# END SOLUTION', '# BEGIN PROMPT' or '# END PROMPT'.")
    if open_at is not None:
        raise MarkerError(f"{path}:{open_at[0]}: BEGIN SOLUTION is never closed by an END SOLUTION.")
    if prompt_at is not None:
        raise MarkerError(f"{path}:{prompt_at}: BEGIN PROMPT is never closed by an END PROMPT.")
    if not blocks:
        return []
    names = _qualnames(source)
    out = []
    for (begin, tag, indent), end in blocks:
        if begin not in names:
            raise MarkerError(f"{path}:{begin}: a solution block must sit inside a function.")
        out.append(Block(path, tag, begin, end, indent, names[begin], tuple(lines[begin:end - 1])))
    return out


def student_source(path: str, source: str, solved=()) -> str:
    """The file with every solution block replaced by its NotImplementedError and prompt markers removed;
    the blocks of the assignments in `solved` keep their code (a student's edition with those done)."""
    blocks = {b.begin: b for b in find_blocks(path, source)}
    lines, out, skip_to = source.split("\n"), [], 0
    for i, line in enumerate(lines, start=1):
        if i <= skip_to:
            continue
        if i in blocks and blocks[i].assignment in solved:
            out.extend(blocks[i].body)
            skip_to = blocks[i].end
        elif i in blocks:
            b = blocks[i]
            out.append(f'{b.indent}raise NotImplementedError("{b.message}")')
            skip_to = b.end
        elif BEGIN_PROMPT.match(line) or END_PROMPT.match(line):
            continue
        else:
            out.append(line)
    text = "\n".join(out)
    try:
        compile(text, path, "exec")
    except SyntaxError as e:
        raise MarkerError(f"{path}:{e.lineno}: the student version does not compile ({e.msg}).") from None
    return text


def scan(root: Path, files) -> list[Block]:
    """Every block in the given files (paths relative to root)."""
    blocks = []
    for rel in files:
        blocks += find_blocks(str(rel), (root / rel).read_text(encoding="utf-8"))
    return blocks
