"""Optional OpenTelemetry spans around model calls (extra ``otel``: ``opentelemetry-api``).

:func:`model_span` wraps one rerank or embed call of an adapter (LangChain and LlamaIndex alike,
through :mod:`~rag_rerank_plugins.adapter_base`) or of ``rag-rerank serve`` in a span named
``rag_rerank.rerank`` / ``rag_rerank.embed`` carrying the model, backend, batch size and item
count; a failing call records the exception, ``error.type`` and an ERROR status.

Without ``opentelemetry-api`` installed this is a no-op (the import is tried once). With the API
but no SDK configured, OpenTelemetry's own no-op tracer answers: nothing is recorded and the
attributes are not even built. Configure an SDK ``TracerProvider`` (before or after the first
call) to receive the spans.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from .spec import ModelSpec, redact_urls

__all__ = ["model_span"]

#: The tracer once looked up; False when opentelemetry-api is not installed.
_TRACER: Any = None


def _tracer() -> Any:
    global _TRACER
    if _TRACER is None:
        try:
            from opentelemetry import trace
        except ImportError:
            _TRACER = False
        else:
            from . import __version__

            # A proxy: spans go to whichever provider is configured when they start.
            _TRACER = trace.get_tracer("rag_rerank_plugins", __version__)
    return _TRACER or None


@contextmanager
def model_span(
    operation: str, spec: ModelSpec, *, batch_size: int, items: int, **extra: Any
) -> Iterator[None]:
    """A span ``rag_rerank.<operation>`` around a call of ``spec``'s model on ``items`` inputs;
    exceptions are recorded and re-raised.

    ``extra`` attributes are added as ``rag_rerank.<name>`` (None values are left out).
    """
    tracer = _tracer()
    if tracer is None:
        yield
        return
    with tracer.start_as_current_span(f"rag_rerank.{operation}") as span:
        if span.is_recording():
            attributes = {
                # Redacted as in stats, logs and errors: a remote model's URL may hold a password.
                "rag_rerank.model": redact_urls(spec.model),
                "rag_rerank.backend": spec.backend,
                "rag_rerank.batch_size": batch_size,
                "rag_rerank.items": items,
            }
            attributes.update({f"rag_rerank.{k}": v for k, v in extra.items() if v is not None})
            span.set_attributes(attributes)
        try:
            yield
        except BaseException as exc:
            # start_as_current_span records the exception and sets the ERROR status itself; a
            # cancellation (or a closed coroutine) is no error, and gets no error.type.
            if span.is_recording() and isinstance(exc, Exception):
                span.set_attribute("error.type", type(exc).__qualname__)
            raise
