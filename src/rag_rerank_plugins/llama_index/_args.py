"""Unknown constructor arguments fail loudly, with a suggestion.

LlamaIndex components are pydantic models, which by default *ignore* unknown keyword arguments:
``SharedRerankPostprocessor(topn=5)`` silently kept the default ``top_n``, and
``SharedEmbedding(query_instruction=...)`` silently embedded without the instruction, while the
LlamaIndex classes they replace raise ``TypeError`` for a typo. The adapters forbid extra fields;
this before-validator runs first so the error names the argument, the closest accepted one and
where backend options go, instead of pydantic's generic "Extra inputs are not permitted".
"""

from __future__ import annotations

import difflib
import functools
from typing import Any

from pydantic import BaseModel

from ..exceptions import ConfigurationError

__all__ = ["accepted_arguments", "check_arguments"]

#: Key LlamaIndex adds to every serialised component (``to_dict``/``to_json``/``model_dump``).
CLASS_NAME_KEY = "class_name"


@functools.cache
def accepted_arguments(cls: type[BaseModel]) -> frozenset[str]:
    """Field names and their validation aliases: every keyword argument ``cls(...)`` accepts.

    Cached per class (fields are fixed once a class exists): adapters are built per request.
    """
    names: set[str] = set()
    for name, field in cls.model_fields.items():
        names.add(name)
        alias = field.validation_alias
        if isinstance(alias, str):
            names.add(alias)
        elif alias is not None and hasattr(alias, "choices"):
            names.update(c for c in alias.choices if isinstance(c, str))
        if field.alias:
            names.add(field.alias)
    return frozenset(names)


def check_arguments(
    cls: type[BaseModel], data: Any, stock_names: frozenset[str] = frozenset()
) -> Any:
    """``data`` without LlamaIndex's ``class_name`` key; a ConfigurationError for any unknown key.

    ``stock_names`` are the stock class's arguments that were already translated into fields:
    accepted too, so they are suggested for a typo and listed in the message.

    ``class_name`` is accepted (and dropped) when it names ``cls``, so a dict from ``to_dict()``
    or ``model_dump()`` can be passed back as keyword arguments; naming another class is an error
    (the dict describes a different component).
    """
    if not isinstance(data, dict):
        return data
    class_name = getattr(cls, "class_name", None)
    own_name = class_name() if callable(class_name) else cls.__name__
    if CLASS_NAME_KEY in data:
        if data[CLASS_NAME_KEY] != own_name:
            raise ConfigurationError(
                f"This is a serialised {data[CLASS_NAME_KEY]!r}, not a {own_name!r}: build it "
                f"with the class named by its 'class_name' key."
            )
        data = {k: v for k, v in data.items() if k != CLASS_NAME_KEY}
    accepted = accepted_arguments(cls) | stock_names
    unknown = sorted(key for key in data if key not in accepted)
    if unknown:
        hints = []
        for key in unknown:
            close = difflib.get_close_matches(str(key), sorted(accepted), n=1, cutoff=0.6)
            hints.append(f"{key!r} (did you mean {close[0]!r}?)" if close else repr(key))
        raise ConfigurationError(
            f"{own_name} got unknown argument(s) {', '.join(hints)}. It accepts: "
            f"{', '.join(sorted(accepted))}. Options for loading the model (revision, ...) go in "
            "model_kwargs={...}."
        )
    return data
