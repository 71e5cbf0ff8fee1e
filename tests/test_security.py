"""Trustworthy files: no reader runs code from a checkpoint, shards stay inside their folder, a run's files are
never written through a planted symlink or a guessable temporary name, one writer per run folder, and a
broken or unwritable checkpoint is one clear error."""

import ast
import fcntl
import json
import os
import pickle
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import SafetensorError
from safetensors.torch import save_file

import minillama
import minillama.course.knowledge as knowledge
from minillama import ModelArgs, create_model, load_model, save_model
from minillama.course.recipe import train_tokenizer
from minillama.files import atomic_directory, atomic_write_text
from minillama.lora import apply_lora, load_adapter, save_adapter
from minillama.training import TrainConfig, train

PACKAGE = Path(minillama.__file__).parent
ARGS = ModelArgs(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=300, max_seq_len=64, multiple_of=16)


def small_model(seed=0):
    return create_model(ARGS, seed=seed)


def rows(n=16, t=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(3, ARGS.vocab_size, (n, t + 1), generator=g)
    return x[:, :-1].contiguous(), x[:, 1:].contiguous()


def run(out, resume=False, steps=2, lora_r=4, **kw):
    cfg = TrainConfig(steps=steps, batch_size=2, warmup_steps=1, save_every=1, lora_r=lora_r, **kw)
    return train(small_model(), rows(), {}, cfg, out, resume=resume, progress=False)


def dead_pid() -> int:
    """The pid of a process that has ended (and been reaped)."""
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


# ---- 1. nothing in minillama unpickles code ------------------------------------------------------
class Evil:
    """Unpickling this runs code: it creates the file `marker`."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').write('pwned')",)


def evil_bytes(marker, kind):
    if kind == "pickle":
        return pickle.dumps(Evil(marker))
    path = Path(str(marker) + ".zip")  # torch.save's zip format, with the payload in data.pkl
    torch.save(Evil(marker), path)
    data = path.read_bytes()
    path.unlink()
    return data


@pytest.mark.parametrize("kind", ["pickle", "torch-zip"])
def test_the_planted_payload_is_live(tmp_path, kind):
    """The control: a reader that unpickles (torch.load(weights_only=False)) does run the payload."""
    data = evil_bytes(tmp_path / "marker", kind)
    if kind == "pickle":
        pickle.loads(data)
    else:
        (tmp_path / "evil.pt").write_bytes(data)
        torch.load(tmp_path / "evil.pt", weights_only=False)
    assert (tmp_path / "marker").exists()


def _plant_model(tmp_path, fmt):
    d = save_model(small_model(), tmp_path / fmt, format=fmt)
    return d, d / ("consolidated.00.pth" if fmt == "meta" else "model.safetensors"), lambda: load_model(d)


def _plant_adapter(tmp_path):
    model = small_model()
    apply_lora(model, r=4)
    d = save_adapter(model, tmp_path / "adapter")
    return d, d / "adapter_model.safetensors", lambda: load_adapter(small_model(), d)


def _plant_train_file(tmp_path, name, old=False):
    run(tmp_path / "run")
    ckpt = tmp_path / "run" / "checkpoint"
    if old:  # a folder that looks like a save killed between its two renames, with no checkpoint/ left
        ckpt = ckpt.rename(tmp_path / "run" / ".checkpoint.old-1-abcd")
    return ckpt, ckpt / name, lambda: run(tmp_path / "run", resume=True)


READERS = {
    "native": lambda p: _plant_model(p, "native"),
    "hf": lambda p: _plant_model(p, "hf"),
    "meta": lambda p: _plant_model(p, "meta"),
    "lora-adapter": _plant_adapter,
    "train_state.pt": lambda p: _plant_train_file(p, "train_state.pt"),
    "train_state.pt in .checkpoint.old-*": lambda p: _plant_train_file(p, "train_state.pt", old=True),
    "trainable.safetensors": lambda p: _plant_train_file(p, "trainable.safetensors"),
}


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("kind", ["pickle", "torch-zip"])
@pytest.mark.parametrize("reader", sorted(READERS))
def test_no_reader_runs_code_from_a_planted_pickle(tmp_path, reader, kind):
    _, target, read = READERS[reader](tmp_path)
    marker = tmp_path / "marker"
    target.write_bytes(evil_bytes(marker, kind))
    with pytest.raises(ValueError, match=rf"{target.name}.* (refuse|not a readable)"):
        read()
    assert not marker.exists()


def test_the_package_never_unpickles_code():
    """Every torch.load in minillama passes weights_only=True; no pickle.load(s), Unpickler or allow_pickle."""
    problems = []
    for f in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(f.read_text())):
            if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Attribute):
                continue
            owner = node.func.value.id if isinstance(node.func.value, ast.Name) else None
            kw = {k.arg: k.value for k in node.keywords}
            where = f"{f.relative_to(PACKAGE)}:{node.lineno}"
            if owner == "torch" and node.func.attr == "load":
                safe = kw.get("weights_only")
                if not (isinstance(safe, ast.Constant) and safe.value is True):
                    problems.append(f"{where}: torch.load without weights_only=True")
            if owner == "pickle" and node.func.attr in ("load", "loads", "Unpickler"):
                problems.append(f"{where}: pickle.{node.func.attr}")
            if isinstance(kw.get("allow_pickle"), ast.Constant) and kw["allow_pickle"].value:
                problems.append(f"{where}: allow_pickle=True")
    assert problems == []


# ---- 2. HF shards stay inside the checkpoint folder ----------------------------------------------
def _hf_sharded(tmp_path):
    d = save_model(small_model(), tmp_path / "hf", format="hf", max_shard_bytes=40_000)
    index = json.loads((d / "model.safetensors.index.json").read_text())
    return d, index


def _point_first_shard_at(d, index, name):
    first = sorted(set(index["weight_map"].values()))[0]
    index["weight_map"] = {k: (name if v == first else v) for k, v in index["weight_map"].items()}
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    return first


@pytest.mark.parametrize("how", ["dotdot", "nested-dotdot", "absolute", "symlink"])
def test_an_hf_shard_outside_the_folder_is_refused_before_opening(tmp_path, monkeypatch, how):
    import minillama.checkpoints.weights as W

    d, index = _hf_sharded(tmp_path)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    first = sorted(set(index["weight_map"].values()))[0]
    outside = elsewhere / first
    os.replace(d / first, outside)  # a valid shard: the old loader opened it and loaded the model
    name = {"dotdot": f"../elsewhere/{first}", "nested-dotdot": f"sub/../../elsewhere/{first}",
            "absolute": str(outside), "symlink": "link.safetensors"}[how]
    if how == "symlink":
        (d / name).symlink_to(outside)
    _point_first_shard_at(d, index, name)
    opened = []
    real_open = W.safe_open
    monkeypatch.setattr(W, "safe_open", lambda f, *a, **k: opened.append(Path(f).resolve()) or real_open(f, *a, **k))
    with pytest.raises(ValueError, match=rf"shard '{name}' leads outside the checkpoint folder"):
        load_model(d)
    assert outside.resolve() not in opened


def test_an_hf_hub_cache_snapshot_whose_links_lead_to_blobs_loads(tmp_path):
    """huggingface_hub's cache: snapshots/REV/NAME are links to ../../blobs/HASH; those are allowed."""
    model = small_model()
    src = save_model(model, tmp_path / "src", format="hf")
    repo = tmp_path / "models--someone--tiny"
    (repo / "blobs").mkdir(parents=True)
    snap = repo / "snapshots" / "abc123"
    snap.mkdir(parents=True)
    for i, f in enumerate(sorted(src.iterdir())):
        os.replace(f, repo / "blobs" / f"hash{i}")
        (snap / f.name).symlink_to(Path("../../blobs") / f"hash{i}")
    for k, v in load_model(snap).state_dict().items():
        assert torch.equal(v, model.state_dict()[k]), k


# ---- 3. no writing through symlinks or guessable temporary names -----------------------------------
def test_resume_refuses_a_symlinked_log_and_a_new_run_replaces_it(tmp_path):
    run(tmp_path / "run")
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    log = tmp_path / "run" / "log.jsonl"
    log.unlink()
    log.symlink_to(victim)
    with pytest.raises(ValueError, match=r"log.jsonl is a symbolic link"):
        run(tmp_path / "run", resume=True)
    assert victim.read_text() == "precious\n"
    run(tmp_path / "run")  # a new run removes the link itself and writes its own log
    assert victim.read_text() == "precious\n"
    assert not log.is_symlink() and len(log.read_text().splitlines()) == 2


def test_the_tokenizer_trainer_does_not_write_through_a_planted_temporary_name(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    out = tmp_path / "tok" / "tokenizer.model"
    out.parent.mkdir()
    (out.parent / f".tokenizer.model.tmp-{os.getpid()}").symlink_to(victim)  # the name the trainer used
    texts = [f"Lily saw {i} red boats near the river, and Tom counted {i * 7} of them." for i in range(200)]
    tok = train_tokenizer(texts, out, vocab_size=300)
    assert victim.read_text() == "precious\n"
    assert out.is_file() and not out.is_symlink() and tok.vocab_size == 300


def test_the_knowledge_experiment_does_not_write_through_a_planted_temporary_name(tmp_path, monkeypatch):
    monkeypatch.setattr(knowledge, "run_experiment", lambda *a, **k: {"rows": []})
    monkeypatch.setattr(knowledge, "format_table", lambda results: "| table |\n")
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    out = tmp_path / "out"
    out.mkdir()
    for name in ("results.json", "table.md"):
        (out / f".{name}.tmp").symlink_to(victim)  # the fixed names the experiment used
    knowledge.main(["--out", str(out)])
    assert victim.read_text() == "precious\n"
    assert json.loads((out / "results.json").read_text()) == {"rows": []}
    assert (out / "table.md").read_text() == "| table |\n"


def test_atomic_write_replaces_a_symlink_instead_of_writing_through_it(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    (tmp_path / "out.json").symlink_to(victim)
    atomic_write_text(tmp_path / "out.json", "{}\n")
    assert victim.read_text() == "precious\n"
    assert not (tmp_path / "out.json").is_symlink() and (tmp_path / "out.json").read_text() == "{}\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.json", "victim.txt"]


def test_a_save_cleans_up_what_killed_saves_left_and_never_follows_their_links(tmp_path):
    keep = tmp_path / "elsewhere"
    keep.mkdir()
    (keep / "data.txt").write_text("keep me\n")
    pid = dead_pid()
    stale = {f".ckpt.tmp-{pid}-aa": "dir", f".ckpt.old-{pid}-bb": "dir", f".ckpt.old-{pid}-cc": "dangling",
             f".ckpt.old-{pid}-dd": "link"}
    for name, kind in stale.items():
        p = tmp_path / name
        if kind == "dir":
            p.mkdir()
            (p / "model.safetensors").write_bytes(b"half")
        else:
            p.symlink_to(tmp_path / "gone" if kind == "dangling" else keep)
    live = tmp_path / f".ckpt.tmp-{os.getppid()}-ee"  # a save in progress in another (running) process
    live.mkdir()
    (tmp_path / "ckpt").symlink_to(keep)  # the destination itself a link: replaced, not followed
    save_model(small_model(), tmp_path / "ckpt")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([live.name, "ckpt", "elsewhere"])
    assert (keep / "data.txt").read_text() == "keep me\n" and sorted(os.listdir(keep)) == ["data.txt"]
    assert (tmp_path / "ckpt" / "model.safetensors").is_file() and not (tmp_path / "ckpt").is_symlink()


def test_a_failed_fill_leaves_the_previous_directory_and_no_leftovers(tmp_path):
    save_model(small_model(), tmp_path / "ckpt")
    before = (tmp_path / "ckpt" / "model.safetensors").read_bytes()
    with pytest.raises(KeyboardInterrupt):
        with atomic_directory(tmp_path / "ckpt") as tmp:
            (tmp / "partial").write_text("x")
            raise KeyboardInterrupt
    assert (tmp_path / "ckpt" / "model.safetensors").read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]


# ---- 4. one writer per run folder ----------------------------------------------------------------
def _hold_lock(folder, pid, host, flock=True):
    """A lock file as another run holds it (written here by hand, independently of minillama)."""
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder / "train.lock", os.O_RDWR | os.O_CREAT, 0o644)
    if flock:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    os.write(fd, json.dumps({"pid": pid, "host": host}).encode())
    return fd


