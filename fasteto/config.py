"""Configuration as nested dataclasses, with YAML files and command-line flags derived from them.

Every field is written once, with its help text in ``field(metadata={"help": ...})``; the flags
(``--sft.lr 2e-5``), the YAML keys (``sft: {lr: 2e-5}``) and ``--help`` all come from the dataclass.
Unknown keys and values of the wrong type are refused with the key's dotted name and what is allowed.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")


class ConfigError(ValueError):
    """A configuration key or value that cannot be used; the message names it and what is allowed."""


def help_of(f: dataclasses.Field) -> str:
    return f.metadata.get("help", "")


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _is_config(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    """``X | None`` -> (X, True); anything else -> (tp, False)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(tp)) == 2:
            return args[0], True
    return tp, False


def coerce(value: Any, tp: Any, key: str) -> Any:
    """``value`` (from YAML or a command line string) as type ``tp``; ConfigError naming ``key`` if not."""
    inner, optional = _unwrap_optional(tp)
    if value is None or (optional and isinstance(value, str) and value.lower() in ("none", "null")):
        if optional:
            return None
        raise ConfigError(f"{key}: a value is required (got none)")
    origin = typing.get_origin(inner)
    if origin is typing.Literal:
        allowed = typing.get_args(inner)
        if value not in allowed:
            raise ConfigError(f"{key}: {value!r} is not one of {', '.join(map(repr, allowed))}")
        return value
    if origin in (list, tuple):
        (item_tp, *_) = typing.get_args(inner) or (str,)
        items = value.split(",") if isinstance(value, str) else value
        if not isinstance(items, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [coerce(v.strip() if isinstance(v, str) else v, item_tp, key) for v in items if v != ""]
    return _coerce_scalar(value, inner, key)


def _coerce_scalar(value: Any, tp: Any, key: str) -> Any:
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "yes", "1", "false", "no", "0"):
            return value.lower() in ("true", "yes", "1")
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if tp in (int, float):
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        try:
            number = tp(value) if isinstance(value, str) else value
            if tp is int and (not isinstance(number, int) and not float(number).is_integer()):
                raise ValueError
            return tp(number)
        except (TypeError, ValueError):
            kind = "an integer" if tp is int else "a number"
            raise ConfigError(f"{key}: expected {kind}, got {value!r}") from None
    if tp is str:
        return str(value)
    raise ConfigError(f"{key}: unsupported field type {tp!r}")


def from_dict(cls: type[T], data: dict[str, Any], prefix: str = "") -> T:
    """Build ``cls`` from a (possibly partial) nested dict; defaults fill what is missing."""
    return update(cls(), data, prefix)


def update(config: T, data: dict[str, Any], prefix: str = "") -> T:
    """A copy of ``config`` with the nested dict ``data`` applied over it."""
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {data!r}")
    hints = _hints(type(config))
    names = [f.name for f in dataclasses.fields(config)]
    changes = {}
    for key, value in data.items():
        dotted = prefix + str(key)
        if key not in names:
            known = ", ".join(prefix + n for n in names)
            raise ConfigError(f"unknown option {dotted!r}; known here: {known}")
        if _is_config(hints[key]):
            changes[key] = update(getattr(config, key), value, dotted + ".")
        else:
            changes[key] = coerce(value, hints[key], dotted)
    return dataclasses.replace(config, **changes)


def to_dict(config: Any) -> dict[str, Any]:
    return dataclasses.asdict(config)


def flat_fields(cls: type, prefix: str = "") -> list[tuple[str, dataclasses.Field, Any]]:
    """Every leaf field as (dotted name, field, type), depth first, in declaration order."""
    out = []
    hints = _hints(cls)
    for f in dataclasses.fields(cls):
        if _is_config(hints[f.name]):
            out += flat_fields(hints[f.name], prefix + f.name + ".")
        else:
            out.append((prefix + f.name, f, hints[f.name]))
    return out


