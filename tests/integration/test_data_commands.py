"""`shardprop data make` writes the rows the generators make and the real tables as shipped;
`shardprop plan` costs a run from metadata alone, with numbers that match a hand count; the
real-table configs train."""

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray
from typer.testing import CliRunner

from shardprop.service.cli.app import app
from shardprop.service.data.datasets import make_dataset
from shardprop.service.data.estimate import (
    COORDINATOR_PROCESS_BYTES,
    IN_PROCESS_BYTES,
    WORKER_PROCESS_BYTES,
    ReadMemory,
    allreduce_bytes,
    buffer_columns,
    estimate_plan,
    output_units,
    parameter_count,
    read_memory,
    step_flops,
    worker_memory,
)
from shardprop.workers.data.source import Source
from shardprop.workers.data.synthetic import SyntheticSpec, generate
from shardprop.workers.network.backprop import Architecture, Batch, Network
from shardprop.workers.network.params import init_params
from shardprop.workers.reduction.blocktree import BlockGrid

ROOT = Path(__file__).resolve().parents[2]


def shardprop(*args):
    result = CliRunner().invoke(app, [str(arg) for arg in args])
    return result.exit_code, result.output


def row_groups(path: Path) -> list[int]:
    metadata = pq.ParquetFile(path).metadata
    return [metadata.row_group(g).num_rows for g in range(metadata.num_row_groups)]


