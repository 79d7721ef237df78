"""`tokenmill bench latency` on the embedded model: its JSON record, and `--profile`'s table of the profiled run."""

import json

from tokenmill.entrypoints.cli import main


def test_bench_latency_records_and_profiles(tmp_path, capsys):
    record_path, profile_path = tmp_path / "latency.json", tmp_path / "profile.txt"
    assert main(["bench", "latency", "--input-len", "8", "--output-len", "5", "--num-iters", "1",
                 "--output-json", str(record_path), "--profile", str(profile_path)]) == 0
    (record,) = json.loads(record_path.read_text())
    assert record["input_len"] == 8 and record["output_len"] == 5 and record["decode_tokens_per_s"] > 0
    table = profile_path.read_text().splitlines()
    assert table[0].split()[:2] == ["op", "calls"]  # no GPU here: the CPU ops
    assert any(line.startswith("aten::") for line in table[1:-1])
    assert table[-1].endswith("over 4 decode steps") and "per decode step" in table[-1]
    assert table[-1] in capsys.readouterr().out