def add_arguments(parser: argparse.ArgumentParser, cls: type) -> None:
    """One ``--a.b`` flag per leaf field of ``cls``; values stay strings until ``overrides`` coerces them."""
    defaults = to_dict(cls())
    for dotted, f, tp in flat_fields(cls):
        default = defaults
        for part in dotted.split("."):
            default = default[part]
        choices = typing.get_args(_unwrap_optional(tp)[0])
        allowed = f" (one of {', '.join(map(str, choices))})" if typing.get_origin(
            _unwrap_optional(tp)[0]) is typing.Literal else ""
        parser.add_argument(f"--{dotted}", dest=dotted, default=argparse.SUPPRESS, metavar="V",
                            help=f"{help_of(f)}{allowed} [default: {default}]")


def overrides(args: argparse.Namespace, cls: type) -> dict[str, Any]:
    """The flags of ``cls`` given on the command line, as a nested dict for ``update``."""
    nested: dict[str, Any] = {}
    given = vars(args)
    for dotted in (name for name, _, _ in flat_fields(cls) if name in given):
        value = given[dotted]
        node = nested
        *parents, leaf = dotted.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return nested


def load_yaml(path: str | Path) -> dict[str, Any]:
    import yaml

    try:
        data = yaml.safe_load(Path(path).read_text())
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path}: expected a mapping of options at the top level")
    return data


# The ETO run ----------------------------------------------------------------------------------------

def _help(text: str, default: Any = dataclasses.MISSING, factory: Any = dataclasses.MISSING) -> Any:
    if factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=factory, metadata={"help": text})
    return dataclasses.field(default=default, metadata={"help": text})


@dataclasses.dataclass
class ModelConfig:
    name: str = _help("a local model folder, or 'smollm2-135m' (the embedded default)", "smollm2-135m")
    dtype: typing.Literal["float32", "bfloat16"] = _help("weights' dtype", "float32")


@dataclasses.dataclass
class EnvsConfig:
    names: list[str] = _help("environments; empty: ScienceWorld, and ALFWorld when its data is found",
                             factory=list)
    alfworld_data: str | None = _help("ALFWorld's data folder (default: $ALFWORLD_DATA)", None)
    train_tasks: int | None = _help("training tasks per environment, a seeded sample (none: all)", 4)
    test_tasks: int | None = _help("tasks per test split, a seeded sample (none: all)", 2)
    explore_tasks: int | None = _help(
        "training tasks explored per iteration and environment, a sample drawn anew each iteration "
        "(none: all of them, as ETO); SFT still uses every training task's expert", None)
    splits: list[str] = _help("test splits", factory=lambda: ["seen", "unseen"])
    train_ids: list[str] = _help("exact training task ids instead of a sample (any environment)",
                                 factory=list)
    test_ids: list[str] = _help("exact test task ids instead of a sample (any environment and split)",
                                factory=list)


@dataclasses.dataclass
class BackendOptions:
    """How a stage runs its micro-batches. The trainer's own ``TrainConfig`` inherits these fields, so
    their names, defaults, choices and help exist once."""

    trainer: typing.Literal["fast", "plain"] = _help(
        "fast: packed shared-prefix token trees, tree attention and fused log-probs; plain: the padded "
        "reference trainer (same losses)", "fast")
    token_budget: int = _help("fast trainer: packed tokens per micro-batch (micro_batch is not used); "
                              "must hold the longest sequence or pair", 8192)
    attn_impl: typing.Literal["auto", "reference", "flex", "varlen", "varlen_eager"] = _help(
        "fast trainer: tree attention backend; auto: varlen (FlashAttention) when it can run on CUDA, else "
        "flex on CUDA, varlen_eager elsewhere", "auto")
    logprob_impl: typing.Literal["auto", "triton", "torch", "native", "reference"] = _help(
        "fast trainer: fused log-prob backend; auto: triton on CUDA, elsewhere native when built, else "
        "torch", "auto")
    gradient_checkpointing: bool = _help(
        "recompute each decoder layer in backward: less memory, more compute", False)


@dataclasses.dataclass
class TrainerOptions(BackendOptions):
    """How a stage trains; both SFT and DPO have these (``--sft.trainer plain``, ``--dpo.lora_rank 16``)."""

    lora_rank: int = _help("LoRA rank; 0: train every weight. Checkpoints hold the merged weights", 0)
    lora_alpha: float = _help("LoRA alpha: the adapter's update is scaled by alpha / rank", 32.0)
    lora_dropout: float = _help("dropout on the LoRA adapters' input", 0.0)
    lora_targets: list[str] = _help("linear modules LoRA adapts",
                                    factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])


