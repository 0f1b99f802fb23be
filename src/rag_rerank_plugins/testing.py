"""Test doubles and model builders for users' own test suites (and ours).

Like httpx's MockTransport: deterministic, dependency-free backends that go through the real
pool, so a test of your RAG pipeline exercises the same code paths as production without torch
or weights:

* ``backend="fake-reranker"``: score = share of query words found in the passage (0..1).
* ``backend="fake-embedder"``: hashed bag-of-words vectors, unit length, ``dim`` option (64).

Both accept ``delay_ms`` (sleep per call) to simulate a slow model. ``build_cross_encoder``
writes a tiny random-weight BERT cross-encoder to disk, for testing the real loading code
offline; ``build_cross_encoder_from_encoder`` one with the packaged MiniLM's real encoder weights
and a seeded head, whose activations have realistic ranges (for dtype and quantization tests).
"""

from __future__ import annotations

import hashlib
import math
import re
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from .backends.base import EmbedderModel, RerankerModel
from .spec import ModelSpec

if TYPE_CHECKING:
    from .pool import ModelPool

__all__ = [
    "FakeEmbedder",
    "FakeReranker",
    "build_cross_encoder",
    "build_cross_encoder_from_encoder",
    "fake_embedder_spec",
    "fake_reranker_spec",
]

_WORD = re.compile(r"\w+", re.UNICODE)


def _words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


class FakeReranker(RerankerModel):
    thread_safe = True

    def __init__(self, delay_ms: float = 0.0) -> None:
        self.delay_ms = delay_ms

    def score_pairs(self, pairs: Sequence[tuple[str, str]], batch_size: int) -> list[float]:
        if self.delay_ms:
            time.sleep(self.delay_ms / 1000)
        scores = []
        for query, passage in pairs:
            q = set(_words(query))
            p = set(_words(passage))
            scores.append(len(q & p) / len(q) if q else 0.0)
        return scores


class FakeEmbedder(EmbedderModel):
    thread_safe = True

    def __init__(self, dim: int = 64, delay_ms: float = 0.0) -> None:
        self._dim = dim
        self.delay_ms = delay_ms

    @property
    def dimension(self) -> int:
        return self._dim

    def _vector(self, text: str) -> list[float]:
        vec = [0.0] * self._dim
        for word in _words(text):
            digest = hashlib.blake2b(word.encode("utf-8", "surrogatepass"), digest_size=8).digest()
            bucket = int.from_bytes(digest[:4], "little") % self._dim
            vec[bucket] += 1.0 if digest[4] & 1 else -1.0
        norm = math.sqrt(sum(v * v for v in vec))
        return [v / norm for v in vec] if norm else vec

    def embed(
        self,
        texts: Sequence[str],
        *,
        batch_size: int,
        is_query: bool,
        normalize: bool = False,
        prompt: str | None = None,
    ) -> list[list[float]]:
        if self.delay_ms:
            time.sleep(self.delay_ms / 1000)
        prefix = prompt or ""  # no prompts of its own: a given one goes in front of each text
        return [self._vector(prefix + t) for t in texts]


def load_fake_reranker(spec: ModelSpec, pool: ModelPool) -> FakeReranker:
    return FakeReranker(delay_ms=float(spec.option("delay_ms", 0.0)))


def load_fake_embedder(spec: ModelSpec, pool: ModelPool) -> FakeEmbedder:
    return FakeEmbedder(
        dim=int(spec.option("dim", 64)), delay_ms=float(spec.option("delay_ms", 0.0))
    )


def fake_reranker_spec(name: str = "fake", **options: object) -> ModelSpec:
    return ModelSpec(name, backend="fake-reranker", device="cpu", options=tuple(options.items()))


def fake_embedder_spec(name: str = "fake", **options: object) -> ModelSpec:
    return ModelSpec(name, backend="fake-embedder", device="cpu", options=tuple(options.items()))


def build_cross_encoder(
    path: str | Path,
    *,
    hidden_size: int = 32,
    num_layers: int = 2,
    num_heads: int = 2,
    intermediate_size: int = 64,
    max_position_embeddings: int = 512,
    tokenizer: str | Path | None = None,
    seed: int = 0,
) -> Path:
    """Save a random-weight ``BertForSequenceClassification`` cross-encoder at ``path``.

    Scores are meaningless; loading, batching, dtype and memory behaviour are real. The tokenizer
    defaults to the packaged all-MiniLM-L6-v2 one (extra ``offline``), so nothing is downloaded.
    """
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    from .offline import packaged_model_path

    source = tokenizer or packaged_model_path("sentence-transformers/all-MiniLM-L6-v2")
    if source is None:
        raise RuntimeError(
            "build_cross_encoder needs a tokenizer: install 'rag-rerank-plugins[offline]' "
            "or pass tokenizer='/path/to/tokenizer'."
        )
    tok = AutoTokenizer.from_pretrained(str(source))
    config = BertConfig(
        vocab_size=tok.vocab_size,
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        intermediate_size=intermediate_size,
        max_position_embeddings=max_position_embeddings,
        num_labels=1,
    )
    torch.manual_seed(seed)
    model = BertForSequenceClassification(config)
    out = Path(path)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def build_cross_encoder_from_encoder(
    path: str | Path,
    *,
    encoder: str | Path | None = None,
    seed: int = 0,
) -> Path:
    """Save a cross-encoder whose encoder carries real pretrained weights, at ``path``.

    ``BertForSequenceClassification`` on ``encoder`` (default: the packaged all-MiniLM-L6-v2,
    extra ``offline``) with a seeded random one-logit head. Unlike :func:`build_cross_encoder`,
    its activations have the ranges of a trained model, so dtype effects (BF16, FP16, int8)
    on scores and rankings are realistic; the scores still carry no relevance signal to speak of.
    """
    import torch
    from transformers import AutoTokenizer, BertForSequenceClassification

    from .offline import packaged_model_path

    source = encoder or packaged_model_path("sentence-transformers/all-MiniLM-L6-v2")
    if source is None:
        raise RuntimeError(
            "build_cross_encoder_from_encoder needs encoder weights: install "
            "'rag-rerank-plugins[offline]' or pass encoder='/path/to/bert'."
        )
    torch.manual_seed(seed)
    model = BertForSequenceClassification.from_pretrained(str(source), num_labels=1)
    torch.manual_seed(seed)
    model.classifier.weight.data.normal_(0.0, 0.5)  # wide enough that scores spread out
    model.classifier.bias.data.zero_()
    out = Path(path)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(str(source)).save_pretrained(out)
    return out
