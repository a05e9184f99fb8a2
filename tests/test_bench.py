"""The benchmark commands run and report ratios (their figures go in closing notes, not here)."""

import json

import pytest
from typer.testing import CliRunner

from service.cli import app


def test_bench_network_reports_step_against_its_gemms(tmp_path):
    out = tmp_path / "bench.json"
    result = CliRunner().invoke(
        app,
        [
            "bench",
            "network",
            "--rows",
            "3000",
            "--features",
            "8",
            "--hidden",
            "16,16",
            "--repeats",
            "2",
            "--dtype",
            "float64",
            "--dtype",
            "float32",
            "--json",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    assert result.output.count("ratio") == 2
    results = json.loads(out.read_text())
    assert [r["workload"]["dtype"] for r in results] == ["float64", "float32"]
    for r in results:
        assert r["step"]["low"] <= r["step"]["median"] <= r["step"]["high"]
        assert r["ratio"] == pytest.approx(r["step"]["median"] / r["gemms"]["median"])


@pytest.mark.slow
def test_bench_tracking_times_tracked_and_untracked_runs(tmp_path):
    config = tmp_path / "tiny.yaml"
    config.write_text("data: {synthetic: {rows: 500}}\ntrain: {steps: 5}\ncluster: {workers: 0}\n")
    out = tmp_path / "bench.json"
    result = CliRunner().invoke(
        app, ["bench", "tracking", str(config), "--repeats", "1", "--json", str(out)]
    )
    assert result.exit_code == 0, result.output
    (r,) = json.loads(out.read_text())
    assert r["tracked"]["median"] > 0 and r["untracked"]["median"] > 0