@dataclasses.dataclass
class SFTConfig(TrainerOptions):
    lr: float = _help("learning rate", 2e-5)
    epochs: int = _help("epochs", 3)
    global_batch: int = _help("sequences per optimizer step", 64)
    micro_batch: int = _help("plain trainer: sequences per forward pass", 1)
    warmup_ratio: float = _help("linear warmup, then cosine decay", 0.03)
    max_length: int = _help("tokens per sequence; longer ones are cut at the end", 4096)


@dataclasses.dataclass
class DPOConfig(TrainerOptions):
    lr: list[float] = _help("learning rate of iteration 1, 2, ... (the last repeats)",
                            factory=lambda: [1e-6, 5e-7])
    beta: list[float] = _help("DPO beta of iteration 1, 2, ... (the last repeats)",
                              factory=lambda: [0.1, 0.5])
    loss: typing.Literal["sigmoid", "ipo", "sigmoid_norm", "hinge"] = _help("preference loss", "sigmoid")
    sft_weight: float = _help("adds this times the chosen side's mean per-token NLL to the loss (RPO, "
                              "Pang et al. 2024; keeps the expert's likelihood up); ETO: 0", 0.0)
    epochs: int = _help("epochs per iteration", 3)
    global_batch: int = _help("pairs per optimizer step", 32)
    micro_batch: int = _help("plain trainer: pairs per forward pass", 1)
    warmup_ratio: float = _help("linear warmup, then constant", 0.1)
    # ETO's 512 fits its Llama-2 prompts; ScienceWorld's instruction exchange alone is ~430 SmolLM2 tokens.
    max_prompt: int = _help("most prompt tokens; a pair with a longer prompt is dropped (never cut)", 1024)
    max_target: int = _help("chosen / rejected tokens kept (their start)", 3072)
    max_extra_messages: str = _help("cut of a losing trajectory: N, 'none', or 'auto' (ETO's per env)",
                                    "auto")


@dataclasses.dataclass
class ExploreConfig:
    max_new_tokens: int = _help("tokens per reply", 512)
    concurrency: int = _help("episodes in flight at once", 4)
    max_steps: int | None = _help("end every episode after this many steps, below ETO's per-task limits "
                                  "(none: ETO's limits)", None)
    temperature: float = _help("sampling temperature (self-play samples; exploration is greedy in ETO)", 0.7)
    greedy: bool = _help("greedy exploration, as the paper", True)
    samples: int = _help("episodes per task when exploring in self-play mode", 2)
    max_context: int | None = _help("prompt + reply tokens; older turns are dropped beyond (none: no cap)",
                                    None)
    engine: typing.Literal["continuous", "kv", "plain", "sglang"] = _help(
        "policy engine: continuous (rows join and leave the running batch at any token step; each "
        "episode keeps its KV between turns), kv (a batch per turn, KV kept between turns), plain "
        "(re-encodes every turn) or sglang (GPU nodes; pip install 'fasteto[sglang]')", "continuous")
    dtype: typing.Literal["model", "float32", "bfloat16", "auto"] = _help(
        "continuous engine's weights and KV: model (model.dtype), float32, bfloat16, or auto (bfloat16 where "
        "the CPU has AVX-512 BF16 or AMX, or on CUDA; else model.dtype; the kv and plain engines always run "
        "model.dtype)", "model")
    attention: typing.Literal["auto", "native", "torch"] = _help(
        "continuous engine's decode attention: native (C++ kernel, CPU), torch (SDPA) or auto (native where "
        "its library is built, else torch)", "auto")
    linear: typing.Literal["auto", "onednn", "torch"] = _help(
        "continuous engine's linear layers: onednn (weights packed once per policy, one more copy in "
        "memory; CPU; in float32 its sums differ from torch's in the last bits), torch (F.linear) or auto "
        "(onednn for bfloat16 weights on the CPU, where it is bit-identical to torch; else torch)", "auto")
    forward: typing.Literal["auto", "hf", "lean"] = _help(
        "continuous engine's model forward: lean (Llama family: plain tensor calls over weights gathered "
        "once per policy, q/k/v and gate/up one matmul each), hf (the model's own modules) or auto (lean "
        "for a Llama model with onednn linears, else hf)", "auto")
    cache_tokens: int = _help("tokens of KV the kv engine keeps between turns", 65536)
    sglang_url: str | None = _help("a running SGLang server (started with --skip-tokenizer-init) to use "
                                   "instead of starting one in this process", None)
    sglang_tp: int = _help("tensor-parallel GPUs of the SGLang engine", 1)
    sglang_dp: int = _help("data-parallel replicas of the SGLang engine", 1)
    sglang_memory: float = _help("GPU memory fraction SGLang keeps (weights + KV); training uses the rest",
                                 0.4)