def assert_one_line_error(code, output, *fragments):
    assert code == 2, output
    assert "Traceback" not in output
    errors = [line for line in output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, output
    for fragment in fragments:
        assert fragment in errors[0], output


# data make: synthetic sets


def test_moons_file_holds_exactly_the_generators_rows(tmp_path):
    out = tmp_path / "moons.parquet"
    code, output = shardprop(
        "data", "make", "moons", "--rows", 140_000, "--noise", 0.1, "--seed", 3, "--out", out
    )
    assert code == 0, output
    assert row_groups(out) == [131_072, 140_000 - 131_072]  # big files: 128k-row groups
    spec = SyntheticSpec("moons", rows=140_000, noise=0.1, seed=3)
    assert pq.read_table(out).equals(generate(spec, 0, spec.rows))


def test_moons_in_three_files_split_rows_like_shards_and_concatenate_to_the_same_rows(tmp_path):
    out = tmp_path / "parts"
    code, output = shardprop("data", "make", "moons", "--rows", 10_001, "--files", 3, "--out", out)
    assert code == 0, output
    files = sorted(out.iterdir())
    assert [f.name for f in files] == [f"part-0000{i}.parquet" for i in range(3)]
    assert [pq.ParquetFile(f).metadata.num_rows for f in files] == [3334, 3334, 3333]
    assert all(row_groups(f) == [pq.ParquetFile(f).metadata.num_rows] for f in files)
    written = pa.concat_tables(pq.read_table(f) for f in files)
    assert written.equals(generate(SyntheticSpec("moons", rows=10_001), 0, 10_001))


def test_row_groups_never_exceed_the_limit_and_rewriting_is_deterministic(tmp_path):
    first = make_dataset(
        "blobs", tmp_path / "a", rows=5000, files=2, classes=4, row_group_rows=1024
    )
    again = make_dataset(
        "blobs", tmp_path / "a", rows=5000, files=2, classes=4, row_group_rows=1024
    )
    assert first == again and first.row_groups == 6
    assert row_groups(first.files[0]) == [1024, 1024, 452]
    assert all(
        pq.read_table(f).equals(pq.read_table(g))
        for f, g in zip(first.files, again.files, strict=True)
    )
    assert not any(p.name.startswith(".") for p in (tmp_path / "a").iterdir())  # no partials


def test_a_folder_holding_other_data_files_is_refused(tmp_path):
    make_dataset("moons", tmp_path / "parts", rows=100, files=3)
    code, output = shardprop(
        "data", "make", "moons", "--rows", 100, "--files", 2, "--out", tmp_path / "parts"
    )
    assert_one_line_error(code, output, "part-00002.parquet", "empty folder")


@pytest.mark.parametrize(
    "args, fragments",
    [
        (["moons", "--out", "m.parquet"], ["--rows", "required"]),
        (["moons", "--rows", 10, "--features", 3, "--out", "m.parquet"], ["--features", "2"]),
        (["moons", "--rows", 10, "--out", "m.csv"], ["--out", ".parquet"]),
        (["moons", "--rows", 2, "--files", 3, "--out", "m"], ["--files", "2 rows"]),
        (["digits", "--noise", 0.1, "--out", "d.parquet"], ["--noise", "synthetic"]),
        (["digits", "--rows", 5000, "--out", "d.parquet"], ["--rows", "1797"]),
        (["mnist", "--out", "d.parquet"], ["mnist", "breast-cancer, digits"]),
    ],
)
def test_bad_data_make_arguments_end_in_one_line(tmp_path, monkeypatch, args, fragments):
    monkeypatch.chdir(tmp_path)
    assert_one_line_error(*shardprop("data", "make", *args), *fragments)


# data make: scikit-learn's real tables


def test_breast_cancer_has_its_named_features_and_a_0_1_label(tmp_path):
    out = tmp_path / "bc.parquet"
    code, output = shardprop("data", "make", "breast-cancer", "--out", out)
    assert code == 0, output
    table = pq.read_table(out)
    assert table.shape == (569, 31)
    assert table.column_names[:2] == ["mean_radius", "mean_texture"]
    assert table.column_names[-1] == "y"
    assert all(pa.types.is_float64(t) for t in table.schema.types[:-1])
    y = table.column("y").to_numpy()
    assert y.dtype == np.int64 and np.bincount(y).tolist() == [212, 357]  # malignant, benign


def test_digits_has_64_pixels_and_ten_classes_and_rows_takes_the_first_rows(tmp_path):
    out = tmp_path / "digits.parquet"
    assert shardprop("data", "make", "digits", "--out", out)[0] == 0
    table = pq.read_table(out)
    assert table.shape == (1797, 65)
    assert table.column_names[:2] == ["pixel_0_0", "pixel_0_1"]
    assert sorted(set(table.column("y").to_pylist())) == list(range(10))
    head = tmp_path / "head.parquet"
    assert shardprop("data", "make", "digits", "--rows", 100, "--out", head)[0] == 0
    assert pq.read_table(head).equals(table.slice(0, 100))


def test_penguins_keep_their_strings_and_their_nulls(tmp_path):
    out = tmp_path / "penguins.parquet"
    code, output = shardprop("data", "make", "penguins", "--out", out)
    assert code == 0, output
    table = pq.read_table(out)
    assert table.column_names == [
        "species",
        "island",
        "bill_length_mm",
        "bill_depth_mm",
        "flipper_length_mm",
        "body_mass_g",
        "sex",
        "year",
    ]
    assert table.num_rows == 344
    for name in ("species", "island", "sex"):
        assert pa.types.is_string(table.schema.field(name).type)
    assert table.column("species").value_counts().to_pylist() == [
        {"values": "Adelie", "counts": 152},
        {"values": "Gentoo", "counts": 124},
        {"values": "Chinstrap", "counts": 68},
    ]
    # the "NA"s of the shipped CSV are nulls, not the string "NA" nor NaN
    nulls = {name: table.column(name).null_count for name in table.column_names}
    assert nulls == {
        "species": 0,
        "island": 0,
        "bill_length_mm": 2,
        "bill_depth_mm": 2,
        "flipper_length_mm": 2,
        "body_mass_g": 2,
        "sex": 11,
        "year": 0,
    }
    assert "NA" not in table.column("sex").to_pylist()
    assert table.slice(0, 4).column("body_mass_g").to_pylist() == [3750, 3800, 3250, None]
    head = tmp_path / "head.parquet"
    assert shardprop("data", "make", "penguins", "--rows", 4, "--out", head)[0] == 0
    assert pq.read_table(head).equals(table.slice(0, 4))


def test_diabetes_is_a_numeric_regression_table_in_original_units(tmp_path):
    out = tmp_path / "diabetes.parquet"
    code, output = shardprop("data", "make", "diabetes", "--out", out)
    assert code == 0, output
    table = pq.read_table(out)
    assert table.shape == (442, 11)
    assert table.column_names == [
        "age", "sex", "bmi", "bp", "s1", "s2", "s3", "s4", "s5", "s6", "y"
    ]  # fmt: skip
    assert all(pa.types.is_float64(t) for t in table.schema.types)
    assert all(table.column(name).null_count == 0 for name in table.column_names)
    age, y = table.column("age").to_numpy(), table.column("y").to_numpy()
    assert age.min() >= 19 and age.max() <= 79  # years, not scikit-learn's scaled copy
    assert y.min() == 25 and y.max() == 346 and len(np.unique(y)) > 200
    head = tmp_path / "head.parquet"
    assert shardprop("data", "make", "diabetes", "--rows", 10, "--out", head)[0] == 0
    assert pq.read_table(head).equals(table.slice(0, 10))


@pytest.mark.parametrize("name, rows", [("penguins", 344), ("diabetes", 442)])
def test_new_tables_refuse_more_rows_than_they_have(tmp_path, name, rows):
    code, output = shardprop("data", "make", name, "--rows", rows + 1, "--out", tmp_path / "t.pq")
    assert_one_line_error(code, output, "--rows", f"{name} has {rows} rows")


# plan


@pytest.fixture
def no_rows_no_workers(monkeypatch):
    """Fail the test if anything reads a row or starts a worker group."""

    def refuse(*args, **kwargs):
        raise AssertionError("plan must read metadata only")

    monkeypatch.setattr(Source, "read", refuse)
    monkeypatch.setattr("shardprop.service.training.run.start_group", refuse)


def test_plan_on_a_parquet_folder_prints_rows_and_flops_per_worker_without_ray(
    tmp_path, no_rows_no_workers
):
    make_dataset("moons", tmp_path / "parts", rows=1000, files=3)
    config = tmp_path / "c.yaml"
    config.write_text(f"data: {{path: {tmp_path / 'parts'}}}\nmodel: {{hidden: [8]}}\n")
    ray_was_running = ray.is_initialized()
    code, output = shardprop("plan", config, "--workers", 2)
    assert code == 0, output
    assert ray.is_initialized() is ray_was_running  # False when run alone: plan starts no Ray
    # sizes (2, 8, 1): 2*m*(8*3 + 1*9) forward, as much for dW, 2*m*1*8 for dA[1]: 148 m;
    # the exact reduction's 8 blocks of 128 rows: m = 512 and 488
    rows = [line.split() for line in output.splitlines() if line.strip().startswith(("0 ", "1 "))]
    assert [(r[0], r[2], r[4], r[-1]) for r in rows] == [
        ("0", "0..512", "512", "75,776"),
        ("1", "512..1,000", "488", "72,224"),
    ]
    assert "FLOPs per step: 148,000" in output
    assert "33 parameters" in output
    assert "K unknown until the workers read the labels" in output
    # theta to each of 2 workers and a gradient back from each: 4 * 33 * 8 bytes
    assert "all-reduce per step: 1.0 KiB" in output


def test_plan_of_the_breast_cancer_config_reads_its_30_features(
    tmp_path, monkeypatch, no_rows_no_workers
):
    monkeypatch.chdir(tmp_path)
    make_dataset("breast-cancer", "data/breast-cancer.parquet")
    code, output = shardprop("plan", ROOT / "configs/breast-cancer.yaml")
    assert code == 0, output
    assert "569 rows, 30 features" in output and "output units: 1" in output
    # the exact reduction's 8 blocks of 72 rows, 4 per worker
    assert "0..288" in output and "288..569" in output


@pytest.mark.parametrize(
    "override, fragments",
    [
        ("data.label=target", ["data.label", "'target'"]),
        ("model.hiden=[4]", ["model.hiden", "did you mean 'model.hidden'"]),
    ],
)
def test_plan_with_a_bad_config_exits_2_with_one_line(tmp_path, override, fragments):
    make_dataset("moons", tmp_path / "m.parquet", rows=100)
    config = tmp_path / "c.yaml"
    config.write_text(f"data: {{path: {tmp_path / 'm.parquet'}}}\n")
    assert_one_line_error(*shardprop("plan", config, "--set", override), *fragments)


# the estimates, by hand


def test_estimates_of_a_tiny_network_match_a_hand_count():
    sizes, m = (2, 3, 1), 4
    assert parameter_count(sizes) == 3 * 3 + 1 * 4 == 13
    memory = worker_memory(sizes, m, itemsize=8)
    assert memory.batch == (3 + 1) * 4 * 8 == 128  # [X; 1] and Y
    assert memory.activations == (4 + 1) * 4 * 8 == 160  # [A1; 1] and Z2
    assert memory.deltas == 2 * 3 * 4 * 8 == 192
    assert memory.parameters == 2 * 13 * 8 == 208
    assert memory.training == 688
    # the features as read (2, 4), the label as Arrow and as float64 and 4 flags a row; then
    # the targets and one feature's selected rows and their float64 standardising
    assert memory.loading == 2 * 4 * 8 + (2 * 8 + 4) * 4 + (4 * 8 + 3 * 8 * 4)
    assert memory.loading == 272 and memory.peak == 688  # the network's buffers weigh most
    flops = step_flops(sizes, m)
    assert (flops.forward, flops.backward_weights, flops.backward_inputs) == (104, 104, 24)
    assert flops.total == 232
    deeper = step_flops((2, 3, 2, 1), 1)  # dA for layers 2 and 3, never for the input
    assert (deeper.forward, deeper.backward_inputs, deeper.total) == (40, 16, 96)
    traffic = allreduce_bytes(13, workers=3, itemsize=4)
    assert (traffic.broadcast, traffic.gather, traffic.total) == (156, 156, 312)
    assert allreduce_bytes(13, workers=0, itemsize=8).total == 0


def test_a_file_read_and_validation_rows_add_to_the_loading_peak_by_hand():
    sizes, m = (2, 3, 1), 4
    read = ReadMemory(buffers=200)  # a piece larger than what prepare adds
    memory = worker_memory(sizes, m, 8, read=read, validation_fraction=0.25, process=1000)
    assert (memory.activations, memory.deltas) == (2 * 160, 2 * 192)  # a validation network
    # the validation rows are the same values in a batch of their own: nothing more to load
    assert memory.loading == 64 + 80 + 200 == 344
    assert memory.training == 128 + 320 + 384 + 208 == 1040
    assert memory.peak == 1000 + max(1040, 344)
    # float32 batches of features held as float64 (a float64 column)
    assert worker_memory(sizes, m, 4, held=8).loading == 64 + 80 + (4 * 4 + 96)


def test_a_read_holds_one_column_of_the_largest_file_span():
    files = Source("parquet", files=("a", "b"), file_rows=(3, 5))
    # rows 2..7: 1 row of a, 4 of b; one column raw, decoded and as float64
    assert read_memory(files, 2, 7, 3) == ReadMemory(buffers=3 * 8 * 4)
    assert read_memory(None, 0, 5, 3) == ReadMemory(buffers=120)  # one file
    # a synthetic block of every column, in two float64 copies
    synthetic = Source("synthetic", synthetic=SyntheticSpec("moons", 10))
    assert read_memory(synthetic, 0, 5, 3) == ReadMemory(buffers=2 * 8 * 3 * 5)


def test_plan_estimate_splits_costs_by_shard_rows():
    estimate = estimate_plan([(0, 3), (3, 5)], 2, [3], 1, "float32", workers=2)
    assert estimate.n_params == 13 and [s.rows for s in estimate.shards] == [3, 2]
    assert (
        estimate.flops.total
        == step_flops((2, 3, 1), 5).total
        == sum(s.flops.total for s in estimate.shards)
    )
    assert estimate.shards[1].memory == worker_memory(
        (2, 3, 1), 2, itemsize=4, read=read_memory(None, 3, 5, 3), process=WORKER_PROCESS_BYTES
    )
    assert estimate.peaks == [s.memory.peak for s in estimate.shards]
    # the coordinator: its process, 7 vectors and a gradient sum back from each worker
    assert estimate.coordinator == COORDINATOR_PROCESS_BYTES + (7 + 2) * 13 * 4


def test_in_process_the_one_shard_is_the_coordinators_process():
    estimate = estimate_plan([(0, 5)], 2, [3], 1, "float64", workers=0)
    memory = estimate.shards[0].memory
    alone = worker_memory((2, 3, 1), 5, 8, read=read_memory(None, 0, 5, 3))
    assert memory.process == IN_PROCESS_BYTES and estimate.coordinator == 0
    # theta is the worker's own; the other 6 coordinator vectors join its parameters
    assert memory.parameters == alone.parameters + 6 * 13 * 8


@pytest.mark.parametrize(
    "m, threads, block_rows",
    [(11, 1, None), (5_000, 1, None), (20_000, 2, None), (3_000, 2, None), (20_000, 2, 700)],
)
def test_memory_estimate_is_what_the_network_allocates(m, threads, block_rows):
    """A shard narrower than a chunk, one chunk a thread, one part of two threads, and the
    exact reduction's blocks narrower than a chunk."""
    arch = Architecture((5, 7, 3, 4), "tanh", "multiclass")
    network = Network(arch, np.float64, threads=threads)
    batch = Batch(np.ones((5, m)), np.eye(4)[np.arange(m) % 4].T)
    theta = init_params(arch.layout, "he", 0, np.float64)
    grid = block_rows and BlockGrid(m, block_rows)
    if grid:
        sums = network.block_gradient(theta, batch, grid.bounds(0, m), 0, grid).total()
    else:
        sums = network.gradient(theta, batch)
    columns = buffer_columns(arch.sizes, "float64", threads, grid)
    memory = worker_memory(arch.sizes, m, itemsize=8, columns=columns)
    assert memory.batch == batch.X1.nbytes + batch.Y.nbytes
    held = network.buffers
    assert memory.activations == sum(a.nbytes for b in held for a in [*b.A1, b.Z_out])
    assert memory.deltas == sum(d.nbytes for b in held for d in b.delta)
    assert memory.parameters == theta.nbytes + sums.grad.nbytes


@pytest.mark.parametrize(
    "task, spec, units",
    [
        ("binary", None, 1),
        ("regression", None, 1),
        ("auto", None, None),  # a file: only its labels tell
        ("multiclass", None, None),
        ("auto", SyntheticSpec("moons", 10), 1),
        ("auto", SyntheticSpec("blobs", 10, classes=2), 1),  # two classes: binary
        ("auto", SyntheticSpec("blobs", 10, classes=5), 5),
        ("multiclass", SyntheticSpec("moons", 10), 2),
        ("auto", SyntheticSpec("regression", 10), 1),
    ],
)
def test_output_units_come_from_the_config_when_it_knows(task, spec, units):
    assert output_units(task, spec) == units


# the real-table configs train


def test_digits_config_trains_to_full_training_accuracy(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert shardprop("data", "make", "digits", "--out", "data/digits.parquet")[0] == 0
    code, output = shardprop(
        "train",
        ROOT / "configs/digits.yaml",
        "--workers",
        0,
        "--tracking-uri",
        f"sqlite:///{tmp_path / 'mlflow.db'}",
        "--output",
        tmp_path / "out",
        "--quiet",
    )
    assert code == 0, output
    final = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert final["rows"] == 1797
    assert final["accuracy"] >= 0.99  # measured: 1.0 after 100 Adam steps
