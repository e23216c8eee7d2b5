"""`dca bench` runs and reports (no timing assertions: speed is measured by the command, not by tests)."""

import json

import pytest

from dca.studies.bench import BenchArgs, run_bench


def test_bench_writes_a_table_and_json(tmp_path, capsys):
    result = run_bench(BenchArgs(sizes=["xs"], repeats=1, device="cpu", out=str(tmp_path / "b.json"), memory=False))
    saved = json.loads((tmp_path / "b.json").read_text())
    assert saved == json.loads(json.dumps(result))
    row = saved["rows"][0]
    assert set(row["median_s"]) == {"one_pass", "sequential", "finetune"}
    assert all(v > 0 for v in row["median_s"].values())
    assert "| xs (h128, 4L) |" in capsys.readouterr().out


def test_bench_rejects_unknown_sizes(tmp_path):
    with pytest.raises(ValueError, match=r"sizes has unknown or no names \['huge'\]"):
        BenchArgs(sizes=["huge"], out=str(tmp_path / "b.json"))
