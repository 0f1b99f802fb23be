"""What the FlagEmbedding backends share (:mod:`.flag` and :mod:`.flag_llm`).

Both load with FlagEmbedding and then run its pre-processing themselves (see :mod:`.flag` for
why), so both need the same import (with the ``flag`` extra named when it is missing), the same
default truncation length and the transformers-version-proof tokenizer helpers FlagEmbedding
uses. FlagEmbedding itself is imported only inside these functions.
"""

from __future__ import annotations

from typing import Any

from ._torch_common import import_optional

__all__ = ["FLAG_DEFAULT_MAX_LENGTH", "import_flag", "tokenizer_helpers"]

#: FlagEmbedding's own default when ``max_length`` is not given.
FLAG_DEFAULT_MAX_LENGTH = 512


def import_flag(backend: str) -> Any:
    """The ``FlagEmbedding`` module (and torch), or MissingDependencyError naming the extra."""
    import_optional("torch", "torch", "flag", f"The {backend!r} backend")
    return import_optional("FlagEmbedding", "FlagEmbedding", "flag", f"The {backend!r} backend")


def tokenizer_helpers() -> tuple[Any, Any]:
    """FlagEmbedding's transformers-v4/v5 compatible ``prepare_for_model`` and ``pad``."""
    try:
        from FlagEmbedding.utils.tokenizer_compat import (
            pad_with_compat,
            prepare_for_model_compat,
        )
    except ImportError:  # FlagEmbedding < 1.4: transformers 4 only, the tokenizer methods exist

        def prepare_for_model_compat(tokenizer: Any, first: Any, second: Any, **kw: Any) -> Any:
            return tokenizer.prepare_for_model(first, second, **kw)

        def pad_with_compat(tokenizer: Any, encoded: Any, **kw: Any) -> Any:
            return tokenizer.pad(encoded, **kw)

    return prepare_for_model_compat, pad_with_compat
