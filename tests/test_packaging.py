"""The declared environment: pyproject.toml, constraints.txt and environment.yml agree, the installed reference tools
are the tested ones, and the Quickstart's setup script picks PyTorch's CPU build where it should."""

import importlib.metadata
import importlib.util
import re
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

try:
    import tomllib
except ImportError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")
yaml = pytest.importorskip("yaml")

ROOT = Path(__file__).resolve().parent.parent
REFERENCE_TOOLS = ("transformers", "peft", "bitsandbytes", "tiktoken", "tokenizers")
PINNED = (*REFERENCE_TOOLS, "ipykernel", "selenium")  # + ipykernel below 7 (constraints.txt says why), the browser test's selenium
CONDA_TO_PIP = {"pytorch": "torch", "pytorch-cpu": "torch", "pytorch-gpu": "torch"}  # conda-forge's names


def pyproject_requirements() -> dict[str, Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = project["dependencies"] + [r for extra in project["optional-dependencies"].values() for r in extra]
    return {canonicalize_name(r.name): r for r in map(Requirement, reqs)}


def constraints() -> dict[str, Requirement]:
    lines = [line.split("#")[0].strip() for line in (ROOT / "constraints.txt").read_text().splitlines()]
    return {canonicalize_name(r.name): r for r in map(Requirement, filter(None, lines))}


def conda_requirements() -> dict[str, Requirement]:
    deps = yaml.safe_load((ROOT / "environment.yml").read_text())["dependencies"]
    out = {}
    for dep in deps:
        if isinstance(dep, dict):  # the pip section: pip's own syntax
            out.update({canonicalize_name(r.name): r for r in map(Requirement, dep["pip"])})
            continue
        name, spec = re.match(r"([A-Za-z0-9_.-]+)\s*(.*)", dep).groups()
        if name in ("python", "pip"):
            continue
        out[canonicalize_name(CONDA_TO_PIP.get(name, name))] = Requirement(name + spec)  # >=, <: pip's syntax too
    return out


def test_pyproject_constraints_and_environment_declare_the_same_reference_ranges():
    pyproject, pinned, conda = pyproject_requirements(), constraints(), conda_requirements()
    assert set(PINNED) <= set(pinned)  # every pin, with a tested range
    for name in pinned:
        assert pinned[name].specifier == pyproject[name].specifier == conda[name].specifier, name
        assert pinned[name].specifier, f"{name}: constraints.txt gives no range"


def test_environment_yml_and_pyproject_list_the_same_packages():
    assert set(conda_requirements()) == set(pyproject_requirements())
    channels = yaml.safe_load((ROOT / "environment.yml").read_text())["channels"]
    assert channels == ["conda-forge"]  # not PyTorch's deprecated channel


def test_the_torch_floor_is_the_one_the_code_needs():
    """minillama calls torch.compiler.set_stance and the public torch.distributed.fsdp.fully_shard (both 2.6+),
    and transformers 5 refuses torch below 2.6: pyproject.toml, environment.yml and the setup script all ask
    for torch >= 2.6 (they asked for 2.5, which installs and then fails; issue 28)."""
    import torch

    specs = {"pyproject.toml": pyproject_requirements()["torch"].specifier,
             "environment.yml": conda_requirements()["torch"].specifier,
             "scripts/setup_env.py": Requirement(_setup_env().TORCH).specifier}
    for where, spec in specs.items():
        assert spec.contains("2.6.0") and not spec.contains("2.5.1"), f"{where}: torch{spec}"
    assert len(set(map(str, specs.values()))) == 1, specs
    assert callable(torch.compiler.set_stance)  # what the floor is for, on the installed torch
    if torch.distributed.is_available():
        from torch.distributed.fsdp import fully_shard  # noqa: F401


@pytest.mark.parametrize("name", PINNED)
def test_the_installed_reference_tool_is_in_the_tested_range(name):
    try:
        version = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        pytest.skip(f"{name} is not installed")
    assert constraints()[name].specifier.contains(version, prereleases=True), (
        f"{name} {version} is outside the tested range in constraints.txt: install with `pip install -c constraints.txt`")


def _setup_env():
    spec = importlib.util.spec_from_file_location("setup_env", ROOT / "scripts" / "setup_env.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("system, nvidia, torch, force, cpu_build", [
    ("Linux", False, False, False, True),    # a CPU-only Linux machine: not the multi-GB CUDA wheel
    ("Linux", True, False, False, False),    # an NVIDIA GPU: the default (CUDA) wheel, with the course
    ("Linux", False, True, False, False),    # torch already there (CI's cached wheel): kept
    ("Darwin", False, False, False, False),  # macOS and Windows: the default wheel is the right one
    ("Windows", False, False, False, False),
    ("Linux", True, False, True, True),      # --cpu
])
def test_setup_script_installs_the_cpu_build_only_where_needed(system, nvidia, torch, force, cpu_build):
    s = _setup_env()
    cmd = s.torch_command("py", system=system, has_nvidia=nvidia, has_torch=torch, force_cpu=force)
    if not cpu_build:
        assert cmd is None
    else:
        assert cmd[:4] == ["py", "-m", "pip", "install"] and cmd[cmd.index("--index-url") + 1] == \
            "https://download.pytorch.org/whl/cpu"
        assert Requirement(cmd[4]).specifier == pyproject_requirements()["torch"].specifier


def test_ci_runs_the_readme_quickstart_verbatim():
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"## Quickstart.*?```bash\n(.*?)```", readme, re.S).group(1)
    commands = [line for line in block.splitlines() if line.strip()]
    ci = [line for line in (ROOT / ".ci" / "run").read_text().splitlines() if not line.lstrip().startswith("#")]
    assert len(commands) == 2 and commands[0].startswith("python3 scripts/setup_env.py")
    positions = [ci.index(c) for c in commands]  # each README command is a line of .ci/run, in order
    assert positions == sorted(positions)
