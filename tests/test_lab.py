"""The lab kit in lab/, rehearsed on the CPU with the tiny model.

- The Slurm templates' #SBATCH requests are parsed and checked, and each script runs with `srun`, `torchrun`
  and `conda` replaced by stubs that record and check their arguments (2 processes for the 4-GPU template).
- The `sbatch` lines of lab/README.md's "A lab's day" are submitted to a real one-node Slurm that the test
  starts (Debian's slurm-wlm and munge, installed by .ci/run; skipped, saying why, where they are missing),
  with no GPUs, the tiny model on the CPU and tiny sizes; every job must complete and leave its checkpoint.
"""

import json
import os
import re
import runpy
import shlex
import shutil
import socket
import subprocess
import sys
import time
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
           "DEVICE": "cpu", "GPUS": "2", "CONDA_ENV": "course", "VENV": "",
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


# ---- lab/README.md's commands, swapped to the tiny model on the CPU ----------------------------------------
TINY_SIZES = {"--max-len": "129", "--steps": "2", "--batch-size": "1", "--grad-accum": "2"}  # Alpaca fits in 129


def lab_commands() -> list[list[str]]:
    """The commands of lab/README.md's "A lab's day" block, in order, each split as the shell would."""
    block = re.search(r"## A lab's day.*?```bash\n(.*?)```", (LAB / "README.md").read_text(), re.S).group(1)
    return [w for w in (shlex.split(line, comments=True) for line in block.splitlines()) if w]


def template_default(script: Path, var: str) -> str:
    """The default a template gives an environment variable (`: "${VAR:=...}"`)."""
    return re.search(r': "\$\{%s:=(.*)\}"' % var, script.read_text()).group(1)


def tiny_train_args(args: str) -> str:
    """A lab job's TRAIN_ARGS with only the sizes made tiny: the technique, dtype and AMP stay the lab's."""
    words = shlex.split(args)
    for i, w in enumerate(words[:-1]):
        words[i + 1] = TINY_SIZES.get(w, words[i + 1])
    return " ".join(words + ["--quiet"])


def sbatch_jobs() -> list[dict]:
    """Each `sbatch` line of the README: its script, and its environment with the model, device and sizes
    swapped (the 4-GPU template runs 2 CPU processes)."""
    jobs = []
    for words in lab_commands():
        if "sbatch" in words:
            i = words.index("sbatch")
            env = dict(w.split("=", 1) for w in words[:i])
            args = env.get("TRAIN_ARGS") or template_default(REPO / words[i + 1], "TRAIN_ARGS")
            env.update(MODEL=str(tiny_model_dir()), TRAIN_ARGS=tiny_train_args(args), DEVICE="cpu", GPUS="2")
            jobs.append({"script": words[i + 1], "env": env, "options": words[i + 2:]})
    return jobs


def doctor_ran(text: str) -> bool:
    """Whether `minillama doctor`'s report, with this torch's version on its torch line, is in the text."""
    return re.search(rf"^torch\s+{re.escape(__import__('torch').__version__)}\s*$", text, re.M) is not None


def fresh_clone(tmp: Path) -> Path:
    """A directory laid out like a fresh clone for the lab's commands (lab/ copied, data/ and benchmarks/
    linked), with no logs/, runs/ or results/."""
    clone = tmp / "clone"
    shutil.copytree(LAB, clone / "lab")
    (clone / "data").symlink_to(tiny_model_dir().parent)
    (clone / "benchmarks").symlink_to(REPO / "benchmarks")
    return clone


def dry_run_argv(words: list[str]) -> list[str]:
    """A README command that is not an sbatch line, as this Python runs it on the CPU with the tiny model."""
    if words[0] == "minillama":  # doctor, and plan (arithmetic: it stays at the 7B shape)
        return [sys.executable, "-m", "minillama", *words[1:]]
    if words[:2] == ["python", "benchmarks/gpu_lab.py"]:  # later flags win: the CPU, tiny, a minute
        return [sys.executable, *words[1:], "--device", "cpu", "--preset", "tiny", "--budget-s", "60",
                "--repeats", "1"]
    raise AssertionError(f"the dry run does not know how to run {shlex.join(words)!r} from lab/README.md")


