"""The Slurm templates in lab/, dry-run: their #SBATCH requests are parsed and checked, and each script runs
with `srun`, `torchrun` and `conda` replaced by stubs that record and check their arguments and then run the
command on the CPU with the tiny model (2 processes for the 4-GPU template)."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from minillama.course.paths import corpora_dir, tiny_model_dir

REPO = Path(__file__).resolve().parents[1]
LAB = REPO / "lab"


def sbatch_options(script: Path) -> dict:
    opts = {}
    for line in script.read_text().splitlines():
        m = re.match(r"#SBATCH --([\w-]+)=(\S+)", line)
        if m:
            opts[m.group(1)] = m.group(2)
    return opts


@pytest.mark.parametrize("name, gpus", [("train_1gpu.sbatch", "1"), ("train_4gpu.sbatch", "4")])
def test_sbatch_requests(name, gpus):
    opts = sbatch_options(LAB / name)
    assert opts["nodes"] == "1" and opts["gpus-per-node"] == gpus and opts["ntasks"] == "1"
    assert re.fullmatch(r"\d\d:\d\d:\d\d", opts["time"])
    # Slurm opens the log before the script's first line runs: in a folder, it would need that folder to
    # exist already (a fresh clone has no logs/, and the job fails at launch with no log at all)
    assert opts["output"] == "%x-%j.out"


def _stubs(tmp: Path) -> Path:
    """bin/ with srun, torchrun and conda stubs; each appends its argv to calls.jsonl."""
    bin_ = tmp / "bin"
    bin_.mkdir()
    record = f'{sys.executable} -c "import json,sys; open(\'{tmp}/calls.jsonl\',\'a\').write(json.dumps(sys.argv[1:])+chr(10))"'
    (bin_ / "srun").write_text(f'#!/bin/bash\n{record} srun "$@"\nexec "$@"\n')
    (bin_ / "torchrun").write_text(f'#!/bin/bash\n{record} torchrun "$@"\nexec {sys.executable} -m torch.distributed.run "$@"\n')
    conda_base = tmp / "conda"
    (conda_base / "etc" / "profile.d").mkdir(parents=True)
    (conda_base / "etc" / "profile.d" / "conda.sh").write_text(
        f'conda() {{ {record} conda "$@"; }}\n')
    (bin_ / "conda").write_text(f'#!/bin/bash\n[ "$1 $2" = "info --base" ] && echo {conda_base}\n')
    minillama = bin_ / "minillama"
    minillama.write_text(f'#!/bin/bash\nexec {sys.executable} -m minillama "$@"\n')
    for f in bin_.iterdir():
        f.chmod(0o755)
    return bin_


@pytest.mark.parametrize("name", ["train_1gpu.sbatch", "train_4gpu.sbatch"])
def test_template_dry_run_trains_the_tiny_model_and_resumes(tmp_path, name):
    bin_ = _stubs(tmp_path)
    out = tmp_path / "run"
    env = {**os.environ, "PATH": f"{bin_}:{os.environ['PATH']}", "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1",
           "MODEL": str(tiny_model_dir()), "DATA": str(corpora_dir() / "stories_val.jsonl"), "OUT": str(out),
           "DEVICE": "cpu", "GPUS": "2", "CONDA_ENV": "course",
           "TRAIN_ARGS": "--lora-r 4 --batch-size 2 --max-len 33 --steps 2 --quiet"}
    for run in (1, 2):  # the second submission finds the checkpoint and passes --resume
        r = subprocess.run(["bash", str(LAB / name)], env=env, cwd=tmp_path, capture_output=True, text=True,
                           timeout=300)
        assert r.returncode == 0, r.stderr[-2000:]
    calls = [json.loads(line) for line in (tmp_path / "calls.jsonl").read_text().splitlines()]
    assert ["conda", "activate", "course"] in calls
    sruns = [c[1:] for c in calls if c[0] == "srun"]
    assert sruns[0] == ["minillama", "doctor"]  # the first step of every job
    train = [c for c in sruns if "train" in c]
    assert len(train) == 2 and "--resume" not in train[0] and "--resume" in train[1]
    if name == "train_4gpu.sbatch":
        assert train[0][:4] == ["torchrun", "--standalone", "--nproc_per_node", "2"]
        assert "--strategy" in train[0]
    assert len((out / "log.jsonl").read_text().splitlines()) == 2


def test_template_refuses_a_missing_model(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("MODEL", "DATA", "OUT")}
    r = subprocess.run(["bash", str(LAB / "train_1gpu.sbatch")], env=env, cwd=tmp_path, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode != 0 and "set MODEL to a checkpoint folder" in r.stderr
