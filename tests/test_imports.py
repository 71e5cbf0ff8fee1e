"""Imports flow one way, in the order that ARCHITECTURE.md writes (its "Import direction" block): a module
imports only from its own room or rooms to its left, and no import cycle exists. Read with ast from the source
(nothing is imported or run), lazy imports inside functions included: they run back up all the same."""

import ast
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGE = "minillama"


def room_order(architecture: str) -> dict[str, int]:
    """{room: rank} from the ```text block under "## Import direction": groups separated by "->", names in a
    group by commas (a top-level module such as `model`, or a subpackage such as `training`)."""
    section = architecture.split("## Import direction", 1)[1]
    block = re.search(r"```text\n(.*?)```", section, re.S).group(1)
    ranks = {}
    for rank, group in enumerate(block.replace("\n", " ").split("->")):
        for name in group.split(","):
            ranks[name.strip()] = rank
    return ranks


def package_sources(root: Path = REPO / PACKAGE) -> dict[str, str]:
    """{dotted module name: source} of every .py file in the package (a package's __init__ by its own name)."""
    out = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path.read_text()
    return out


def imports_of(name: str, source: str, modules: set[str]) -> set[str]:
    """The package's modules that `name` imports anywhere in its source (`from .x import y` resolves to x.y when
    that is a module, else to x)."""
    is_package = f"{name}.__init__" in modules or any(m.startswith(name + ".") for m in modules)
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name in modules)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if is_package else name.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            subs = {f"{target}.{a.name}" for a in node.names} & modules
            found.update(subs or ({target} & modules))
    found.discard(name)
    return found


def room_of(module: str, ranks: dict[str, int]) -> str:
    """minillama.training.train -> "training"; minillama.model -> "model"; __main__ runs the CLI."""
    first = module.split(".")[1] if "." in module else PACKAGE
    return "cli" if first == "__main__" else first


def problems(sources: dict[str, str], ranks: dict[str, int]) -> list[str]:
    """Every module without a room, every import from a later room into an earlier one, every cycle.
    The package's own __init__ (the public facade, `from minillama import load_model`) counts in the room of
    the latest module it imports."""
    modules = set(sources)
    graph = {m: imports_of(m, s, modules) for m, s in sources.items()}
    out = [f"{m} belongs to no room of ARCHITECTURE.md's import order" for m in sorted(modules)
           if m != PACKAGE and room_of(m, ranks) not in ranks]
    rank = {m: ranks.get(room_of(m, ranks), -1) for m in modules if m != PACKAGE}
    rank[PACKAGE] = max((rank[d] for d in graph.get(PACKAGE, ())), default=0)
    for m in sorted(graph):
        for d in sorted(graph[m]):
            if rank[d] > rank[m]:
                out.append(f"{m} ({room_of(m, ranks)}) imports {d} ({room_of(d, ranks)}), a later room")
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(u):  # depth-first; an edge back to a module on the stack closes a cycle
        state[u] = 1
        stack.append(u)
        for v in sorted(graph[u]):
            if state.get(v) == 1:
                out.append("import cycle: " + " -> ".join(stack[stack.index(v):] + [v]))
            elif v not in state:
                visit(v)
        stack.pop()
        state[u] = 2
    for m in sorted(graph):
        if m not in state:
            visit(m)
    return out


def test_no_import_runs_back_up_and_no_cycle():
    ranks = room_order((REPO / "ARCHITECTURE.md").read_text())
    assert ranks["config"] < ranks["model"] < ranks["kernels"] < ranks["training"] < ranks["evaluation"] < ranks["cli"]
    assert problems(package_sources(), ranks) == []


def test_the_check_finds_a_backward_import_a_cycle_and_a_module_without_a_room():
    ranks = {"config": 0, "model": 1, "lora": 2, "course": 3}
    src = {"minillama": "", "minillama.config": "", "minillama.model": "from .config import ModelArgs",
           "minillama.lora": "import minillama.model", "minillama.course": "",
           "minillama.course.corpora": "def f():\n    from ..lora import x\n"}
    assert problems(src, ranks) == []
    src["minillama.model"] += "\ndef g():\n    from .lora import LoRALinear\n"  # lazy, still backward
    src["minillama.extra"] = ""
    found = problems(src, ranks)
    assert "minillama.model (model) imports minillama.lora (lora), a later room" in found
    assert "import cycle: minillama.lora -> minillama.model -> minillama.lora" in found
    assert "minillama.extra belongs to no room of ARCHITECTURE.md's import order" in found


def test_no_two_modules_share_a_file_name():
    """Each file of the package has a name of its own (a package's __init__.py / __main__.py aside), so that
    "open plan.py" or a traceback's "longctx.py" names one file, not two in different rooms."""
    by_name: dict[str, list[str]] = {}
    for path in sorted((REPO / PACKAGE).rglob("*.py")):
        if path.name not in ("__init__.py", "__main__.py"):
            by_name.setdefault(path.name, []).append(str(path.relative_to(REPO)))
    shared = {name: paths for name, paths in by_name.items() if len(paths) > 1}
    assert shared == {}, f"files that share a name: {shared}"


def test_no_module_is_over_800_lines():
    """Each file is one thing (issue 24): a module that grows past 800 lines holds several and is split by job."""
    long = {str(p.relative_to(REPO)): n for p in sorted((REPO / PACKAGE).rglob("*.py"))
            if (n := len(p.read_text().splitlines())) > 800}
    assert long == {}, f"modules over 800 lines: {long}"
