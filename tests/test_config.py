"""Config dataclasses: YAML and command-line flags map onto them; bad keys and values are named."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from typing import Literal

import pytest

from fasteto.config import ConfigError, add_arguments, from_dict, load_yaml, overrides, to_dict, update


@dataclass
class Inner:
    lr: float = field(default=2e-5, metadata={"help": "learning rate"})
    schedule: Literal["cosine", "constant"] = field(default="cosine", metadata={"help": "LR schedule"})
    betas: list[float] = field(default_factory=lambda: [0.1, 0.5], metadata={"help": "beta per iteration"})


@dataclass
class Outer:
    name: str = field(default="smollm2-135m", metadata={"help": "model"})
    limit: int | None = field(default=None, metadata={"help": "tasks"})
    bf16: bool = field(default=False, metadata={"help": "bf16"})
    sft: Inner = field(default_factory=Inner)


def test_nested_dict_overrides_defaults():
    cfg = from_dict(Outer, {"limit": 3, "sft": {"lr": "1e-4", "schedule": "constant", "betas": [0.2]}})
    assert cfg == Outer(limit=3, sft=Inner(lr=1e-4, schedule="constant", betas=[0.2]))
    assert update(cfg, {"limit": "none"}).limit is None
    assert to_dict(cfg)["sft"]["betas"] == [0.2]


@pytest.mark.parametrize(("data", "message"), [
    ({"nope": 1}, "unknown option 'nope'; known here: name, limit, bf16, sft"),
    ({"sft": {"lrr": 1}}, "unknown option 'sft.lrr'; known here: sft.lr, sft.schedule, sft.betas"),
    ({"sft": {"schedule": "linear"}}, "sft.schedule: 'linear' is not one of 'cosine', 'constant'"),
    ({"limit": 2.5}, "limit: expected an integer, got 2.5"),
    ({"bf16": "maybe"}, "bf16: expected true or false, got 'maybe'"),
    ({"sft": 3}, "sft: expected a mapping, got 3"),
    ({"name": None}, "name: a value is required"),
])
def test_bad_keys_and_values_are_named(data, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        from_dict(Outer, data)


def test_flags_are_derived_and_parsed():
    parser = argparse.ArgumentParser()
    parser.add_argument("--config")
    add_arguments(parser, Outer)
    argv = ["--sft.lr", "3e-4", "--bf16", "true", "--sft.betas", "0.1,0.2", "--config", "x"]
    args = parser.parse_args(argv)
    assert overrides(args, Outer) == {"sft": {"lr": "3e-4", "betas": "0.1,0.2"}, "bf16": "true"}
    cfg = update(Outer(), overrides(args, Outer))
    assert (cfg.sft.lr, cfg.bf16, cfg.sft.betas) == (3e-4, True, [0.1, 0.2])
    text = parser.format_help()
    assert "--sft.schedule V" in text and "(one of cosine, constant)" in text and "[default: cosine]" in text


def test_yaml_file(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("limit: 4\nsft:\n  lr: 1.0e-5\n")
    assert from_dict(Outer, load_yaml(path)) == Outer(limit=4, sft=Inner(lr=1e-5))
    (tmp_path / "bad.yaml").write_text("- a list\n")
    with pytest.raises(ConfigError, match="bad.yaml: expected a mapping"):
        load_yaml(tmp_path / "bad.yaml")
    with pytest.raises(ConfigError, match="missing.yaml does not exist"):
        load_yaml(tmp_path / "missing.yaml")
