"""The configuration layer: files, layering, checks where values are declared, round trip."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pytest

from vlpipe.config import ConfigError, load_file, opt, parse_assignment, resolve, section, to_toml


@dataclass
class Optim:
    lr: float = opt(1e-4, "learning rate", minimum=0.0)
    epochs: int = opt(4, "epochs", minimum=1)
    name: str = opt("adamw", "optimizer", choices=("adamw", "bertadam"))


@dataclass
class Job:
    features: list[Path] = opt(help="caches", factory=list)
    limit: int | None = opt(None, "first N", minimum=0)
    model: dict = field(default_factory=dict)
    progress: bool = opt(True, "bar")
    optim: Optim = section(Optim)


def test_layers_later_wins_and_sections_merge():
    job = resolve(Job, {"optim": {"lr": 1e-3, "epochs": 9}}, {"optim": {"lr": 2e-3}})
    assert job.optim.lr == 2e-3 and job.optim.epochs == 9 and job.optim.name == "adamw"
    assert job.features == [] and job.limit is None


def test_values_are_converted_and_checked_where_declared():
    job = resolve(Job, {"features": "a.h5", "limit": "3", "progress": "false"})
    assert job.features == [Path("a.h5")] and job.limit == 3 and job.progress is False
    with pytest.raises(ConfigError, match=r"optim.epochs must be >= 1, got 0"):
        resolve(Job, {"optim": {"epochs": 0}})
    with pytest.raises(ConfigError, match=r"optim.name must be one of adamw, bertadam; got 'sgd'"):
        resolve(Job, {"optim": {"name": "sgd"}})
    with pytest.raises(ConfigError, match=r"limit should be an integer, got 'x'"):
        resolve(Job, {"limit": "x"})
    with pytest.raises(ConfigError, match=r"limit should be an integer, got 2.5"):
        resolve(Job, {"limit": 2.5})
    with pytest.raises(ConfigError, match=r"optim.lr should be a number, got True"):
        resolve(Job, {"optim": {"lr": True}})
    with pytest.raises(ConfigError, match=r"unknown option\(s\) lr; known: features, limit"):
        resolve(Job, {"lr": 1.0})


def test_toml_round_trip_and_yaml(tmp_path):
    job = resolve(
        Job, {"features": ["a.h5", "b.h5"], "model": {"l_layers": 2}, "optim": {"lr": 3e-5}}
    )
    (tmp_path / "c.toml").write_text(to_toml(job))
    again = resolve(Job, load_file(tmp_path / "c.toml"))
    assert again == job
    (tmp_path / "c.yaml").write_text(
        "features: [a.h5, b.h5]\nmodel: {l_layers: 2}\noptim: {lr: 3.0e-5}\n"
    )
    assert resolve(Job, load_file(tmp_path / "c.yaml")) == job


def test_bad_files_are_named(tmp_path):
    (tmp_path / "bad.toml").write_text("lr = \n")
    with pytest.raises(ConfigError, match=r"bad\.toml"):
        load_file(tmp_path / "bad.toml")
    with pytest.raises(ConfigError, match="does not exist"):
        load_file(tmp_path / "none.toml")
    with pytest.raises(ConfigError, match="folder"):
        load_file(tmp_path)
    (tmp_path / "c.json").write_text("{}")
    with pytest.raises(ConfigError, match=r"\.toml, \.yaml"):
        load_file(tmp_path / "c.json")


def test_set_assignments():
    assert parse_assignment("optim.lr=1e-3") == {"optim": {"lr": 1e-3}}
    assert parse_assignment("features=['a', 'b']") == {"features": ["a", "b"]}
    assert parse_assignment("name=bertadam") == {"name": "bertadam"}  # a bare word is a string
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        parse_assignment("lr")
