"""Where the test process runs, so that the submission has no power over the grader.

Run as root, the grader starts each test process in its own session and, before any submitted code exists
in it, (1) gives it a network namespace of its own (no network), (2) covers the folders that hold the
hidden tests and the reference solution with an empty read-only tmpfs in a mount namespace of its own, and
(3) drops to a dedicated unused uid/gid with no supplementary groups and no way to regain privileges. That
uid cannot signal the grader, write the grader's folders or read files the grader keeps to itself; after
each test process the grader kills every process of that uid, so nothing it forked outlives the run.
`plan` probes what this machine allows (a container may refuse namespaces) and lists what is off; run
without root (a TA's laptop) everything but the session is off, and the grader says so.
"""

from __future__ import annotations

import ctypes
import os
import pwd
import random
import signal
import stat
import subprocess
import sys
from dataclasses import dataclass, replace
from pathlib import Path

CLONE_NEWNS, CLONE_NEWNET = 0x00020000, 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_BIND, MS_REC, MS_PRIVATE = 1, 2, 4, 1 << 12, 1 << 14, 1 << 18
PR_SET_NO_NEW_PRIVS = 38
UIDS = range(61000, 65000)  # below nobody (65534), inside the range any container maps
_LIBC = ctypes.CDLL(None, use_errno=True)

NOT_ROOT = ("the grader is not root, so the tests run as the grader's own user: a submission could signal or "
            "kill the grader, write its results file, leave processes behind and read every file the grader can "
            "(the hidden tests and the reference included); grade untrusted code as root or in a throw-away "
            "container (assignments/README.md, 'Grading untrusted code')")


@dataclass(frozen=True)
class Sandbox:
    uid: int | None = None  # uid and gid of the test process (None: the grader's own)
    network: bool = False   # True: a network namespace of its own (only a loopback, down)
    hide: tuple = ()        # folders covered by an empty read-only tmpfs for the test process
    reach: tuple = ()       # ((folder, (inside, ...)), ...): folder covered by a tmpfs showing only `inside`s
    off: tuple = ()         # one sentence per protection that is off

    def describe(self) -> str:
        on = ["its own session"]
        if self.uid is not None:
            on.append(f"uid/gid {self.uid} (unprivileged, no groups)")
        if self.network:
            on.append("no network")
        if self.hide:
            on.append(f"{len(self.hide)} folder(s) of hidden tests and reference hidden")
        lines = ["sandbox of the test process: " + ", ".join(on) + "."]
        return "\n".join(lines + [f"protection off: {why}." for why in self.off])


def _check(ret: int, what: str) -> None:
    if ret != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def enter(box: Sandbox) -> None:
    """In the child, before exec: the namespaces, then the uid (after this, no way back)."""
    if box.network:
        _check(_LIBC.unshare(CLONE_NEWNET), "unshare(CLONE_NEWNET)")
    if box.hide or box.reach:
        _check(_LIBC.unshare(CLONE_NEWNS), "unshare(CLONE_NEWNS)")
        # private first, so that no mount below reaches the grader's namespace
        _check(_LIBC.mount(b"none", b"/", None, MS_REC | MS_PRIVATE, None), "mount --make-rprivate /")
        for d in box.hide:
            _check(_LIBC.mount(b"tmpfs", str(d).encode(), b"tmpfs", MS_RDONLY | MS_NOSUID | MS_NODEV,
                               b"size=4k,mode=0555"), f"mount tmpfs on {d}")
        for folder, insides in box.reach:
            keep = {inside: os.open(inside, os.O_PATH) for inside in insides}  # handles, before the cover
            _check(_LIBC.mount(b"tmpfs", folder.encode(), b"tmpfs", MS_NOSUID | MS_NODEV, b"size=4k,mode=0755"),
                   f"mount tmpfs on {folder}")
            for inside, fd in keep.items():
                os.makedirs(inside, exist_ok=True)
                _check(_LIBC.mount(f"/proc/self/fd/{fd}".encode(), inside.encode(), None, MS_BIND | MS_REC, None),
                       f"bind {inside}")
                os.close(fd)
    if box.uid is not None:
        os.setgroups([])
        os.setgid(box.uid)
        os.setuid(box.uid)
        _check(_LIBC.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "prctl(PR_SET_NO_NEW_PRIVS)")