def test_a_second_run_on_the_same_out_is_refused_naming_the_holder(tmp_path):
    out = tmp_path / "run"
    fd = _hold_lock(out, 4242, "labhost")
    try:
        with pytest.raises(FileExistsError, match=r"in use by another training run \(pid 4242 on host labhost"):
            run(out)
        assert sorted(os.listdir(out)) == ["train.lock"]  # nothing written, the holder's lock kept
    finally:
        os.close(fd)


def test_a_live_holder_is_refused_even_where_flock_is_not_honoured(tmp_path):
    out = tmp_path / "run"
    os.close(_hold_lock(out, os.getppid(), socket.gethostname(), flock=False))
    with pytest.raises(FileExistsError, match=rf"pid {os.getppid()} on host"):
        run(out)


def test_a_stale_lock_is_taken_over_with_a_warning_and_released_at_the_end(tmp_path):
    out = tmp_path / "run"
    pid = dead_pid()
    os.close(_hold_lock(out, pid, socket.gethostname(), flock=False))  # the run was killed with -9
    with pytest.warns(UserWarning, match=rf"Taking over the lock .*train.lock left by pid {pid}"):
        log = run(out)
    assert len(log) == 2 and not (out / "train.lock").exists()


def test_a_lock_left_on_another_host_is_not_taken_over(tmp_path):
    out = tmp_path / "run"
    os.close(_hold_lock(out, 4242, "not-" + socket.gethostname(), flock=False))
    with pytest.raises(FileExistsError, match=r"left by pid 4242 on host not-.* delete the file"):
        run(out)


