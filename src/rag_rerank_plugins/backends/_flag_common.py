"""What the FlagEmbedding backends share (:mod:`.flag` and :mod:`.flag_llm`).

Both load with FlagEmbedding and then run its pre-processing themselves (see :mod:`.flag` for
why), so both need the same import (with the ``flag`` extra named when it is missing), the same
default truncation length and the transformers-version-proof tokenizer helpers FlagEmbedding
uses. FlagEmbedding itself is imported only inside these functions.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..exceptions import ConfigurationError
from ._torch_common import import_optional, position_table_limit, warn_past_positions

__all__ = [
    "FLAG_DEFAULT_MAX_LENGTH",
    "cap_max_length",
    "check_preprocessing_options",
    "import_flag",
    "instruction_tokens",
    "tokenizer_helpers",
    "unescape_format",
]


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


#: FlagEmbedding's pre-processing options checked by :func:`check_preprocessing_options`: the
#: rerankers' query and passage instructions, and BGEM3FlagModel's.
_INSTRUCTIONS = ("query_instruction_for_rerank", "passage_instruction_for_rerank")
M3_INSTRUCTIONS = ("query_instruction_for_retrieval", "passage_instruction_for_retrieval")
_FORMATS = ("query_instruction_format", "passage_instruction_format")
#: BGEM3FlagModel's dense pooling methods (another raised NotImplementedError per request).
M3_POOLING = ("cls", "mean", "last_token")


def unescape_format(fmt: str) -> str:
    """FlagEmbedding's reading of instruction formats: a literal ``\\n`` means a newline."""
    return fmt.replace("\\n", "\n") if "\\n" in fmt else fmt


def check_preprocessing_options(
    options: Mapping[str, Any],
    default_instructions: tuple[str | None, str | None] = (None, None),
    *,
    instructions: tuple[str, str] = _INSTRUCTIONS,
) -> None:
    """ConfigurationError for a FlagEmbedding pre-processing option that would fail, or silently
    misbehave, only once texts arrive.

    Why: FlagEmbedding reads these options per call, so a bad one surfaced as an error in every
    request (``query_instruction_format="{q}{}"``: KeyError; ``query_max_length="64"``:
    TypeError) or a load error about "loading the model" (``prompt=5``), and a format without a
    second ``{}`` dropped the text itself (``"{}".format("A: ", query)`` is ``"A: "``), so every
    pair scored the same. Checked once, at load, with the option named. A format is checked
    only where an instruction uses it (``default_instructions``: the class's query and passage
    defaults), as FlagEmbedding ignores it otherwise. ``instructions``: the option names of the
    query and passage instructions (the rerankers', or :data:`M3_INSTRUCTIONS`).
    """
    for name in (*instructions, "prompt"):
        value = options.get(name)
        if value is not None and not isinstance(value, str):
            raise ConfigurationError(
                f"{name}={value!r}: give a string (or None for none / the default), not "
                f"{type(value).__name__}."
            )
    for name, instruction, default in zip(
        _FORMATS, instructions, default_instructions, strict=True
    ):
        fmt = options.get(name)
        if fmt is None or options.get(instruction, default) is None:
            continue
        if not isinstance(fmt, str):
            raise ConfigurationError(f"{name}={fmt!r}: give a format string such as '{{}}{{}}'.")
        try:
            filled = unescape_format(fmt).format("\x00instruction", "\x00text")
        except (AttributeError, IndexError, KeyError, TypeError, ValueError) as exc:
            raise ConfigurationError(
                f"{name}={fmt!r} is not a format with two positional slots, instruction then "
                f"text, such as '{{}}{{}}' or '{{}}\\n{{}}' ({type(exc).__name__}: {exc})."
            ) from exc
        if "\x00text" not in filled:
            raise ConfigurationError(
                f"{name}={fmt!r} has no slot for the text (the second '{{}}'): every text would "
                "be replaced by the instruction alone. Use e.g. '{}{}'."
            )
    qmax = options.get("query_max_length")
    if qmax is not None and (isinstance(qmax, bool) or not isinstance(qmax, int) or qmax <= 0):
        raise ConfigurationError(
            f"query_max_length={qmax!r}: give a positive int (tokens kept of each query), or "
            "leave it unset for 3/4 of max_length."
        )


def instruction_tokens(tokenizer: Any, instruction: str | None, fmt: str) -> int:
    """Tokens an instruction adds to a text (0 without one): what long-document windows must
    leave room for, or FlagEmbedding's truncation cuts each window's tail."""
    if instruction is None:
        return 0
    text = unescape_format(fmt).format(instruction, "")
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def cap_max_length(model: Any, max_length: int, label: str) -> int:
    """``max_length``, capped at what the model's learned position table holds (with a warning),
    as the ``cross-encoder`` backend does (``_torch_common.cap_to_positions``).

    Why: FlagEmbedding truncates at ``max_length`` whatever the model holds, so
    ``max_length=1024`` on a 512-position encoder made every pass holding a long text fail deep
    in torch ("The size of tensor a (1024) must match ... (512)"), failing the requests batched
    with it too. Rotary models (no table) are left alone."""
    limit = position_table_limit(model)
    if limit is None or limit <= 0 or max_length <= limit:
        return max_length
    warn_past_positions(max_length, limit, label)
    return limit
