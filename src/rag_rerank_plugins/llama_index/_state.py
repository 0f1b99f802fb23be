"""Copying and pickling the LlamaIndex adapters without touching the caller's object.

LlamaIndex's ``BaseComponent.__getstate__`` drops unpicklable attributes from pydantic's state,
which *is* the object's own ``__dict__``: pickling ``SharedEmbedding(pool=my_pool)`` (an
``IngestionPipeline`` with ``num_workers``, ``multiprocessing``, a cache of components) deleted
``pool`` from the live adapter, and its next call failed with ``AttributeError: ... 'pool'``.
``copy.deepcopy`` (and ``model_copy(deep=True)``) tried to copy the pool's locks and raised.

The pool is a process-wide resource, like a connection: a deep copy shares it, a pickled adapter
leaves it behind (unpickled, it uses the default pool of the process that loads it).
"""

from __future__ import annotations

import logging
import pickle
from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel

__all__ = ["SharedPoolState"]

logger = logging.getLogger(__name__)

#: The field holding the (unpicklable, process-local) pool.
_POOL = "pool"


def _picklable(value: Any) -> bool:
    try:
        pickle.dumps(value)
    except Exception:
        return False
    return True


class SharedPoolState:
    """Mixin for pydantic adapters with a ``pool`` field: deep copies share the pool, pickling
    leaves it (and anything else unpicklable, as LlamaIndex does) out of a *copy* of the state."""

    def __deepcopy__(self, memo: dict[int, Any] | None = None) -> Any:
        memo = {} if memo is None else memo
        pool = self.__dict__.get(_POOL)
        if pool is not None:
            memo.setdefault(id(pool), pool)  # copied as itself: one pool per process
        return super().__deepcopy__(memo)  # type: ignore[misc]

    def __getstate__(self) -> dict[str, Any]:
        assert isinstance(self, BaseModel)
        state = BaseModel.__getstate__(self)  # its dicts are this object's own: copy them
        # None rather than absent: LlamaIndex's __setstate__ falls back to pydantic's, which
        # would leave the field unset (and every call failing) if __init__ refused the state.
        fields = {**state["__dict__"], _POOL: None}
        private = dict(state.get("__pydantic_private__") or {})
        for kind, values in (("attribute", fields), ("private attribute", private)):
            for key in [k for k, v in values.items() if not _picklable(v)]:
                if kind == "attribute" and isinstance(values[key], Mapping):
                    _refuse_unpicklable_options(type(self).__name__, key, values[key])
                logger.warning("Removing unpickleable %s %s", kind, key)
                del values[key]
        return {**state, "__dict__": fields, "__pydantic_private__": private}


def _refuse_unpicklable_options(owner: str, field: str, options: Mapping[str, Any]) -> None:
    """An options field (``model_kwargs``, ``cross_encoder_kwargs``) holding one unpicklable
    value was dropped whole, as LlamaIndex drops a callback manager: the copy then loaded the
    model without the others (``revision``, ``trust_remote_code``) and scored differently, with
    a log line as the only sign. These define the model: refused, naming the value."""
    bad = [key for key, value in options.items() if not _picklable(value)]
    names = ", ".join(f"{field}[{key!r}]" for key in bad) or field
    raise pickle.PicklingError(
        f"Cannot pickle {owner}: {names} cannot be pickled (a lambda or a local function?), and "
        "dropping it would change the model the copy loads. Use a picklable value, such as "
        "torch.nn.Sigmoid() or a module-level function."
    )