def venv_for_jobs(tmp: Path) -> str:
    """The venv a job activates (VENV): this Python's, or a stand-in that puts this Python and a `minillama`
    command first on PATH (a conda or system Python)."""
    bin_ = Path(sys.executable).parent
    if sys.prefix != sys.base_prefix and (bin_ / "activate").exists() and (bin_ / "minillama").exists():
        return sys.prefix
    env = tmp / "venv"
    (env / "bin").mkdir(parents=True)
    (env / "bin" / "activate").write_text(f'export PATH="{env / "bin"}:{bin_}:$PATH"\n')
    (env / "bin" / "minillama").write_text(f'#!/bin/bash\nexec {sys.executable} -m minillama "$@"\n')
    (env / "bin" / "minillama").chmod(0o755)
    return str(env)


# ---- a one-node Slurm on this machine, started and stopped by the test -------------------------------------
SLURM_PROGRAMS = ("munged", "slurmctld", "slurmd", "sbatch", "scontrol", "scancel")
SLURM_PATH = f"{os.environ.get('PATH', '')}:/usr/sbin:/sbin"  # the daemons live in sbin
FINISHED = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE")


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def slurm_conf(root: Path, node: str, cpus: int) -> str:
    """A one-node slurm.conf with every file under root and root running the daemons. No cgroups
    (proctrack/linuxproc, task/none: the cgroup plugins need a cgroup tree a container may not give), no
    GPUs (no GresTypes), no accounting; memory is not a consumable resource (CR_Core), so --mem=0 is the node's."""
    ctld, slurmd = _free_ports(2)
    return f"""ClusterName=minillama-ci
SlurmctldHost={node}(127.0.0.1)
SlurmUser=root
SlurmdUser=root
SlurmctldPort={ctld}
SlurmdPort={slurmd}
AuthType=auth/munge
AuthInfo=socket={root}/munge/socket
CredType=cred/munge
MailProg=/bin/true
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/builtin
MpiDefault=none
ReturnToService=2
NodeName={node} NodeAddr=127.0.0.1 CPUs={cpus} RealMemory=1024 State=UNKNOWN
PartitionName=ci Nodes={node} Default=YES MaxTime=INFINITE State=UP
"""


def slurm_missing() -> str:
    """Why a one-node Slurm cannot run here, or ''."""
    missing = [p for p in SLURM_PROGRAMS if shutil.which(p, path=SLURM_PATH) is None]
    if missing:
        why = os.environ.get("MINILLAMA_SLURM_MISSING", "")
        return (f"Slurm is not installed here (no {', '.join(missing)}): .ci/run installs Debian's slurm-wlm "
                f"and munge with apt-get{f' ({why})' if why else ''}")
    if os.geteuid() != 0:
        return "the one-node Slurm runs its daemons as root (SlurmUser=root): run the tests as root"
    return ""


