"""Child processes the benchmark measures, with their peak memory.

The peak is the highest ``VmHWM`` (the kernel's RSS high-water mark of the process's
current address space) read from /proc while the child runs, sampled every 50 ms while we
wait for it: the kernel's ``ru_maxrss`` at exit is useless here, because it also counts
the address space before ``exec`` — a copy of this process, which holds the whole
workload (hundreds of MB) — so every child would report at least our own size.
A child that starts processes of its own (the replay's readers) is also measured as the
sum of its and their sampled RSS, and the higher of the two peaks is reported.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from typing import IO

MIB = 1024 * 1024


class Child:
    """A started subprocess whose memory we sample; reaped with ``os.wait4`` by us only,
    never by ``Popen.poll()``, so an exit is noticed once."""

    def __init__(
        self,
        args: Sequence[str],
        *,
        env: dict[str, str],
        cwd: Path,
        stdout: IO[bytes] | int | None,
        stderr: IO[bytes] | int | None,
    ) -> None:
        self.started = time.monotonic()
        self.popen = subprocess.Popen(args, env=env, cwd=cwd, stdout=stdout, stderr=stderr)
        self.pid = self.popen.pid
        self.returncode: int | None = None
        self.ended: float | None = None
        self.peak_vm_hwm_bytes = 0  # highest VmHWM read from /proc while it ran
        self.peak_tree_rss_bytes = 0  # highest VmRSS of it plus its children, sampled

    def _reap(self, flags: int) -> bool:
        if self.returncode is not None:
            return True
        try:
            pid, status, _ = os.wait4(self.pid, flags)
        except ChildProcessError:  # reaped elsewhere; nothing more to learn
            self.returncode = self.returncode if self.returncode is not None else -1
            self.ended = self.ended or time.monotonic()
            return True
        if pid == 0:
            return False
        self.ended = time.monotonic()
        self.returncode = os.waitstatus_to_exitcode(status)
        self.popen.returncode = self.returncode  # Popen must not try to reap it again
        return True

    def exited(self) -> bool:
        return self._reap(os.WNOHANG)

    def wait(self, timeout: float | None = None, step: float = 0.05) -> int | None:
        """Wait for the exit (sampling memory meanwhile); None on timeout."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self.exited():
            self.sample()
            if deadline is not None and time.monotonic() >= deadline:
                return None
            time.sleep(step)
        return self.returncode

    def status_bytes(self, field: str) -> int | None:
        """A ``kB`` field of /proc/PID/status (``VmRSS``, ``VmHWM``) in bytes."""
        return None if self.returncode is not None else status_bytes(self.pid, field)

    def sample(self) -> int | None:
        """Current RSS in bytes (None once gone); keeps the highest VmHWM seen, and the
        highest RSS of the child with its own children (the replay's reader processes)."""
        hwm = self.status_bytes("VmHWM")
        if hwm:
            self.peak_vm_hwm_bytes = max(self.peak_vm_hwm_bytes, hwm)
        rss = self.status_bytes("VmRSS")
        if rss is not None:
            tree = rss + sum(status_bytes(pid, "VmRSS") or 0 for pid in child_processes(self.pid))
            self.peak_tree_rss_bytes = max(self.peak_tree_rss_bytes, tree)
        return rss

    def peak_rss_bytes(self) -> int:
        """The highest VmHWM seen (to within the last sample before the exit), or the
        highest sampled RSS of the child and its children, whichever is higher."""
        return max(self.peak_vm_hwm_bytes, self.peak_tree_rss_bytes)

    def seconds(self) -> float:
        return (self.ended or time.monotonic()) - self.started

    def stop(self, grace: float = 20.0) -> tuple[int | None, float, bool]:
        """SIGTERM, SIGKILL after ``grace`` s; returns (exit code, seconds, killed)."""
        if self.exited():
            return self.returncode, 0.0, False
        started = time.monotonic()
        os.kill(self.pid, signal.SIGTERM)
        if self.wait(grace) is not None:
            return self.returncode, time.monotonic() - started, False
        os.kill(self.pid, signal.SIGKILL)
        self.wait()
        return self.returncode, time.monotonic() - started, True

    def kill(self) -> None:
        """Last resort on the way out (errors, Ctrl-C): never leave a child behind."""
        if not self.exited():
            os.kill(self.pid, signal.SIGKILL)
            self.wait()


def child_processes(pid: int) -> list[int]:
    """The processes whose parent is ``pid`` (the replay's reader processes)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # gone meanwhile
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def status_bytes(pid: int, field: str) -> int | None:
    """A ``kB`` field of /proc/PID/status (``VmRSS``, ``VmHWM``) in bytes; None when the
    process is gone."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return None