@dataclasses.dataclass
class RunConfig:
    mode: typing.Literal["eto", "self-play", "rft"] = _help("eto, self-play (no expert) or rft", "eto")
    iterations: int = _help("explore → pair → DPO rounds", 1)
    run_dir: str = _help("the run folder; a rerun with the same folder resumes", "runs/default")
    seed: int = _help("seed for sampling tasks, shuffling and generation", 0)
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    envs: EnvsConfig = dataclasses.field(default_factory=EnvsConfig)
    sft: SFTConfig = dataclasses.field(default_factory=SFTConfig)
    dpo: DPOConfig = dataclasses.field(default_factory=DPOConfig)
    explore: ExploreConfig = dataclasses.field(default_factory=ExploreConfig)


# Presets are overrides of the dataclass defaults (which are the paper's hyperparameters).
PRESETS: dict[str, dict[str, Any]] = {
    # Small enough for 2 CPU cores: a few tasks, short replies, one iteration, small batches.
    "default": {
        "envs": {"train_tasks": 4, "test_tasks": 2},
        "sft": {"epochs": 2, "global_batch": 4, "max_length": 2048},
        "dpo": {"epochs": 1, "global_batch": 2, "lr": [5e-6], "max_target": 1536},
        # A smoke test: bf16 decode where the CPU has it (README, Exploration: faster, greedy replies differ
        # from fp32 on some turns); --explore.dtype model evaluates in the model's own dtype.
        "explore": {"max_new_tokens": 48, "concurrency": 8, "max_context": 3072, "max_steps": 15,
                    "dtype": "auto"},
    },
    # A run meant to move the numbers on 2 CPU cores (issue 11), sized from measured rates: ~1 env step/s
    # with 8 episodes in flight, ~200 SFT tokens/s for SmolLM2-135M, ~6 s per ALFWorld expert task.
    # 64 training tasks per environment (~150k expert tokens), 32 of them explored per iteration, 12 tasks
    # per test split; DPO's LR below. Replies up to 80 tokens: the experts' are 27-33 tokens at the median,
    # 68 at most. Measured: 1 h 13 min with --explore.linear onednn at d3606ad (README).
    "small": {
        # Both environments by name: missing ALFWorld data stops the run with the fix, not a quiet skip.
        "envs": {"names": ["sciworld", "alfworld"], "train_tasks": 64, "test_tasks": 12, "explore_tasks": 32},
        "sft": {"epochs": 2, "global_batch": 8, "lr": 5e-4, "max_length": 3072},
        # DPO LR 5e-6, not ETO's ratio (2.5e-5 here): at 2.5e-5 the expert's own log-probs fell 4-6 nats
        # and ScienceWorld lost 18.6 points against SFT; at 5e-6 they held (README, results/small-a28bc3a*).
        "dpo": {"epochs": 1, "global_batch": 4, "lr": [5e-6], "max_target": 1536},
        "explore": {"max_new_tokens": 80, "concurrency": 8, "max_context": 4096, "max_steps": 15},
    },
    # The paper: full splits, its hyperparameters, three iterations; for GPU nodes.
    "paper": {"iterations": 3, "envs": {"train_tasks": None, "test_tasks": None}},
}