class OneNodeSlurm:
    """munged, slurmctld and slurmd as child processes of the test, configured by a slurm.conf under root
    (SLURM_CONF points every Slurm command at it; nothing in /etc is read or written)."""

    def __init__(self, root: Path):
        self.root, self.node, self.cpus = root, socket.gethostname().split(".")[0], len(os.sched_getaffinity(0))
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM")}  # not a job's own
        self.env["SLURM_CONF"] = str(root / "slurm.conf")
        self.env["PATH"] = SLURM_PATH
        self.procs, self.jobs = {}, []

    def _spawn(self, name: str, *cmd: str) -> None:
        log = open(self.root / "log" / f"{name}.out", "w")
        self.procs[name] = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=self.env)
        log.close()

    def _until(self, what: str, ready, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while not ready():
            dead = [n for n, p in self.procs.items() if p.poll() is not None]
            if dead or time.monotonic() > deadline:
                logs = "\n".join(f.read_text()[-1500:] for f in sorted((self.root / "log").iterdir()))
                raise RuntimeError(f"one-node Slurm: {what} did not happen in {seconds:.0f} s "
                                   f"({'exited: ' + ', '.join(dead) if dead else 'timed out'}); logs:\n{logs}")
            time.sleep(0.5)

    def start(self) -> None:
        for d in ("munge", "state", "spool", "log"):
            (self.root / d).mkdir(mode=0o700)
        key = self.root / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        (self.root / "slurm.conf").write_text(slurm_conf(self.root, self.node, self.cpus))
        m = self.root / "munge"
        self._spawn("munged", "munged", "--foreground", "--force", f"--key-file={key}", f"--socket={m}/socket",
                    f"--pid-file={m}/munged.pid", f"--log-file={m}/munged.log", f"--seed-file={m}/munged.seed")
        self._until("munged's socket", (m / "socket").exists, 20)
        conf = self.env["SLURM_CONF"]
        self._spawn("slurmctld", "slurmctld", "-D", "-f", conf)
        self._spawn("slurmd", "slurmd", "-D", "-f", conf, "-N", self.node)
        self._until("the node becoming idle", lambda: "State=IDLE" in self.scontrol("show", "node", self.node), 60)

    def scontrol(self, *args: str) -> str:
        return subprocess.run(["scontrol", *args], env=self.env, capture_output=True, text=True, timeout=30).stdout

    def sbatch(self, script: str, options: list[str], env: dict, cwd: Path) -> str:
        """Submit as a lab user would, plus `options` on the sbatch line; the job id."""
        r = subprocess.run(["sbatch", "--parsable", *options, script], env={**self.env, **env}, cwd=cwd,
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, f"sbatch {script} refused: {r.stderr}"
        self.jobs.append(r.stdout.strip().split(";")[0])
        return self.jobs[-1]

    def wait(self, job: str, seconds: float) -> dict:
        """The job's fields (scontrol show job) once it has finished; cancelled after `seconds`."""
        deadline = time.monotonic() + seconds
        while True:
            fields = dict(re.findall(r"(\w+)=(\S*)", self.scontrol("show", "job", "-o", job)))
            if fields.get("JobState") in FINISHED:
                return fields
            if time.monotonic() > deadline:
                subprocess.run(["scancel", job], env=self.env, timeout=30)
                raise AssertionError(f"job {job} did not finish in {seconds:.0f} s: {fields}")
            time.sleep(1)

    def stop(self) -> None:
        """Cancel our jobs, stop the daemons, and wait for them: the machine is left as it was."""
        if self.jobs:
            subprocess.run(["scancel", *self.jobs], env=self.env, capture_output=True, timeout=30)
        if "slurmctld" in self.procs:
            subprocess.run(["scontrol", "shutdown"], env=self.env, capture_output=True, timeout=30)
        for name in ("slurmd", "slurmctld", "munged"):
            p = self.procs.get(name)
            if p is None:
                continue
            if name == "munged":
                p.terminate()
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(timeout=30)


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    if why := slurm_missing():
        pytest.skip(why)
    cluster = OneNodeSlurm(tmp_path_factory.mktemp("slurm"))
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


JOBS = sbatch_jobs()


@pytest.fixture(scope="module")
def finished_jobs(slurm, tmp_path_factory):
    """Every README `sbatch` line submitted at once from a fresh clone, then waited for: job -> (fields, env,
    clone). One CPU each, so that the node runs two at a time (its CPUs come from nproc)."""
    clone = fresh_clone(tmp_path_factory.mktemp("lab"))
    base = {"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "VENV": venv_for_jobs(clone.parent)}
    # no GPUs on this node, one CPU and the node's memory instead of the template's 8-32 CPUs and 64-256G
    submitted = []
    for job in JOBS:
        env = {**job["env"], **base}
        options = [*job["options"], "--gpus-per-node=0", "--cpus-per-task=1", "--mem=0"]
        submitted.append((slurm.sbatch(job["script"], options, env, clone), env))
    return [(job_id, slurm.wait(job_id, 300), env, clone) for job_id, env in submitted]


@pytest.mark.parametrize("i", range(len(JOBS)), ids=[Path(j["script"]).stem + "-" + Path(j["env"]["OUT"]).name
                                                      for j in JOBS])
def test_lab_job_completes_under_a_real_slurm(finished_jobs, i):
    job_id, fields, env, clone = finished_jobs[i]
    log_file = clone / f"{fields['JobName']}-{job_id}.out"  # in the submit directory: a fresh clone has no logs/
    assert fields["StdOut"] == str(log_file) and log_file.exists(), fields
    log = log_file.read_text()
    assert fields["JobState"] == "COMPLETED" and fields["ExitCode"] == "0:0", log[-3000:]
    assert doctor_ran(log)  # minillama doctor ran first
    assert f"wrote {env['OUT']}/log.jsonl" in log
    out = clone / env["OUT"]
    assert len((out / "log.jsonl").read_text().splitlines()) == 2
    saved = "adapter" if "--lora-r" in env["TRAIN_ARGS"] else "model"
    assert (out / "checkpoint" / "train_state.pt").exists() and (out / "checkpoint" / saved).is_dir()
    if "4gpu" in JOBS[i]["script"]:
        assert "x 2 ranks" in log


def _rows(out: Path) -> list[dict]:
    """gpu_lab's rows: results.json, or its rows as JSON lines."""
    if (out / "results.json").exists():
        return json.loads((out / "results.json").read_text())["rows"]
    return [json.loads(line) for f in sorted(out.glob("*.jsonl")) for line in f.read_text().splitlines()]


def test_a_lab_day_dry_run_on_the_cpu(tmp_path):
    """Every command of lab/README.md's "A lab's day" that is not an sbatch line (those run under Slurm
    above), from a fresh clone, on the CPU with the tiny model; gpu_lab.py within a one-minute budget."""
    clone = fresh_clone(tmp_path)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    outputs = {}
    for words in (w for w in lab_commands() if "sbatch" not in w):
        r = subprocess.run(dry_run_argv(words), cwd=clone, env=env, capture_output=True, text=True, timeout=400)
        assert r.returncode == 0, f"{shlex.join(words)}: {r.stderr[-3000:]}"
        outputs[words[1]] = r.stdout
    assert doctor_ran(outputs["doctor"])
    assert "configurations fit in 40.00 GiB" in outputs["plan"]
    out = clone / "results" / "gpu-lab"
    rows = _rows(out)
    assert rows and rows[0]["losses_agree"], rows[:1]  # the first row (LoRA q/v) is measured in the budget
    for r in rows:  # every row is measured or says why not
        assert "losses_agree" in r or r.get("skipped") or r.get("error"), r
    assert (out / "table.md").exists()


# ---- the planner's tables in lab/README.md -----------------------------------------------------------------
def test_lab_readme_tables_are_the_planners_output(capsys):
    check = runpy.run_path(str(REPO / "scripts" / "lab_tables.py"))["main"]
    assert check(["--check"]) == 0, capsys.readouterr().err


def test_plan_md_table_holds_each_sizes_best_configuration(capsys):
    from minillama.cli import main
    from minillama.config import get_preset
    from minillama.measuring.memory import GiB, format_bytes
    from minillama.measuring.plan import best_per_method, plan

    assert main(["plan", "--preset", "llama2-7b", "--seq-len", "512", "--batch", "16",
                 "--gpu-mem", "24GiB,80GiB", "--format", "md"]) == 0
    table = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ")]
    assert table[0] == "| GPU memory | full | lora | qlora |"
    for line, size in zip(table[1:], (24, 80)):
        best = {r.method: r for r in best_per_method(plan(get_preset("llama2-7b"), gpu_mem=size * GiB,
                                                          seq_len=512, batch=16))}
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert cells[0] == f"{size}GiB"
        for method, cell in zip(("full", "lora", "qlora"), cells[1:]):
            if method in best:
                assert cell == f"{format_bytes(best[method].peak_bytes)}: {best[method].label()}"
            else:
                assert cell.startswith("does not fit (smallest ")
    assert "full" not in best or best["full"].peak_bytes <= 80 * GiB  # the 80 GiB row: full fine-tuning fits


def test_plan_refuses_a_bad_size_in_a_list(capsys):
    from minillama.cli import main

    assert main(["plan", "--preset", "llama2-7b", "--gpu-mem", "24GiB,40XB", "--format", "md"]) == 2
    assert "--gpu-mem '40XB' is invalid" in capsys.readouterr().err
