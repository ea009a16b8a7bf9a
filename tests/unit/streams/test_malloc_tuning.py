"""streams.malloc_tuning: a big block freed after the pin goes back to the kernel.

Each case runs in a fresh interpreter: the allocator's settings are process-wide, and
glibc's dynamic threshold must start from its initial state for the comparison."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[3]
pytestmark = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc only")

# Free a 16 MiB mmapped block (the dynamic threshold rises to 16 MiB), then allocate
# 8 MiB: mallinfo2().hblkhd says whether it is a mapping of its own.
_PROBE = """
import ctypes, sys
from streams.malloc_tuning import pin_mmap_threshold

class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks",
        "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL(None)
libc.mallinfo2.restype = MallInfo2
pinned = pin_mmap_threshold() if sys.argv[1] == "pin" else False
big = bytearray(16 * 1024 * 1024)
del big
before = libc.mallinfo2().hblkhd
block = bytearray(8 * 1024 * 1024)
print(pinned, libc.mallinfo2().hblkhd - before >= 8 * 1024 * 1024)
"""


def _probe(mode: str, **env: str) -> str:
    environment = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    done = subprocess.run(
        [sys.executable, "-c", _PROBE, mode],
        env={**environment, **env},
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    )
    return done.stdout.strip()


def test_pinned_threshold_keeps_big_blocks_mapped() -> None:
    assert _probe("pin") == "True True"


def test_without_the_pin_glibc_serves_them_from_the_heap() -> None:
    """The behaviour the pin exists to avoid (if glibc changes it, the pin may go)."""
    assert _probe("none") == "False False"


def test_environment_setting_wins() -> None:
    assert _probe("pin", MALLOC_MMAP_THRESHOLD_="33554432") == "False False"
