"""`python -m fasteto.train` end to end: a tiny random model on real ScienceWorld and ALFWorld tasks."""

from __future__ import annotations

import importlib
import json
from types import SimpleNamespace

import pytest
from tiny import byte_tokenizer, tiny_llama

from fasteto.train import main, parse_config, sample
from fasteto.utils.choices import forget_choices

ALF_TRAIN = [
    "look_at_obj_in_light-AlarmClock-None-DeskLamp-302/trial_T20190908_192756_298295",
    "pick_two_obj_and_place-AlarmClock-None-Desk-307/trial_T20190907_013752_725369",
]


def test_presets_files_and_flags_compose(tmp_path):
    (tmp_path / "run.yaml").write_text("iterations: 2\ndpo:\n  beta: [0.2]\n")
    cfg = parse_config(["--preset", "paper", "--config", str(tmp_path / "run.yaml"), "--dpo.loss", "ipo"])
    assert (cfg.iterations, cfg.dpo.beta, cfg.dpo.loss, cfg.envs.train_tasks) == (2, [0.2], "ipo", None)
    with pytest.raises(SystemExit):
        parse_config(["--sft.lrr", "1"])
    with pytest.raises(SystemExit):
        parse_config(["--mode", "ppo"])


def test_small_preset_is_the_sized_run():
    cfg = parse_config(["--preset", "small"])
    assert (cfg.envs.train_tasks, cfg.envs.explore_tasks, cfg.envs.test_tasks) == (64, 32, 12)
    assert cfg.envs.names == ["sciworld", "alfworld"]  # no quiet skip of ALFWorld
    assert (cfg.sft.epochs, cfg.sft.global_batch, cfg.iterations) == (2, 8, 1)
    assert cfg.sft.lr > 2e-5  # a 135M model wants more than the 7B model's ETO rate (measured)
    assert cfg.explore.max_new_tokens >= 68  # the longest expert reply, in SmolLM2 tokens


def test_task_sample_is_seeded_and_in_split_order():
    ids = [str(i) for i in range(10)]
    assert sample(ids, 3, seed=0) == sample(ids, 3, seed=0) and len(sample(ids, 3, seed=0)) == 3
    assert sample(ids, 3, seed=0) == sorted(sample(ids, 3, seed=0), key=ids.index)
    assert sample(ids, None, 0) == ids and sample(ids, 99, 0) == ids


@pytest.fixture()
def tiny_model_dir(tmp_path):
    tokenizer = byte_tokenizer()
    folder = tmp_path / "tiny-model"
    tiny_llama(len(tokenizer), hidden_size=32).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.mark.slow
