"""tools/reliability_report.py: the records the reliability tests write become one table row per attack."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "tools" / "reliability_report.py"


def report(folder: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), str(folder)], capture_output=True, text=True, timeout=60)


def test_rows_sum_an_attacks_records_in_the_order_they_were_recorded(tmp_path):
    records = [
        {"attack": "kill", "test": "t::kill", "recorded": 3.0, "clients": 32, "requests": 32, "lost_requests": 0,
         "server_errors": None, "kv_leaked": None, "detail": "exit status 1 | after 2 s"},
        {"attack": "bodies", "test": "t::b[1]", "recorded": 1.0, "bodies": 1, "requests": 2, "lost_requests": 0,
         "server_errors": 1},
        {"attack": "bodies", "test": "t::b[2]", "recorded": 2.0, "bodies": 1, "requests": 2, "lost_requests": 1,
         "server_errors": 0, "kv_leaked": 0.25},
    ]
    for i, record in enumerate(records):
        (tmp_path / f"{i}.json").write_text(json.dumps(record))
    result = report(tmp_path)
    assert result.returncode == 0, result.stderr
    rows = [line for line in result.stdout.splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert rows == ["| bodies | 4 requests, 2 bodies (2 tests) | 1 | 1 | 25 % |  |",
                    "| kill | 32 clients, 32 requests | 0 | – | – | exit status 1 \\| after 2 s |"]


def test_no_records_is_an_error(tmp_path):
    result = report(tmp_path)
    assert result.returncode == 1 and "no records" in result.stderr
