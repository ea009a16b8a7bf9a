"""``usage-stream refresh`` from the command line, against the fixture-serving APIs."""

from __future__ import annotations

import asyncio
import os
import sqlite3
import sys
from pathlib import Path

from tests.harness import REPO
from tests.refresh.conftest import FakeApis, Fault


async def run_cli(fake: FakeApis, data_dir: Path) -> tuple[int, str, str]:
    env = {
        **os.environ,
        "NBP_API_URL": fake.nbp_url,
        "OPENROUTER_API_URL": fake.openrouter_url,
        "DATA_DIR": str(data_dir),
        "HTTP_TIMEOUT_SECONDS": "2",
    }
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "agents",
        "refresh",
        env=env,
        cwd=REPO,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), 120)
    return process.returncode or 0, out.decode(), err.decode()


async def test_refresh_command_stores_rates_and_prices(fake_apis: FakeApis, tmp_path: Path) -> None:
    code, out, err = await run_cli(fake_apis, tmp_path / "data")
    assert code == 0, err
    assert out.startswith("refresh ok: ")
    db = sqlite3.connect(tmp_path / "data" / "usage.db")
    try:
        assert db.execute(
            "SELECT mid FROM nbp_rates WHERE effective_date = '2025-11-14'"
        ).fetchall() in ([], [("3.6376",)])
        assert db.execute("SELECT COUNT(*) FROM model_pricing").fetchone()[0] >= 5
        assert db.execute("SELECT kind, success FROM batch_runs").fetchall() == [("refresh", 1)]
    finally:
        db.close()


async def test_refresh_command_fails_with_one_line(fake_apis: FakeApis, tmp_path: Path) -> None:
    fake_apis.nbp.default = Fault(status=503, body="down")
    code, out, err = await run_cli(fake_apis, tmp_path / "data")
    assert code != 0
    # retry warnings are logged as they happen; the verdict is the one last line
    verdict = err.strip().splitlines()[-1]
    assert verdict.startswith("usage-stream: refresh failed: nbp: GET "), err
    assert "HTTP 503" in verdict
    assert "Traceback" not in err