def test_the_lock_is_released_when_a_run_fails(tmp_path, killed_at_batch):
    killed_at_batch(1)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "run", steps=3)
    killed_at_batch.restore()
    assert not (tmp_path / "run" / "train.lock").exists()
    assert [r["step"] for r in run(tmp_path / "run", resume=True, steps=3)] == [2, 3]


def test_cli_resume_with_other_data_content_is_refused_naming_the_field(tmp_path, spm_path, capsys):
    from minillama.cli import main

    tok = minillama.Tokenizer(spm_path)
    save_model(small_model(), tmp_path / "model", tokenizer=tok)
    data = tmp_path / "data.jsonl"
    texts = [f"Lily saw {i} red boats near the river." for i in range(12)]
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    cmd = ["train", "--model", str(tmp_path / "model"), "--data", str(data), "--steps", "2", "--batch-size", "2",
           "--max-len", "32", "--save-every", "1", "--out", str(tmp_path / "out"), "--device", "cpu", "--quiet"]
    assert main(cmd) == 0
    data.write_text("".join(json.dumps({"text": t.replace("red", "blue")}) + "\n" for t in texts))
    capsys.readouterr()
    assert main(cmd + ["--resume"]) == 2
    assert "data_sha256=" in capsys.readouterr().err


# ---- 5. broken or unwritable checkpoints ---------------------------------------------------------
@pytest.mark.parametrize("name", ["train_state.pt", "trainable.safetensors"])
def test_resume_from_a_truncated_file_names_it(tmp_path, name):
    run(tmp_path / "run")
    f = tmp_path / "run" / "checkpoint" / name
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(ValueError, match=rf"{name} is not a readable .* truncated or corrupt"):
        run(tmp_path / "run", resume=True)