def _works(box: Sandbox) -> bool:
    """Whether a child can enter `box` here (a container may refuse namespaces or uids)."""
    try:
        subprocess.run([sys.executable, "-I", "-S", "-c", ""], preexec_fn=lambda: enter(box), check=True,
                       stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=60)
        return True
    except (subprocess.SubprocessError, OSError):
        return False


def _free_uid() -> int:
    """An uid with no account and no running process (so that killing all its processes hits only ours)."""
    busy = set()
    for p in Path("/proc").iterdir() if Path("/proc").is_dir() else ():
        try:
            busy.add(p.stat().st_uid if p.name.isdigit() else -1)
        except OSError:
            pass
    for uid in random.sample(UIDS, 50):
        try:
            pwd.getpwuid(uid)
        except KeyError:
            if uid not in busy:
                return uid
    raise RuntimeError(f"no free uid in {UIDS.start}..{UIDS.stop - 1} for the test process.")


def readable_by_others(path: Path) -> bool:
    """Whether a user other than the owner and not in its group could read `path` (permission bits only)."""
    path = Path(path).resolve()
    try:
        if not path.stat().st_mode & stat.S_IROTH:
            return False
        return all(p.stat().st_mode & stat.S_IXOTH for p in path.parents)
    except OSError:
        return False


def _reach() -> tuple:
    """Where the interpreter or its environment sits under a folder that others cannot enter (a Python
    installed in /root, say): ((that folder, (prefix, ...)), ...), for the test process to see the prefixes
    and nothing else there."""
    covers = {}
    for prefix in sorted({os.path.realpath(sys.base_prefix), os.path.realpath(sys.prefix)}):
        closed = [p for p in [Path(prefix), *Path(prefix).parents] if not p.stat().st_mode & stat.S_IXOTH]
        if closed:
            covers.setdefault(str(closed[-1]), []).append(prefix)
    return tuple((folder, tuple(insides)) for folder, insides in sorted(covers.items()))


def is_root() -> bool:
    return os.geteuid() == 0


def plan(hide: list[Path], hidden_tests: Path) -> Sandbox:
    """The strongest sandbox this machine allows, hiding the folders `hide`; lists what is off. Without a
    mount namespace the folder of hidden tests is made readable by its owner only (chmod 0700)."""
    if not is_root():
        return Sandbox(off=(NOT_ROOT,))
    off, box = [], Sandbox(uid=_free_uid(), reach=_reach())
    if not _works(box):
        return Sandbox(off=(f"dropping to uid {box.uid} failed; " + NOT_ROOT.split(", so ", 1)[1],))
    if _works(replace(box, network=True)):
        box = replace(box, network=True)
    else:
        off.append("no network namespace here (the platform refused unshare), so the tests may reach the network")
    hide = [Path(d) for d in hide if Path(d).is_dir()]
    if hide and _works(replace(box, hide=tuple(hide))):
        return replace(box, hide=tuple(hide), off=tuple(off))
    if hidden_tests.is_dir():
        os.chmod(hidden_tests, 0o700)
    leaks = [d for d in hide if d != hidden_tests.parent and readable_by_others(d)]
    off += [f"no mount namespace here: {d} stays readable by the test user" for d in leaks]
    return replace(box, off=tuple(off))


def kill_leftovers(box: Sandbox) -> None:
    """Kill every process of the test uid (those the submission forked and detached included)."""
    if box.uid is None:
        return

    def kill_all():
        enter(Sandbox(uid=box.uid, reach=box.reach))
        os.kill(-1, signal.SIGKILL)  # every process this uid may signal, except the caller

    subprocess.run([sys.executable, "-I", "-S", "-c", ""], preexec_fn=kill_all, stdin=subprocess.DEVNULL,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=60, check=False)
