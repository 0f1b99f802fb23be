"""Hugging Face text-embeddings-inference: ``POST /rerank`` and ``POST /embed`` (the default
protocol, ``protocol="tei"``; ``rag-rerank serve`` speaks it too).

Rerank answers ``[{index, score}]``, embed a bare list of vectors. ``truncate`` asks the server
to cut long inputs to the model's ``max_length`` (``truncation_direction="left"`` drops their
start instead of their end: sent as TEI's ``"truncation_direction": "Left"``);
``query_prompt_name`` is sent as TEI's ``prompt_name`` with queries.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .base import Call, CallSettings, Protocol, scores_by_index, vector_list

__all__ = ["TEIProtocol"]


def _direction(payload: dict[str, Any], settings: CallSettings) -> None:
    # Only when it is not TEI's default, so requests to older servers stay as they were.
    if settings.truncate and settings.truncation_direction == "left":
        payload["truncation_direction"] = "Left"


class TEIProtocol(Protocol):
    """text-embeddings-inference's routes and shapes."""

    def rerank(self, settings: CallSettings, query: str, texts: Sequence[str]) -> Call:
        n = len(texts)
        payload = {
            "query": query,
            "texts": list(texts),
            "raw_scores": False,
            "return_text": False,
            "truncate": settings.truncate,
        }
        _direction(payload, settings)
        return Call(
            "/rerank",
            payload,
            lambda body: scores_by_index(body, n, "score", "a list of {index, score}"),
        )

    def embed(
        self, settings: CallSettings, texts: Sequence[str], *, is_query: bool, normalize: bool
    ) -> Call:
        n = len(texts)
        payload: dict[str, Any] = {
            "inputs": list(texts),
            "normalize": normalize,
            "truncate": settings.truncate,
        }
        _direction(payload, settings)
        if is_query and settings.query_prompt_name:
            payload["prompt_name"] = settings.query_prompt_name
        return Call("/embed", payload, lambda body: vector_list(body, n))