def test_a_full_disk_inside_safetensors_names_the_file_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch,
                                                                                         killed_at_batch):
    import safetensors.torch as st

    killed_at_batch(2)  # killed during step 3: the last checkpoint is step 2's
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "run", steps=3)
    killed_at_batch.restore()
    real = st.serialize_file

    def full_disk(tensors, filename, *a, **k):  # what safetensors raises when the disk fills up
        if str(filename).endswith("trainable.safetensors"):
            raise SafetensorError(f'Error while serializing: I/O error: No space left on device (os error 28) '
                                  f'at path "{Path(filename).parent / ".tmpX7yQ2a"}"')
        return real(tensors, filename, *a, **k)

    monkeypatch.setattr(st, "serialize_file", full_disk)
    with pytest.raises(OSError, match=r"at step 3: the disk is full while writing trainable.safetensors; the "
                                      r"previous checkpoint") as e:
        run(tmp_path / "run", resume=True, steps=3)
    assert e.value.errno == 28
    monkeypatch.setattr(st, "serialize_file", real)
    state = torch.load(tmp_path / "run" / "checkpoint" / "train_state.pt", weights_only=True)
    assert state["step"] == 2
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["checkpoint", "log.jsonl"]
    assert [r["step"] for r in run(tmp_path / "run", resume=True, steps=3)] == [3]
