"""Training from Python: `shardprop.service.train(config, data=frame, **overrides)`.

The same run as `shardprop train`, with the config as a file, a mapping or a Config, and the
rows as a path, a pandas DataFrame or a pyarrow Table. Rows in memory reach the Ray workers
through Ray's object store, one piece per shard.
"""

import os
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa

from shardprop.service.config import Config, config_from, read_yaml, set_key
from shardprop.service.errors import ConfigError
from shardprop.service.training.progress import Reporter
from shardprop.service.training.run import RunResult
from shardprop.service.training.run import train as run_training

SECTIONS = tuple(Config.model_fields)  # data, model, train, cluster, tracking


def train(
    config: str | os.PathLike | dict[str, Any] | Config | None = None,
    *,
    data: str | os.PathLike | pd.DataFrame | pa.Table | None = None,
    output: str | os.PathLike | None = None,
    init_weights: str | os.PathLike | None = None,
    progress: bool = False,
    **overrides: Any,
) -> RunResult:
    """Train as `shardprop train` does and return the run's result (run id, weights, final
    metrics, history).

    `config`: a YAML file, a mapping of sections, a Config, or None for the defaults.
    `data`: a path (data.path) or rows in memory; either replaces the config's data.path
    and data.synthetic.
    `overrides`: dotted keys (`**{"train.steps": 100}`) or whole sections
    (`train={"steps": 100}`), applied over `config`.
    `progress`: show the progress bar and the set-up lines, as the command does.
    Bad input raises shardprop's UserError subclasses (ConfigError, DataError) with the
    one line the command would print.
    """
    raw = _raw(config)
    for key, value in overrides.items():
        if key in SECTIONS and isinstance(value, dict):
            for inner, inner_value in value.items():
                set_key(raw, f"{key}.{inner}", inner_value)
        elif "." in key:
            set_key(raw, key, value)
        else:
            raise ConfigError(
                f"{key}: not a config key; give a section ({', '.join(SECTIONS)}) as a mapping "
                "or a dotted key such as **{'train.steps': 100}"
            )
    table = None
    if isinstance(data, pd.DataFrame):
        table = pa.Table.from_pandas(data, preserve_index=False)
    elif isinstance(data, pa.Table):
        table = data
    elif data is not None:
        set_key(raw, "data.path", os.fspath(data))
    if table is not None:  # in place of the config's own data.path or data.synthetic
        set_key(raw, "data.path", None)
    cfg = config_from(raw)
    return run_training(
        cfg,
        None if init_weights is None else Path(init_weights),
        None if output is None else Path(output),
        Reporter("auto" if progress else "quiet"),
        table=table,
    )


def _raw(config: str | os.PathLike | dict[str, Any] | Config | None) -> dict[str, Any]:
    """The config as a mutable mapping, for the overrides to go into."""
    if config is None:
        return {}
    if isinstance(config, Config):
        return config.model_dump(mode="json", exclude_unset=True)
    if isinstance(config, dict):
        return _copy(config)
    return read_yaml(Path(config))


def _copy(mapping: dict[str, Any]) -> dict[str, Any]:
    return {k: _copy(v) if isinstance(v, dict) else v for k, v in mapping.items()}
