"""An output folder belongs to one run, and is written by one process at a time; a folder
that cannot be written is named before anything starts."""

import subprocess
import sys
import time
from pathlib import Path

from shardprop.workers.network.params import load_weights

SETS = ["data.synthetic={name: moons, rows: 2000}", "model.hidden=[16]", "train.checkpoint_every=5"]


def shardprop(*args: object, cwd: Path, steps: int = 20) -> subprocess.Popen:
    sets = [arg for s in [*SETS, f"train.steps={steps}"] for arg in ("--set", s)]
    command = [str(Path(sys.executable).parent / "shardprop"), "train", "/dev/null"]
    command += ["--workers", "0", "--no-tracking", "--quiet", *sets, *map(str, args)]
    return subprocess.Popen(
        command, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def finished(process: subprocess.Popen, seconds: float = 120) -> tuple[int, list[str]]:
    _, stderr = process.communicate(timeout=seconds)
    return process.returncode, [line for line in stderr.splitlines() if line.strip()]


def test_a_second_run_into_a_folder_in_use_is_refused_naming_the_process(tmp_path):
    out = tmp_path / "out"
    first = shardprop("--output", out, cwd=tmp_path, steps=1_000_000)
    deadline = time.monotonic() + 60
    while not (out / "checkpoints").exists():
        assert first.poll() is None, first.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.05)
    try:
        code, lines = finished(shardprop("--output", out, cwd=tmp_path))
    finally:
        first.kill()
        first.wait()
    assert code == 2, lines
    (line,) = lines
    assert line.startswith(f"error: --output {out}: in use by pid {first.pid} on "), line


def test_a_folder_that_holds_another_runs_outputs_is_refused(tmp_path):
    out = tmp_path / "out"
    assert finished(shardprop("--output", out, cwd=tmp_path))[0] == 0
    code, lines = finished(shardprop("--output", out, cwd=tmp_path))
    assert code == 2, lines
    (line,) = lines
    assert line.startswith(f"error: --output {out}: holds run "), line
    assert "choose another folder" in line


def test_a_read_only_output_folder_is_named_before_anything_starts(tmp_path, mount):
    read_only = mount("read-only", "ro,size=1m")
    started = time.monotonic()
    code, lines = finished(shardprop("--output", read_only / "out", cwd=tmp_path))
    assert code == 2, lines
    (line,) = lines
    assert line.startswith(f"error: --output: cannot write to {read_only} (the output folder)")
    assert time.monotonic() - started < 30  # no training first


def test_a_full_disk_mid_run_fails_the_run_in_one_line(tmp_path, mount):
    out = mount("small", "size=256k") / "out"  # room for the run's lock, not a checkpoint
    code, lines = finished(
        shardprop("--output", out, "--set", "model.hidden=[256, 256]", cwd=tmp_path)
    )
    assert code == 1, lines
    (line,) = lines
    assert line.startswith(
        f"failed: could not write the checkpoint of step 5 to {out / 'checkpoints'} "
        "(No space left on device)"
    ), line


def test_a_tracking_store_that_fills_up_keeps_the_final_weights_on_local_disk(tmp_path, mount):
    # room for MLflow's empty database and some hundreds of steps' metrics, no more
    store = mount("store", "size=1400k")
    uri = f"sqlite:///{store / 'mlflow.db'}"
    out = tmp_path / "out"
    command = [str(Path(sys.executable).parent / "shardprop"), "train", "/dev/null"]
    command += ["--workers", "0", "--quiet", "--tracking-uri", uri, "--output", str(out)]
    command += [arg for s in [*SETS, "train.steps=1500"] for arg in ("--set", s)]
    command += ["--set", "train.checkpoint_every=0", "--set", "tracking.flush_seconds=0.2"]
    process = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert process.returncode == 1, process.stderr
    assert "Traceback" not in process.stderr
    line = process.stderr.strip().splitlines()[-1]
    assert line.startswith(f"failed: the tracking store {uri} failed: "), line
    assert "full" in line, line
    assert f"the last good weights: {out / 'weights.npz'}" in line, line
    load_weights(out / "weights.npz")
