"""Safe file writing shared by checkpoints, adapters, training runs and the course scripts.

- Whole directories replaced in one rename (`atomic_directory`) and single files written to a temporary
  sibling then renamed (`atomic_write_bytes/text`): a killed process leaves the old version or the new one,
  never a mix. Temporary names are unpredictable and created exclusively (mkdir, or tempfile's O_EXCL), and
  a rename replaces a symlink planted at the destination instead of writing through it.
- Leftovers of killed writers (`.NAME.tmp-PID-*`, `.NAME.old-PID-*`) are removed by the next successful save.
- `open_nofollow` opens a run's own files (log.jsonl) without following a symlink.
- `run_lock`: one writer per run folder (an exclusive lock file holding the writer's pid and host).
- JSON read with a clear error, and the sha256 of a file (to notice changed data on resume).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import secrets
import shutil
import socket
import stat
import tempfile
import warnings
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import IO, Iterator, Optional, Union

PathLike = Union[str, os.PathLike]
LOCK_NAME = "train.lock"


def read_json(path: Path) -> dict:
    try:
        with open(path) as f:
            out = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e}).") from None
    if not isinstance(out, dict):
        raise ValueError(f"{path} must hold a JSON object, not {type(out).__name__}.")
    return out


def file_sha256(path: PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# ---- leftovers of killed writers -----------------------------------------------------------------
def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # alive, owned by someone else
    return True


def remove_stale_siblings(path: PathLike) -> list[str]:
    """Delete the `.NAME.tmp-PID-*` / `.NAME.old-PID-*` siblings of `path` whose writer (PID on this host)
    is no longer running: what a killed save leaves behind. A symlink is unlinked, never followed (a
    planted or dangling link cannot make this delete anything outside the folder). Returns their names."""
    path = Path(path)
    pattern = re.compile(rf"\.{re.escape(path.name)}\.(?:tmp|old)-(\d+)-.+")
    removed = []
    for p in path.parent.iterdir():
        m = pattern.fullmatch(p.name)
        if not m or _pid_alive(int(m.group(1))):
            continue
        _remove(p)
        removed.append(p.name)
    return removed


def _remove(p: Path) -> None:
    """Delete a file, a directory tree or a symlink (the link itself, never what it points to)."""
    if p.is_symlink() or not p.is_dir():
        with suppress(FileNotFoundError):
            p.unlink()
    else:
        shutil.rmtree(p, ignore_errors=True)


# ---- atomic writes -------------------------------------------------------------------------------
def atomic_write_bytes(path: PathLike, data: bytes) -> Path:
    """Write `data` to `path` through a new temporary file in the same folder (tempfile: unpredictable
    name, created with O_EXCL), renamed over `path` once complete. A symlink at `path` is replaced by
    the file, not written through."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.tmp-{os.getpid()}-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates private 0600 files
        os.replace(tmp, path)
    except BaseException:
        with suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    remove_stale_siblings(path)
    return path


def atomic_write_text(path: PathLike, text: str) -> Path:
    """atomic_write_bytes of `text` in UTF-8 (newlines kept as they are)."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def open_nofollow(path: PathLike, mode: str = "r") -> IO[str]:
    """Open a run's own text file for reading ("r") or appending ("a", created if missing) without
    following a symlink: a link planted there is refused instead of redirecting the writes elsewhere."""
    flags = {"r": os.O_RDONLY, "a": os.O_WRONLY | os.O_APPEND | os.O_CREAT}[mode]
    try:
        fd = os.open(path, flags | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, 0o666)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise ValueError(f"{path} is a symbolic link: minillama does not read or write a run's files "
                             f"through links (remove the link, or choose another output folder).") from None
        raise
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise ValueError(f"{path} is not a regular file: expected a file that minillama writes itself.")
    return os.fdopen(fd, mode, encoding="utf-8")


@contextmanager
def atomic_directory(path: PathLike) -> Iterator[Path]:
    """Yield a temporary sibling directory to fill; on success it replaces `path` in one rename, on any
    error it is deleted and `path` is left as it was. A process killed at any moment leaves either the
    old directory or the new one (at worst plus a hidden `.NAME.tmp-*` / `.NAME.old-*` leftover, removed
    by the next successful save), never a mix."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"Cannot write the directory {path}: it is an existing file.")
    path.parent.mkdir(parents=True, exist_ok=True)
    # A plain mkdir (not tempfile.mkdtemp, which makes a private 0700 directory), so the checkpoint gets
    # the usual permissions and classmates sharing a lab folder can read it. mkdir is exclusive too: it
    # fails on any existing entry (a planted symlink included), and the name is unpredictable.
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}-{secrets.token_hex(8)}"
    tmp.mkdir()
    try:
        yield tmp
        mode = 0o666 & ~_umask()  # some writers (safetensors) create private 0600 files
        for f in tmp.rglob("*"):
            if f.is_file() and not f.is_symlink():
                f.chmod(mode)
        old = None
        if path.exists() or path.is_symlink():
            old = path.parent / f".{path.name}.old-{os.getpid()}-{secrets.token_hex(8)}"
            os.replace(path, old)  # a symlink is moved aside itself, never followed
        try:
            os.replace(tmp, path)
        except BaseException:
            if old is not None:
                os.replace(old, path)  # put the previous directory back
            raise
        if old is not None:
            _remove(old)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    remove_stale_siblings(path)  # what earlier killed saves left


