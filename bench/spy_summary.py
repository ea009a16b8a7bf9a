"""Summarise a ``py-spy record -f raw`` file (collapsed stacks, one ``stack count`` a line):
samples per process and thread, the busiest functions by own samples, and the share of
the named functions including what they call.

    .venv/bin/python bench/spy_summary.py OUT.txt [--top N] [--match TEXT ...] [--by-thread]

Why a script: the figures in docs/performance.md come from it, so anyone can get them
again from a new profile. Shares are of the samples of each process (or thread with
``--by-thread``), so a process that waited has fewer samples, not a smaller share (record
without ``--idle``: samples are then CPU; with ``--idle`` waits count too).
"""

from __future__ import annotations

import argparse
import re
from collections import Counter, defaultdict
from pathlib import Path

_PROCESS = re.compile(r'^process \d+:"(?P<command>[^"]*)"$')
_THREAD = re.compile(r"^thread \(\d+\)(?:: (?P<name>.*))?$")


def _short(frame: str) -> str:
    """``name (path/to/file.py:123)`` → ``name (file.py)``: lines apart add nothing here."""
    match = re.match(r"^(?P<name>.*?) \((?P<path>[^():]*)(?::\d+)?\)$", frame)
    if not match:
        return frame
    return f"{match['name']} ({match['path'].rsplit('/', 1)[-1]})"


def _owner(frames: list[str], by_thread: bool) -> tuple[str, list[str]]:
    """(process [and thread] label, the Python frames below it)."""
    processes: list[str] = []
    thread = ""
    rest = 0
    for index, frame in enumerate(frames):
        process = _PROCESS.match(frame)
        if process:
            command = process["command"].split()
            processes.append(" ".join(part.rsplit("/", 1)[-1] for part in command[:4]))
            rest = index + 1
            continue
        found = _THREAD.match(frame)
        if found:
            thread = found["name"] or "thread"
            rest = index + 1
            continue
        break
    label = processes[-1] if processes else "process"
    if by_thread and thread:
        label += f" / {thread}"
    return label, frames[rest:]


def summarise(path: Path, top: int, matches: list[str], by_thread: bool) -> str:
    own: dict[str, Counter[str]] = defaultdict(Counter)
    inclusive: dict[str, Counter[str]] = defaultdict(Counter)
    totals: Counter[str] = Counter()
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        label, frames = _owner(stack.split(";"), by_thread)
        totals[label] += count
        if not frames:
            continue
        own[label][_short(frames[-1])] += count
        named = {_short(frame) for frame in frames}
        for text in matches:
            if any(text in frame for frame in named):
                inclusive[label][text] += count
    lines = []
    for label, total in totals.most_common():
        lines.append(f"{label}: {total} samples")
        for frame, count in own[label].most_common(top):
            lines.append(f"  {100 * count / total:5.1f} %  {frame}")
        for text in matches:
            count = inclusive[label][text]
            if count:
                lines.append(f"  incl. {100 * count / total:5.1f} %  {text}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("path", type=Path)
    parser.add_argument("--top", type=int, default=15)
    parser.add_argument("--match", nargs="*", default=[])
    parser.add_argument("--by-thread", action="store_true")
    args = parser.parse_args()
    print(summarise(args.path, args.top, args.match, args.by_thread))


if __name__ == "__main__":
    main()