def test_eto_run_writes_every_artefact_and_resumes(
    tmp_path, tiny_model_dir, alfworld_data, sciworld_env, monkeypatch, capsys
):
    from fasteto.envs.alfworld import split_task_ids as alf_ids
    from fasteto.envs.sciworld import split_task_ids as sw_ids

    monkeypatch.setenv("FASTETO_CACHE", str(tmp_path / "cache"))
    test_ids = [next(t for t in sw_ids(s) if t.startswith("11_")) for s in ("seen", "unseen")]
    test_ids += [alf_ids(alfworld_data, s)[0] for s in ("seen", "unseen")]
    run_dir = tmp_path / "run"
    argv = [
        "--model.name",
        str(tiny_model_dir),
        "--run_dir",
        str(run_dir),
        "--envs.names",
        "sciworld,alfworld",
        "--envs.alfworld_data",
        str(alfworld_data),
        "--envs.train_ids",
        ",".join(["11_0", "21_52", *ALF_TRAIN]),
        "--envs.test_ids",
        ",".join(test_ids),
        "--explore.max_new_tokens",
        "6",
        "--sft.epochs",
        "1",
        "--dpo.epochs",
        "1",
        "--explore.concurrency",
        "2",
        "--dpo.max_prompt",  # the byte tokenizer spends a token per byte; prompts are never cut
        "16384",
    ]
    forget_choices()  # earlier tests in this process made the same auto choices
    assert main(argv) == 0
    out = capsys.readouterr().out
    state = json.loads((run_dir / "state.json").read_text())["done"]
    assert list(state) == [
        "experts",
        "eval-base",
        "sft",
        "eval-sft",
        "explore-1",
        "pairs-1",
        "dpo-1",
        "eval-eto-1",
    ]
    for name in [
        "config.json",
        "versions.json",
        "metrics.jsonl",
        "summary.json",
        "curves.png",
        "experts/sciworld.json",
        "experts/alfworld.json",
        "iter-1/explored_sciworld.json",
        "iter-1/pairs_alfworld.json",
        "iter-1/reference_logps.json",
        "models/sft/config.json",
        "models/dpo-1/config.json",
        "eval/base/sciworld.jsonl",
        "eval/eto-1/alfworld.jsonl",
    ]:
        assert (run_dir / name).exists(), name
    assert [t["id"] for t in json.loads((run_dir / "experts/sciworld.json").read_text())] == ["11_0", "21_52"]
    explored = json.loads((run_dir / "iter-1/explored_alfworld.json").read_text())
    assert [t["id"] for t in explored] == ALF_TRAIN and all(t["reward"] == 0.0 for t in explored)
    assert len(json.loads((run_dir / "iter-1/pairs_sciworld.json").read_text())) == 2  # two losses
    phases = {json.loads(line)["phase"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()}
    assert {"sft", "dpo-1", "eval-base", "eval-sft", "eval-eto-1"} <= phases
    summary = json.loads((run_dir / "summary.json").read_text())
    assert [(r["label"], r["env"], r["split"]) for r in summary["evaluations"]][:2] == [
        ("base", "sciworld", "seen"),
        ("base", "sciworld", "unseen"),
    ]
    assert len(summary["evaluations"]) == 3 * 2 * 2 and "ETO iteration 1" in out
    # per label: each env's splits pooled, then all tasks; each pooled row has its paired differences
    assert [(r["env"], r["split"], r["n"]) for r in summary["pooled"][:3]] == [
        ("sciworld", "all", 2), ("alfworld", "all", 2), ("all", "tasks", 4)]
    assert sum(d["split"] == "tasks" for d in summary["differences"]) == 3 and "| all tasks |" in out
    # auto choices are recorded per phase and printed: the SFT phase ran the fast trainer's backends
    sft_choices = summary["auto_choices"]["sft"]
    assert sft_choices["tree_attention impl (cpu)"]["chosen"] == "varlen_eager"
    assert "fused_token_logprobs impl (cpu)" in sft_choices
    assert "fasteto: tree_attention impl (cpu): auto chose 'varlen_eager'" in out

    assert main(argv) == 0  # a rerun resumes: every phase is done, the same table comes out
    again = capsys.readouterr().out
    assert again.count("done earlier; skipped") == len(state)
    assert json.loads((run_dir / "summary.json").read_text())["evaluations"] == summary["evaluations"]

    assert main([*argv, "--dpo.loss", "ipo"]) == 2  # a different config is refused before any work
    assert "dpo.loss is 'sigmoid' there, 'ipo' here" in capsys.readouterr().err


def test_unknown_task_id_is_refused_before_work(tmp_path, tiny_model_dir, capsys):
    argv = [
        "--model.name",
        str(tiny_model_dir),
        "--run_dir",
        str(tmp_path / "run"),
        "--envs.names",
        "sciworld",
        "--envs.train_ids",
        "11_0,99_1",
    ]
    assert main(argv) == 2
    assert "envs.train_ids: unknown task ids ['99_1']" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_batch_sizes_fit_small_data_and_divide():
    from fasteto.phases import batch_sizes

    assert batch_sizes(100, 64, 8) == (64, 8)
    assert batch_sizes(5, 64, 4) == (5, 1)  # 5 items: one step of 5, micro batches of 1
    assert batch_sizes(6, 64, 4) == (6, 3)
    assert batch_sizes(0, 32, 2) == (1, 1)


def test_bad_cut_option_is_refused_before_work(tmp_path, tiny_model_dir, capsys):
    argv = [
        "--model.name",
        str(tiny_model_dir),
        "--run_dir",
        str(tmp_path / "run"),
        "--envs.names",
        "sciworld",
        "--dpo.max_extra_messages",
        "ten",
    ]
    assert main(argv) == 2
    assert "dpo.max_extra_messages: --max-extra-messages: got 'ten'" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_sglang_engine_without_sglang_or_gpu_is_refused_before_work(tmp_path, tiny_model_dir, capsys):
    import importlib.util

    import torch

    if importlib.util.find_spec("sglang") is not None and torch.cuda.is_available():
        pytest.skip("sglang and a GPU are both here: the engine would start")
    argv = ["--model.name", str(tiny_model_dir), "--run_dir", str(tmp_path / "run"), "--envs.names",
            "sciworld", "--explore.engine", "sglang"]
    assert main(argv) == 2
    assert "explore.engine sglang" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_explore_dtype_with_an_engine_that_has_none_is_refused_before_work(tmp_path, tiny_model_dir, capsys):
    argv = ["--model.name", str(tiny_model_dir), "--run_dir", str(tmp_path / "run"), "--envs.names",
            "sciworld", "--explore.engine", "kv", "--explore.dtype", "bfloat16"]
    assert main(argv) == 2
    assert "explore.dtype bfloat16: only the continuous engine" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_explore_tasks_samples_the_training_tasks_per_iteration():
    from fasteto.phases import EtoLoop

    ids = [str(i) for i in range(10)]
    loop = EtoLoop(parse_config(["--envs.explore_tasks", "3", "--seed", "1"]))
    loop.tasks = {"sciworld": {"train": ids}}
    first, second = loop.explore_ids("sciworld", 1), loop.explore_ids("sciworld", 2)
    assert first == sample(ids, 3, 1001) and second == sample(ids, 3, 1002) and len(first) == 3
    assert first == loop.explore_ids("sciworld", 1)  # a resumed run explores the same tasks
    loop.cfg.envs.explore_tasks = None
    assert loop.explore_ids("sciworld", 1) == ids  # ETO's way: every training task


@pytest.mark.parametrize("option", ["train_tasks", "test_tasks", "explore_tasks"])
def test_task_counts_below_one_are_refused(option):
    from fasteto.phases import EtoLoop

    loop = EtoLoop(parse_config(["--envs.names", "sciworld", f"--envs.{option}", "0"]))
    with pytest.raises(ValueError, match=f"envs.{option}: 0 tasks"):
        loop.prepare()


def test_the_default_preset_decodes_in_bf16_where_it_can_and_other_engines_keep_the_model_dtype():
    from fasteto.phases import EtoLoop

    assert parse_config([]).explore.dtype == "auto"
    assert parse_config(["--preset", "small"]).explore.dtype == "model"
    cfg = parse_config(["--explore.engine", "kv"])
    EtoLoop._check_engine(SimpleNamespace(cfg=cfg))  # auto: no refusal, the kv engine runs model.dtype


@pytest.mark.parametrize("option,value,other_engine,module", [
    ("attention", "native", "kv", "fasteto.ops.decode_attention.native"),
    ("linear", "onednn", "plain", "fasteto.rollout.packed_linear"),
])
def test_explore_backend_is_refused_before_work_where_it_cannot_run(option, value, other_engine, module,
                                                                     tmp_path, tiny_model_dir, capsys,
                                                                     monkeypatch):
    argv = ["--model.name", str(tiny_model_dir), "--run_dir", str(tmp_path / "run"), "--envs.names",
            "sciworld", "--explore.engine", other_engine, f"--explore.{option}", value]
    assert main(argv) == 2
    assert f"explore.{option} {value}: only the continuous engine takes it" in capsys.readouterr().err
    monkeypatch.setattr(importlib.import_module(module), "unavailable", lambda *args: "it is missing here")
    argv[argv.index(other_engine)] = "continuous"
    assert main(argv) == 2
    assert f"explore.{option} {value}" in (err := capsys.readouterr().err) and "it is missing here" in err
    assert not (tmp_path / "run").exists()  # refused before the run folder was made