# ---- one writer per run folder -------------------------------------------------------------------
def _lock_holder(fd: int) -> Optional[dict]:
    try:
        holder = json.loads(os.pread(fd, 4096, 0).decode("utf-8"))
    except (ValueError, UnicodeDecodeError):
        return None
    return holder if isinstance(holder, dict) else None


def _describe(holder: Optional[dict]) -> str:
    if not holder:
        return "an unknown process"
    return f"pid {holder.get('pid')} on host {holder.get('host')}"


def _refuse(path: Path, holder: Optional[dict]) -> FileExistsError:
    return FileExistsError(f"{path.parent} is in use by another training run ({_describe(holder)}, lock file "
                           f"{path}): wait for it to finish or choose another output folder (if no such run is "
                           f"going, delete the lock file).")


def _open_locked(path: Path) -> int:
    """A descriptor of `path` holding its exclusive flock (FileExistsError naming the holder if taken)."""
    import fcntl  # POSIX; imported here so that the rest of this module works everywhere

    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _lock_holder(fd)
            os.close(fd)
            raise _refuse(path, holder) from None
        st, now = os.fstat(fd), None
        with suppress(FileNotFoundError):
            now = os.lstat(path)
        if now is not None and (now.st_dev, now.st_ino) == (st.st_dev, st.st_ino):
            return fd
        os.close(fd)  # the holder released (deleted) the file between our open and flock: again


def _check_leftover(path: Path, fd: int, host: str) -> None:
    """We hold the flock, but the file still names a previous holder: a run that was killed (taken over
    with a warning), unless that process is still alive (a file system without flock) or on another host."""
    previous = _lock_holder(fd)
    if not os.fstat(fd).st_size:
        return
    pid = previous.get("pid") if previous else None
    if previous and previous.get("host") != host:  # flock may not reach across hosts: let a person decide
        raise FileExistsError(f"{path} was left by {_describe(previous)}, which cannot be checked from {host}: "
                              f"if that run has ended, delete the file and start again.")
    if isinstance(pid, int) and pid > 0 and _pid_alive(pid):
        raise _refuse(path, previous)
    warnings.warn(f"Taking over the lock {path} left by {_describe(previous)}, which is no longer running "
                  f"(that run was killed).", stacklevel=4)


@contextmanager
def run_lock(folder: PathLike) -> Iterator[Path]:
    """Hold the exclusive lock `folder/train.lock` (an flock'ed file holding our pid and host) while the
    block runs. A second holder is refused in one sentence naming the first; the lock file of a process
    that died without releasing it (kill -9) is taken over with a warning. Released (deleted) on exit."""
    path = Path(folder) / LOCK_NAME
    try:
        fd = _open_locked(path)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise ValueError(f"{path} is a symbolic link: remove it (minillama writes its lock file itself).") from None
        raise
    try:
        host = socket.gethostname()
        _check_leftover(path, fd, host)  # may refuse: the file then stays, naming its holder
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps({"pid": os.getpid(), "host": host}) + "\n").encode(), 0)
        yield path
    finally:
        if os.fstat(fd).st_size == 0 or _lock_holder(fd) == {"pid": os.getpid(), "host": socket.gethostname()}:
            with suppress(FileNotFoundError):
                os.unlink(path)  # deleted while we still hold the flock, then released
        os.close(fd)
