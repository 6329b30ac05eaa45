"""Models: resolving a model spec to a local folder (the embedded default is converted once) and loading."""

from fasteto.models.load import (
    DEFAULT_MODEL,
    ModelLoadError,
    ModelNotFoundError,
    load_model,
    load_tokenizer,
    resolve_model,
)

__all__ = ["DEFAULT_MODEL", "ModelLoadError", "ModelNotFoundError", "load_model", "load_tokenizer",
           "resolve_model"]
