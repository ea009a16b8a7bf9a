"""Run Debian's kcat against the test broker.

Debian's librdkafka 2.0.2 cannot parse Tansu's ApiVersions answer, so kcat is pointed at
the newer librdkafka shipped inside the confluent-kafka wheel (linked as librdkafka.so.1).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import confluent_kafka


def kcat_env(workdir: Path) -> dict[str, str]:
    libs = Path(confluent_kafka.__file__).parent.parent / "confluent_kafka.libs"
    candidates = sorted(libs.glob("librdkafka-*.so.1"))
    assert candidates, f"no librdkafka inside the confluent-kafka wheel at {libs}"
    linkdir = workdir / "kcat-lib"
    linkdir.mkdir(exist_ok=True)
    link = linkdir / "librdkafka.so.1"
    if not link.exists():
        link.symlink_to(candidates[0])
    return {**os.environ, "LD_LIBRARY_PATH": f"{linkdir}:{libs}"}


def kcat_produce(broker_port: int, topic: str, lines: list[bytes], workdir: Path) -> None:
    """Produce ``key<TAB>value`` lines (``-K\\t``); a line without a tab has no key."""
    binary = shutil.which("kcat")
    assert binary, "kcat is not installed (apt-get install kcat)"
    subprocess.run(
        [binary, "-P", "-b", f"127.0.0.1:{broker_port}", "-t", topic, "-K", "\t"],
        input=b"\n".join(lines) + b"\n",
        env=kcat_env(workdir),
        check=True,
        timeout=60,
        capture_output=True,
    )
