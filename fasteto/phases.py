"""The phases of an ETO run, each resumable: experts, evaluation, SFT, exploration, pairs, DPO.

``EtoLoop.run`` reads like the algorithm in ``fasteto/train.py``; each ``_phase`` call skips a phase the
run folder has marked done and returns its recorded result.
"""

from __future__ import annotations

import dataclasses
import gc
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import torch

from fasteto.config import RunConfig, TrainerOptions
from fasteto.data.formats import read_trajectories, write_pairs, write_trajectories
from fasteto.data.pairs import (
    DEFAULT_MAX_EXTRA_MESSAGES,
    build_pairs,
    build_rft_set,
    build_self_play_pairs,
    parse_max_extra,
)
from fasteto.data.types import Pair, Trajectory
from fasteto.run import RunFolder
from fasteto.utils.choices import auto_choices


class EtoLoop:
    def __init__(self, cfg: RunConfig):
        self.cfg = cfg
        self.run_folder: RunFolder | None = None  # given to run(), after prepare() found nothing wrong
        self.envs: list[str] = []
        self.tasks: dict[str, dict[str, list[str]]] = {}  # env -> split -> task ids
        self.evaluations: list[dict[str, Any]] = []

    # Before any work: everything that can be wrong is checked here ------------------------------

    def prepare(self) -> None:
        from fasteto.models.load import load_tokenizer, resolve_model
        from fasteto.train import sample

        self.envs = self._choose_envs()
        e = self.cfg.envs
        for name in ("train_tasks", "test_tasks", "explore_tasks"):
            if (n := getattr(e, name)) is not None and n < 1:
                raise ValueError(f"envs.{name}: {n} tasks; give 1 or more, or none for all of them")
        split_ids = {env: self._split_ids(env) for env in self.envs}
        for name, given in (("envs.train_ids", e.train_ids), ("envs.test_ids", e.test_ids)):
            splits = ["train"] if name == "envs.train_ids" else e.splits
            known = {t for env in self.envs for s in splits for t in split_ids[env][s]}
            if unknown := [t for t in given if t not in known]:
                raise ValueError(
                    f"{name}: unknown task ids {unknown[:5]}; they must be in the "
                    f"{'/'.join(splits)} split(s) of {', '.join(self.envs)}"
                )
        for env in self.envs:
            ids = split_ids[env]
            self.tasks[env] = {
                s: ([t for t in ids[s] if t in given] if given else sample(ids[s], n, self.cfg.seed))
                for s, given, n in [("train", e.train_ids, e.train_tasks)]
                + [(s, e.test_ids, e.test_tasks) for s in e.splits]
            }
        self.base_model = resolve_model(self.cfg.model.name)
        self.tokenizer = load_tokenizer(self.base_model)
        self.dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[self.cfg.model.dtype]
        try:
            for env in self.envs:
                self._max_extra(env)
        except ValueError as exc:
            raise ValueError(f"dpo.max_extra_messages: {exc}") from None
        self._check_engine()

    def _check_engine(self) -> None:
        """An engine that cannot start is an error now, before any phase runs."""
        import importlib.util

        from fasteto.rollout.sglang_engine import INSTALL_HINT

        opts = self.cfg.explore
        if opts.dtype not in ("model", "auto") and opts.engine != "continuous":
            raise ValueError(f"explore.dtype {opts.dtype}: only the continuous engine takes a dtype of its "
                             f"own; with --explore.engine {opts.engine} set model.dtype instead")
        for option in ("attention", "linear", "forward"):
            if getattr(opts, option) != "auto" and opts.engine != "continuous":
                raise ValueError(f"explore.{option} {getattr(opts, option)}: only the continuous engine "
                                 "takes it")
        if opts.engine == "continuous":
            from fasteto.ops.decode_attention.api import resolve

            try:  # an explicit native without its library stops here
                resolve(opts.attention, torch.device("cpu"))
            except RuntimeError as exc:
                raise ValueError(f"explore.attention {opts.attention}: {exc}; or pass --explore.attention "
                                 "auto") from None
            from fasteto.rollout import packed_linear

            reason = packed_linear.unavailable(torch.float32, torch.device("cpu"))
            if opts.linear == "onednn" and reason is not None:
                raise ValueError(f"explore.linear onednn cannot run: {reason}; pass --explore.linear auto or "
                                 "torch")
        if self.cfg.explore.engine == "sglang" and not self.cfg.explore.sglang_url:
            if importlib.util.find_spec("sglang") is None:
                raise ValueError(f"explore.engine sglang: the sglang package is missing; {INSTALL_HINT}, or "
                                 "pass --explore.sglang_url of a running server")
            if not torch.cuda.is_available():
                raise ValueError("explore.engine sglang needs a CUDA GPU; on this machine use "
                                 "--explore.engine continuous")

    def _choose_envs(self) -> list[str]:
        from fasteto.envs import EnvSetupError
        from fasteto.envs.alfworld import find_data

        names = self.cfg.envs.names
        for name in names:
            if name not in ("sciworld", "alfworld"):
                raise ValueError(f"envs.names: unknown environment {name!r}; choose sciworld and/or alfworld")
        if "alfworld" in names:
            find_data(self.cfg.envs.alfworld_data)  # asked for explicitly: missing data is an error
            return list(names)
        if names:
            return list(names)
        try:
            find_data(self.cfg.envs.alfworld_data)
        except EnvSetupError as exc:
            print(f"ALFWorld skipped (not asked for explicitly): {exc}\nGoing on with ScienceWorld alone.")
            return ["sciworld"]
        return ["sciworld", "alfworld"]

    def _split_ids(self, env: str) -> dict[str, list[str]]:
        if env == "sciworld":
            from fasteto.envs.sciworld import split_task_ids

            return {s: split_task_ids(s) for s in ["train", *self.cfg.envs.splits]}
        from fasteto.envs.alfworld import find_data, split_task_ids

        data = find_data(self.cfg.envs.alfworld_data)
        return {s: list(split_task_ids(data, s)) for s in ["train", *self.cfg.envs.splits]}

    # The algorithm ---------------------------------------------------------------------------------

    def run(self, run_folder: RunFolder) -> None:
        self.run_folder = run_folder
        cfg = self.cfg
        experts = self._phase("experts", self._experts) if cfg.mode != "self-play" else {}
        self._evaluate("base", self.base_model)
        policy = self.base_model
        if cfg.mode != "self-play":
            policy = Path(self._phase("sft", lambda: self._sft("sft", self._expert_items(experts))))
            self._evaluate("SFT", policy)
        for k in range(1, cfg.iterations + 1):
            explored = self._phase(f"explore-{k}", partial(self._explore, k, policy))
            if cfg.mode == "rft":
                items = [
                    t
                    for e in self.envs
                    for t in build_rft_set(self._expert_items(experts, e), self._read(explored[e]))
                ]
                policy = Path(self._phase(f"rft-{k}", partial(self._sft, f"rft-{k}", items, policy)))
            else:
                pairs = self._phase(f"pairs-{k}", partial(self._pairs, k, experts, explored))
                policy = Path(self._phase(f"dpo-{k}", partial(self._dpo, k, policy, pairs)))
            self._evaluate(f"{'RFT' if cfg.mode == 'rft' else 'ETO'} iteration {k}", policy)
        self._finish()

    # Phases ----------------------------------------------------------------------------------------

    def _phase(self, name: str, fn: Callable[[], Any]) -> Any:
        if self.run_folder.done(name):
            print(f"[{name}] done earlier; skipped")
            return self.run_folder.result(name)
        print(f"[{name}]")
        start = time.perf_counter()
        result = fn()
        seconds = time.perf_counter() - start
        self.run_folder.mark(name, result)
        self.run_folder.log({"phase": name, "phase_seconds": round(seconds, 1),
                             "auto_choices": auto_choices()})
        print(f"[{name}] finished in {seconds:.0f} s")
        return result

    def _experts(self) -> dict[str, str]:
        from fasteto.rollout.expert import make_experts

        files = {}
        for env in self.envs:
            report = make_experts(
                env, "train", task_ids=self.tasks[env]["train"], env_kwargs=self._env_kwargs(env)
            )
            print(report.summary())
            path = self.run_folder.file("experts", f"{env}.json")
            write_trajectories(path, report.trajectories, "sft")
            files[env] = str(path)
        return files

    def _expert_items(self, experts: dict[str, str], env: str | None = None) -> list[Trajectory]:
        envs = [env] if env else self.envs
        return [t for e in envs for t in read_trajectories(experts[e], "sft")]

    def _read(self, path: str) -> list[Trajectory]:
        return read_trajectories(path, "explored")

    def _evaluate(self, label: str, policy: Path | str) -> None:
        from fasteto.report import with_intervals
        from fasteto.rollout.engine import GenerationConfig
        from fasteto.rollout.explore import ExploreJob, explore_many, summarise

        def work() -> list[dict[str, Any]]:
            # Every split of every environment in one call: all the episodes are in flight together.
            splits = self.cfg.envs.splits
            jobs = [ExploreJob(self._env_factory(env), [t for s in splits for t in self.tasks[env][s]],
                               self.run_folder.file("eval", _slug(label), f"{env}.jsonl"),
                               max_steps=self.cfg.explore.max_steps)
                    for env in self.envs]
            gen = GenerationConfig(max_new_tokens=self.cfg.explore.max_new_tokens)
            reports = explore_many(jobs, self._engine(policy), gen, self.cfg.explore.concurrency)
            rows = []
            for env, report in zip(self.envs, reports, strict=True):
                by_id = {t.key: t for t in report.trajectories}
                for split in splits:
                    result = summarise([by_id[str(t)] for t in self.tasks[env][split]])
                    # The per-task rewards stay in the row: intervals and paired comparisons need them.
                    rows.append(with_intervals({"label": label, "env": env, "split": split,
                                                **dataclasses.asdict(result)}))
                    logged = {k: v for k, v in rows[-1].items() if k != "rewards"}  # metrics stay small
                    self.run_folder.log({"phase": f"eval-{_slug(label)}", **logged})
            return rows

        self.evaluations += self._phase(f"eval-{_slug(label)}", work)

    def _explore(self, k: int, policy: Path | str) -> dict[str, str]:
        from fasteto.rollout.engine import GenerationConfig
        from fasteto.rollout.explore import ExploreJob, explore_many

        self_play = self.cfg.mode == "self-play"
        gen = GenerationConfig(
            max_new_tokens=self.cfg.explore.max_new_tokens,
            greedy=self.cfg.explore.greedy and not self_play,
            temperature=self.cfg.explore.temperature,
            seed=self.cfg.seed,
        )
        samples = self.cfg.explore.samples if self_play else 1
        jobs = [ExploreJob(self._env_factory(env), self.explore_ids(env, k),
                           self.run_folder.file(f"iter-{k}", f"explored_{env}.jsonl"), samples,
                           self.cfg.explore.max_steps)
                for env in self.envs]
        reports = explore_many(jobs, self._engine(policy), gen, self.cfg.explore.concurrency)
        files = {}
        for env, report in zip(self.envs, reports, strict=True):
            print(f"{env}: {report.summary()}")
            path = self.run_folder.file(f"iter-{k}", f"explored_{env}.json")
            write_trajectories(path, report.trajectories, "explored")
            files[env] = str(path)
        return files

    def explore_ids(self, env: str, k: int) -> list[str]:
        """The training tasks iteration ``k`` explores in ``env``: all, or a sample seeded by the run's
        seed and ``k`` (so each iteration sees other tasks, and a resumed run the same ones)."""
        from fasteto.train import sample

        return sample(self.tasks[env]["train"], self.cfg.envs.explore_tasks, self.cfg.seed * 1000 + k)

    def _pairs(self, k: int, experts: dict[str, str], explored: dict[str, str]) -> dict[str, Any]:
        out = {}
        for env in self.envs:
            if self.cfg.mode == "self-play":
                pairs, stats = build_self_play_pairs(self._read(explored[env]))
            else:
                pairs, stats = build_pairs(
                    self._expert_items(experts, env), self._read(explored[env]), self._max_extra(env)
                )
            print(f"{env}: {stats.summary()}")
            path = self.run_folder.file(f"iter-{k}", f"pairs_{env}.json")
            write_pairs(path, pairs)
            out[env] = {"file": str(path), "stats": dataclasses.asdict(stats)}
        return out

    def _max_extra(self, env: str) -> int | None:
        value = self.cfg.dpo.max_extra_messages
        return DEFAULT_MAX_EXTRA_MESSAGES[env] if value == "auto" else parse_max_extra(value)

    def _sft(self, name: str, items: list[Trajectory], start: Path | str | None = None) -> str:
        from fasteto.data.tokenize import tokenize_trajectories
        from fasteto.trainer import TrainConfig, latest_checkpoint, train_sft

        seqs, dropped = tokenize_trajectories(self.tokenizer, items, self.cfg.sft.max_length)
        print(f"{len(seqs)} sequences ({dropped} dropped: no model token left after truncation)")
        s = self.cfg.sft
        tcfg = TrainConfig.sft(s, **self._stage_fields(len(seqs), s))
        model = self._lora(self._load(start or self.base_model).train(), s)
        checkpoints = self.run_folder.folder("checkpoints", name)
        train_sft(
            model,
            seqs,
            tcfg,
            on_step=lambda m: self.run_folder.log({"phase": name, **m}),
            checkpoint_dir=checkpoints,
            resume_from=latest_checkpoint(checkpoints),
        )
        return self._save(model, name)

    def _dpo(self, k: int, policy: Path | str, pairs_info: dict[str, Any]) -> str:
        from fasteto.data.formats import read_pairs
        from fasteto.data.tokenize import tokenize_pairs
        from fasteto.trainer import TrainConfig, latest_checkpoint, load_reference, save_reference, train_dpo

        pairs: list[Pair] = [p for env in self.envs for p in read_pairs(pairs_info[env]["file"])]
        d = self.cfg.dpo
        tokens, dropped = tokenize_pairs(self.tokenizer, pairs, d.max_prompt, d.max_target)
        print(f"{len(tokens)} pairs, {sum(dropped.values())} dropped"
              + "".join(f"\n  dropped: {n} x {why}" for why, n in dropped.items()))
        if not tokens:
            print("no pairs: the policy is kept as it is for this iteration")
            return str(policy)
        model = self._load(policy)
        ref_file = self.run_folder.file(f"iter-{k}", "reference_logps.json")
        if not ref_file.exists():  # the reference is the policy at the start of the iteration
            save_reference(ref_file, self._reference_logps(model, tokens), tokens)
        ref = load_reference(ref_file, tokens)
        # ETO's schedule: iteration 1 has its own lr and beta, later iterations share the last ones.
        tcfg = TrainConfig.dpo(k, d, **self._stage_fields(len(tokens), d))
        checkpoints = self.run_folder.folder("checkpoints", f"dpo-{k}")
        model = self._lora(model.train(), d)
        train_dpo(
            model,
            tokens,
            ref,
            tcfg,
            on_step=lambda m: self.run_folder.log({"phase": f"dpo-{k}", **m}),
            checkpoint_dir=checkpoints,
            resume_from=latest_checkpoint(checkpoints),
        )
        return self._save(model, f"dpo-{k}")

    def _finish(self) -> None:
        from fasteto.report import INTERVALS, differences, plot_run, pooled, read_metrics, report_markdown
        from fasteto.utils.io import atomic_write_json

        metrics = read_metrics(self.run_folder.path / "metrics.jsonl")
        pooled_rows = pooled(self.evaluations)
        summary = {
            "config": self.run_folder.config,
            "envs": self.envs,
            "tasks": {e: {s: len(ids) for s, ids in splits.items()} for e, splits in self.tasks.items()},
            "evaluations": self.evaluations,
            # Each method's tasks pooled per environment and over all environments (tighter intervals).
            "pooled": pooled_rows,
            # Each method minus the previous one and minus the first, paired on the same tasks.
            "differences": differences(self.evaluations + pooled_rows),
            "intervals": INTERVALS,
            # Wall time of each phase as it ran (a resumed phase keeps its first, finished run's time).
            "phase_seconds": {r["phase"]: r["phase_seconds"] for r in metrics if "phase_seconds" in r},
            # What every auto option resolved to, as each phase ran (backends, dtypes; with the reason).
            "auto_choices": {r["phase"]: r["auto_choices"] for r in metrics if "auto_choices" in r},
        }
        atomic_write_json(self.run_folder.path / "summary.json", summary)
        plot_run(self.run_folder.path / "metrics.jsonl", summary, self.run_folder.path / "curves.png")
        print("\n" + report_markdown(summary))

    # Helpers ---------------------------------------------------------------------------------------

    def _env_kwargs(self, env: str) -> dict[str, Any]:
        return {"data": self.cfg.envs.alfworld_data} if env == "alfworld" else {}

    def _env_factory(self, env: str):
        """What the explorer calls to open one environment: in its own process when the environment
        cannot step in threads (ALFWorld) and several episodes are in flight."""
        from fasteto.envs import env_class, make_env
        from fasteto.rollout.env_process import ProcessEnv

        factory = partial(make_env, env, **self._env_kwargs(env))
        if env_class(env).parallel_safe or self.cfg.explore.concurrency == 1:
            return factory
        return partial(ProcessEnv, factory)

    def _stage_fields(self, n: int, options: TrainerOptions) -> dict[str, Any]:
        """What a stage over ``n`` items takes from the run rather than its options: batch sizes that
        fit ``n``, the seed and the pad id."""
        size, micro = batch_sizes(n, options.global_batch, options.micro_batch)
        return {"global_batch": size, "micro_batch": micro, "seed": self.cfg.seed, "pad_id": self._pad_id()}

    def _lora(self, model, options: TrainerOptions):
        """``model`` with LoRA adapters when ``options.lora_rank`` > 0 (seeded: A's draw repeats); saving
        it writes the merged weights, so the next phase loads a plain model."""
        if options.lora_rank <= 0:
            return model
        from fasteto.trainer import apply_lora

        torch.manual_seed(self.cfg.seed)
        return apply_lora(model, options.lora_rank, options.lora_alpha, options.lora_dropout,
                          options.lora_targets)

    def _reference_logps(self, model, tokens) -> dict[int, tuple[float, float]]:
        """The DPO reference pass, by the same trainer as the training (packed for "fast")."""
        from fasteto.trainer import reference_logps, reference_logps_packed

        d = self.cfg.dpo
        if d.trainer == "fast":
            return reference_logps_packed(model, tokens, d.token_budget, attn_impl=d.attn_impl,
                                          logprob_impl=d.logprob_impl)
        return reference_logps(model, tokens, self._pad_id(), d.micro_batch)

    def _pad_id(self) -> int:
        return self.tokenizer.pad_token_id

    def _load(self, path: Path | str, dtype: torch.dtype | None = None):
        from fasteto.models.load import load_model

        gc.collect()
        return load_model(path, dtype=dtype or self.dtype)

    def _engine(self, policy: Path | str):
        """The policy engine for a phase. The transformers engines load ``policy`` afresh; the SGLang
        engine is started once and loads each new policy into the running server."""
        from fasteto.rollout.continuous import ContinuousEngine, engine_dtype
        from fasteto.rollout.engine import TransformersEngine
        from fasteto.rollout.kv_engine import KVCacheEngine
        from fasteto.utils.choices import record_choice

        opts = self.cfg.explore
        if opts.engine == "sglang":
            return self._sglang_engine(str(policy))
        if opts.engine == "continuous":
            dtype = engine_dtype(opts.dtype, self.dtype)
            return ContinuousEngine(self._load(policy, dtype), self.tokenizer, slots=opts.concurrency,
                                    max_context=opts.max_context, attention=opts.attention,
                                    linear=opts.linear, forward=opts.forward)
        common = {"batch_size": opts.concurrency, "max_context": opts.max_context}
        if opts.dtype == "auto":
            record_choice("explore.dtype", "model", f"the {opts.engine} engine runs the model's dtype")
        if opts.engine == "kv":
            return KVCacheEngine(self._load(policy), self.tokenizer, cache_tokens=opts.cache_tokens, **common)
        return TransformersEngine(self._load(policy), self.tokenizer, **common)

    def _sglang_engine(self, policy: str):
        from fasteto.rollout.sglang_engine import SGLangEngine

        opts = self.cfg.explore
        engine = getattr(self, "_sglang", None)
        if engine is None:
            if opts.sglang_url:
                engine = SGLangEngine.server(opts.sglang_url, self.tokenizer, opts.max_context)
                engine.load_policy(policy)
            else:
                engine = SGLangEngine.offline(
                    policy, self.tokenizer, opts.max_context, tp_size=opts.sglang_tp, dp_size=opts.sglang_dp,
                    mem_fraction_static=opts.sglang_memory)
            self._sglang, self._sglang_policy = engine, policy
        elif self._sglang_policy != policy:
            engine.load_policy(policy)
            self._sglang_policy = policy
        return engine

    def _save(self, model, name: str) -> str:
        from fasteto.trainer import save_checkpoint

        path = self.run_folder.path / "models" / name
        save_checkpoint(model, path, tokenizer=self.tokenizer)
        return str(path)


def batch_sizes(n: int, global_batch: int, micro_batch: int) -> tuple[int, int]:
    """(global, micro) batch for ``n`` items: the global batch at most ``n``, the micro batch the largest
    divisor of it up to ``micro_batch`` (gradient accumulation needs it to divide the global batch)."""
    size = max(1, min(global_batch, n))
    return size, max(m for m in range(1, min(micro_batch, size) + 1) if size % m == 0)


def _slug(label: str) -> str:
    return label.lower().replace(" iteration ", "-").replace(" ", "-")
