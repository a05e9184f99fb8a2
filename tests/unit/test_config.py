"""The config: defaults, overrides, and errors that name the key."""

import logging
from pathlib import Path

import pytest

from shardprop.service.config import load_config
from shardprop.service.errors import ConfigError


def test_empty_config_is_complete_and_defaults_to_two_moons(tmp_path):
    path = tmp_path / "empty.yaml"
    path.write_text("")
    config = load_config(path)
    assert config.data.synthetic.name == "moons"
    assert config.model.hidden == [32, 32]
    assert config.train.steps == 500
    assert config.cluster.workers == 2
    assert config.tracking.uri is None


CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def test_default_config_file_is_the_embedded_default():
    config = load_config(CONFIGS / "default.yaml")
    assert config.data.synthetic.name == "moons"
    assert config.data.synthetic.rows == 20_000
    assert config.model.hidden == [32, 32]
    assert (config.cluster.workers, config.cluster.address, config.tracking.uri) == (2, None, None)


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_validates(path):
    load_config(path)


def test_set_overrides_parse_yaml_and_flags_win(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train: {steps: 10}\ncluster: {workers: 3}\n")
    config = load_config(
        path,
        ["model.hidden=[8, 4]", "train.learning_rate=0.01", "cluster.workers=1"],
        {"cluster.workers": 0, "tracking.experiment": "123", "tracking.uri": None},
    )
    assert config.model.hidden == [8, 4]
    assert config.train.learning_rate == 0.01
    assert config.train.steps == 10
    assert config.cluster.workers == 0
    assert config.tracking.experiment == "123"  # a flag's value is taken as given


def test_resolved_config_holds_every_key():
    resolved = load_config(None).resolved()
    assert set(resolved) == {"data", "model", "train", "cluster", "tracking", "sweep"}
    assert resolved["train"]["learning_rate"] == 0.5


@pytest.mark.parametrize(
    "override, message",
    [
        (
            "train.learnig_rate=1",
            "train.learnig_rate: unknown key; did you mean 'train.learning_rate'?",
        ),
        ("data.synthetic.nam=moons", "did you mean 'data.synthetic.name'?"),
        ("trian.steps=3", "trian: unknown key; did you mean 'train'?"),
        ("train.learning_rate=0", "train.learning_rate: Input should be greater than 0"),
        ("train.learning_rate=-1", "train.learning_rate: Input should be greater than 0"),
        ("train.steps=0", "train.steps: Input should be greater than 0"),
        ("train.steps=many", "train.steps: Input should be a valid integer"),
        ("model.activation=softmax", "model.activation: Input should be 'relu'"),
        ("model.hidden=[4, 0]", "model.hidden: layer widths must be >= 1"),
        ("cluster.workers=-1", "cluster.workers: Input should be greater than or equal to 0"),
        ("cluster.min_workers=3", "cluster.min_workers: 3 is more than cluster.workers (2)"),
        ("cluster.max_workers=1", "cluster.max_workers: 1 is less than cluster.workers (2)"),
        ("cluster.min_workers=0", "cluster.min_workers: Input should be greater than or equal"),
        ("cluster.replace_timeout=0", "cluster.replace_timeout: Input should be greater than 0"),
    ],
)
def test_bad_values_name_the_key(tmp_path, override, message):
    path = tmp_path / "c.yaml"
    path.write_text("data: {synthetic: {name: moons}}\n" if "data.path" in override else "{}")
    with pytest.raises(ConfigError) as error:
        load_config(path, [override])
    assert message in str(error.value)
    assert len(str(error.value).splitlines()) == 1


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "absent.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  steps: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_config(tmp_path / "list.yaml")
    with pytest.raises(ConfigError, match="expected key=value"):
        load_config(None, ["train.steps"])


def test_transport_defaults_to_the_compiled_graph():
    assert load_config(None).cluster.transport == "compiled"
    assert load_config(None, ["cluster.transport=plain"]).cluster.transport == "plain"
    with pytest.raises(ConfigError, match=r"cluster\.transport: Input should be 'compiled'"):
        load_config(None, ["cluster.transport=direct"])


@pytest.mark.parametrize(
    "override, transport, message",
    [
        (
            "cluster.compiled_graph=false",
            "plain",
            "cluster.compiled_graph is deprecated: use cluster.transport "
            "(compiled_graph: false is transport: plain)",
        ),
        (
            "cluster.compiled_graph=true",
            "compiled",
            "cluster.compiled_graph is deprecated: use cluster.transport",
        ),
        (
            "cluster.direct_steps=true",
            "compiled",
            "cluster.direct_steps is deprecated: no longer used, ignored",
        ),
        (
            "cluster.allreduce=tree",
            "compiled",
            "cluster.allreduce is deprecated: no longer used, ignored",
        ),
    ],
)
def test_old_transport_keys_are_accepted_with_one_warning_line(
    caplog, override, transport, message
):
    with caplog.at_level(logging.WARNING, logger="shardprop.service.config"):
        config = load_config(None, [override])
    assert config.cluster.transport == transport
    (record,) = caplog.records
    assert message in record.getMessage()
    assert "\n" not in record.getMessage()
    assert "compiled_graph" not in config.resolved()["cluster"]  # logged as the new key only


def test_an_explicit_transport_wins_over_the_old_key():
    config = load_config(None, ["cluster.compiled_graph=false", "cluster.transport=compiled"])
    assert config.cluster.transport == "compiled"


def test_a_fixed_size_is_the_default_and_elastic_bounds_hold_the_start():
    cluster = load_config(None).cluster
    assert (cluster.smallest, cluster.workers, cluster.largest) == (2, 2, 2)
    elastic = load_config(None, ["cluster.min_workers=1", "cluster.max_workers=4"]).cluster
    assert (elastic.smallest, elastic.workers, elastic.largest) == (1, 2, 4)
    # an elastic config run in-process (--workers 0): one process, no bounds to keep
    local = load_config(None, ["cluster.min_workers=1"], {"cluster.workers": 0}).cluster
    assert (local.smallest, local.largest) == (0, 0)
