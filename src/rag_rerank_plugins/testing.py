"""Test doubles and model builders for users' own test suites (and ours).

Like httpx's MockTransport: deterministic, dependency-free backends that go through the real
pool, so a test of your RAG pipeline exercises the same code paths as production without torch
or weights:

* ``backend="fake-reranker"``: score = share of query words found in the passage (0..1).
* ``backend="fake-embedder"``: hashed bag-of-words vectors, unit length, ``dim`` option (64).

Both accept ``delay_ms`` (sleep per call) to simulate a slow model and ``footprint_mb`` (the size
a pool with a memory budget sees, ``LoadedModel.footprint_bytes``) to simulate a big one.
``build_cross_encoder`` writes a tiny random-weight BERT cross-encoder to disk, for testing the
real loading code offline; ``build_cross_encoder_from_encoder`` one with the packaged MiniLM's
real encoder weights and a seeded head, whose activations have realistic ranges (for dtype and
quantization tests). ``build_causal_lm_reranker`` writes a tiny random Qwen3/Qwen2-shaped causal LM
with a byte-level BPE tokenizer trained on the packaged sample corpus
(``train_byte_bpe_tokenizer``), for the ``causal-lm-reranker`` backend. ``beir_pairs`` reads
(query, passage) pairs of real text from a BEIR-layout dataset (SciFact), for quality checks.
"""

from __future__ import annotations

import hashlib
import math
import re
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .backends.base import EmbedderModel, ModelProvider, Prepared, RerankerModel, Task
from .spec import ModelSpec

__all__ = [
    "FakeEmbedder",
    "FakeReranker",
    "SimulatedDevice",
    "SimulatedOutOfMemoryError",
    "SimulatedReranker",
    "build_causal_lm_reranker",
    "build_cross_encoder",
    "beir_pairs",
    "build_cross_encoder_from_encoder",
    "fake_embedder_spec",
    "fake_reranker_spec",
    "train_byte_bpe_tokenizer",
]

_WORD = re.compile(r"\w+", re.UNICODE)


def beir_pairs(folder: str | Path, n_queries: int, per_query: int = 12) -> list[tuple[str, str]]:
    """The first ``n_queries`` test queries of a BEIR dataset x their ``per_query`` passages with
    the most words in common (a cheap BM25 stand-in: candidates that look alike, as a reranker
    sees them). ``folder`` holds ``corpus.jsonl``, ``queries.jsonl`` and ``qrels/test.tsv``;
    passages are ``title + " " + text``. Raises ``FileNotFoundError`` when a file is missing.
    """
    import json

    root = Path(folder)
    word = re.compile(r"[a-z0-9]+")
    with open(root / "queries.jsonl", encoding="utf-8") as fh:
        queries = {q["_id"]: q["text"] for q in map(json.loads, fh)}
    with open(root / "qrels" / "test.tsv", encoding="utf-8") as fh:
        qids = sorted({line.split("\t")[0] for line in list(fh)[1:]}, key=int)[:n_queries]
    with open(root / "corpus.jsonl", encoding="utf-8") as fh:
        docs = [f"{d['title']} {d['text']}" for d in map(json.loads, fh)]
    words = [set(word.findall(d.lower())) for d in docs]
    pairs = []
    for qid in qids:
        query = set(word.findall(queries[qid].lower()))
        ranked = sorted(range(len(docs)), key=lambda i: (-len(query & words[i]), i))
        pairs += [(queries[qid], docs[i]) for i in ranked[:per_query]]
    return pairs


def _words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def _mb(value: float | None) -> int | None:
    return None if value is None else int(float(value) * 1024 * 1024)


class FakeReranker(RerankerModel):
    thread_safe = True

    def __init__(self, delay_ms: float = 0.0, footprint_mb: float | None = None) -> None:
        self.delay_ms = delay_ms
        self._footprint = _mb(footprint_mb)

    def footprint_bytes(self) -> int | None:
        return self._footprint

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

    def __init__(
        self, dim: int = 64, delay_ms: float = 0.0, footprint_mb: float | None = None
    ) -> None:
        self._dim = dim
        self.delay_ms = delay_ms
        self._footprint = _mb(footprint_mb)

    def footprint_bytes(self) -> int | None:
        return self._footprint

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
        return [self._vector((prompt or "") + t) for t in texts]


def load_fake_reranker(spec: ModelSpec, provider: ModelProvider) -> FakeReranker:
    return FakeReranker(
        delay_ms=float(spec.option("delay_ms", 0.0)), footprint_mb=spec.option("footprint_mb")
    )


def load_fake_embedder(spec: ModelSpec, provider: ModelProvider) -> FakeEmbedder:
    return FakeEmbedder(
        dim=int(spec.option("dim", 64)),
        delay_ms=float(spec.option("delay_ms", 0.0)),
        footprint_mb=spec.option("footprint_mb"),
    )


def fake_reranker_spec(name: str = "fake", **options: object) -> ModelSpec:
    return ModelSpec(name, backend="fake-reranker", device="cpu", options=tuple(options.items()))


def fake_embedder_spec(name: str = "fake", **options: object) -> ModelSpec:
    return ModelSpec(name, backend="fake-embedder", device="cpu", options=tuple(options.items()))


def _require_st(purpose: str, *, torch: bool = True) -> None:
    """torch (unless ``torch=False``) and transformers, or a MissingDependencyError naming the
    ``st`` extra (a bare ModuleNotFoundError told a user of a lighter install nothing about what
    to add)."""
    from .backends._torch_common import import_optional

    if torch:
        import_optional("torch", "torch", "st", purpose)
    import_optional("transformers", "transformers", "st", purpose)


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
    num_labels: int = 1,
    id2label: dict[int, str] | None = None,
) -> Path:
    """Save a random-weight ``BertForSequenceClassification`` cross-encoder at ``path``.

    Scores are meaningless; loading, batching, dtype and memory behaviour are real. The tokenizer
    defaults to the packaged all-MiniLM-L6-v2 one (extra ``offline``), so nothing is downloaded.
    ``num_labels`` > 1 (with optional label names ``id2label``) builds a multi-label classifier,
    e.g. the (not relevant, relevant) heads of msmarco rerankers.
    """
    _require_st("testing.build_cross_encoder")
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
        num_labels=num_labels,
        **(
            {"id2label": id2label, "label2id": {v: k for k, v in id2label.items()}}
            if id2label
            else {}
        ),
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
    _require_st("testing.build_cross_encoder_from_encoder")
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


# -- a simulated accelerator: memory that stays allocated while referenced, and GIL-free waits ---


class SimulatedOutOfMemoryError(RuntimeError):
    """Raised by :class:`SimulatedDevice` like ``torch.OutOfMemoryError`` ("... out of memory")."""


class _Block:
    """Bytes held on a :class:`SimulatedDevice` until this object is garbage collected (exactly
    like a CUDA tensor: a traceback that keeps a frame alive keeps its activations allocated)."""

    __slots__ = ("__weakref__", "_device", "nbytes")

    def __init__(self, device: SimulatedDevice, nbytes: int) -> None:
        self._device = device
        self.nbytes = nbytes

    def __del__(self) -> None:
        self._device._free(self.nbytes)


class SimulatedDevice:
    """A device with ``capacity_bytes`` of memory that counts live activations.

    CI has no GPU; this fake makes the engine's GPU behaviour testable on a CPU: allocations fail
    with an out-of-memory error once live blocks exceed the capacity, and memory returns only when
    the blocks are really unreferenced. ``peak_bytes`` and ``allocated_bytes`` are for asserts.
    """

    def __init__(self, capacity_bytes: int) -> None:
        self.capacity_bytes = capacity_bytes
        self.allocated_bytes = 0
        self.peak_bytes = 0
        self.ooms = 0
        self._lock = threading.Lock()

    def alloc(self, nbytes: int) -> _Block:
        with self._lock:
            if self.allocated_bytes + nbytes > self.capacity_bytes:
                self.ooms += 1
                raise SimulatedOutOfMemoryError(
                    f"Simulated device out of memory: tried to allocate {nbytes} bytes with "
                    f"{self.allocated_bytes} of {self.capacity_bytes} bytes in use."
                )
            self.allocated_bytes += nbytes
            self.peak_bytes = max(self.peak_bytes, self.allocated_bytes)
        return _Block(self, nbytes)

    def _free(self, nbytes: int) -> None:
        with self._lock:
            self.allocated_bytes -= nbytes


class SimulatedReranker(RerankerModel):
    """A two-phase reranker on a :class:`SimulatedDevice`; scores are :class:`FakeReranker`'s.

    * ``prepare`` tokenises for real when given a Hugging Face ``tokenizer`` (else counts words),
      on the engine's prepare thread, like a real backend;
    * ``forward`` holds ``bytes_per_token`` x padded tokens of activations per layer (``layers``)
      while it runs, and waits ``seconds_per_token`` x padded tokens *without holding the GIL*, as
      a GPU kernel would.
    """

    def __init__(
        self,
        device: SimulatedDevice | None = None,
        *,
        tokenizer: object | None = None,
        seconds_per_token: float = 0.0,
        bytes_per_token: int = 1024,
        layers: int = 4,
    ) -> None:
        self.sim = device if device is not None else SimulatedDevice(1 << 40)
        self.device = "cuda:sim"
        self.tokenizer = tokenizer
        self.seconds_per_token = seconds_per_token
        self.bytes_per_token = bytes_per_token
        self.layers = layers
        self.prepare_threads: set[str] = set()
        self.forward_threads: set[str] = set()
        self.passes: list[int] = []  # padded tokens of every pass that completed
        self._fake = FakeReranker()
        # Prepare only tokenises with fixed settings: safe in several prepare threads once warm.
        self.concurrent_prepare = True
        if tokenizer is not None:
            self._padded([("query", "passage")])

    def _padded(self, pairs: Sequence[tuple[str, str]]) -> int:
        if self.tokenizer is not None:
            encoded = self.tokenizer(  # type: ignore[operator]
                [q for q, _ in pairs],
                [p for _, p in pairs],
                padding=True,
                truncation="longest_first",
                max_length=512,
                return_tensors="np",  # like a real backend's tensors: no Python lists of ids
            )
            rows, width = encoded["input_ids"].shape
            return int(rows * width)
        longest = max(len(_words(q)) + len(_words(p)) + 3 for q, p in pairs)
        return longest * len(pairs)

    def prepare(self, task: Task, items: Sequence[Any]) -> Prepared:
        self.prepare_threads.add(threading.current_thread().name)
        pairs = list(items)
        return Prepared(pairs, len(pairs), self._padded(pairs))

    def forward(self, task: Task, batch: Prepared) -> Any:
        self.forward_threads.add(threading.current_thread().name)
        padded = batch.padded_tokens or self._padded(batch.payload)
        activations = []  # a local, like a model's hidden states: a traceback keeps it alive
        for _ in range(self.layers):
            activations.append(self.sim.alloc(padded * self.bytes_per_token))
        if self.seconds_per_token:
            time.sleep(self.seconds_per_token * padded)  # releases the GIL, like a kernel
        scores = self._fake.score_pairs(batch.payload, batch.size)
        del activations
        self.passes.append(padded)
        return scores

    def score_pairs(self, pairs: Sequence[tuple[str, str]], batch_size: int) -> list[float]:
        prepared = self.prepare(Task("score"), pairs)
        return list(self.forward(Task("score"), prepared))

    def free_cache(self) -> None:
        """Nothing cached: freed blocks return to the device at once."""


#: Qwen's chat tokens, which the Qwen3-Reranker prompt template uses.
QWEN_SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>")


def train_byte_bpe_tokenizer(
    special_tokens: Sequence[str],
    *,
    texts: Sequence[str] | None = None,
    vocab_size: int = 800,
    **named_tokens: str,
) -> Any:
    """A byte-level BPE ``PreTrainedTokenizerFast`` trained on ``texts`` (default: the packaged
    sample corpus), the tokenizer family of Qwen, Llama 3 and GPT-2. ``special_tokens`` come
    first in the vocabulary and are never split; ``named_tokens`` (``pad_token="<pad>"``, ...)
    name some of them. "yes", "no", "Yes" and "No" are single tokens (answer tokens of LLM
    rerankers). Deterministic for the same inputs; nothing is downloaded.
    """
    _require_st("testing.train_byte_bpe_tokenizer", torch=False)  # tokenizers + transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if texts is None:
        from .demo import load_sample_corpus

        texts = [doc["text"] for doc in load_sample_corpus()]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(special_tokens),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([*texts, *texts, *(["yes", "no", "Yes", "No"] * 50)], trainer=trainer)
    named = set(named_tokens.values())
    extra = [t for t in special_tokens if t not in named]
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, additional_special_tokens=extra, **named_tokens
    )


def build_causal_lm_reranker(
    path: str | Path,
    *,
    architecture: str = "qwen3",
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    head_dim: int | None = None,
    intermediate_size: int = 128,
    vocab_size: int | None = None,
    max_position_embeddings: int = 2048,
    initializer_range: float = 0.02,
    seed: int = 0,
) -> Path:
    """Save a random-weight Qwen3 (or ``architecture="qwen2"``) causal LM at ``path``, with a
    byte-level BPE tokenizer that has Qwen's chat tokens and single "yes"/"no" tokens: what the
    ``causal-lm-reranker`` backend's default (Qwen3-Reranker) template needs. Scores are
    meaningless; loading, templating, padding, batching and memory behaviour are real.
    ``vocab_size`` defaults to the tokenizer's (pass 151669 for Qwen3-Reranker's embedding size);
    ``head_dim`` (Qwen3 only) to ``hidden_size // num_heads`` (the real Qwen3 models use 128).
    """
    _require_st("testing.build_causal_lm_reranker")
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM

    classes = {"qwen3": (Qwen3Config, Qwen3ForCausalLM), "qwen2": (Qwen2Config, Qwen2ForCausalLM)}
    if architecture not in classes:
        raise ValueError(f"architecture must be one of {sorted(classes)}, got {architecture!r}")
    tok = train_byte_bpe_tokenizer(
        QWEN_SPECIAL_TOKENS, pad_token="<|endoftext|>", eos_token="<|im_end|>"
    )
    config_cls, model_cls = classes[architecture]
    config = config_cls(
        vocab_size=max(vocab_size or 0, len(tok)),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=True,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
        initializer_range=initializer_range,
    )
    if architecture == "qwen3":
        config.head_dim = head_dim or hidden_size // num_heads
    torch.manual_seed(seed)
    out = Path(path)
    model_cls(config).save_pretrained(out)
    tok.padding_side = "left"
    tok.save_pretrained(out)
    return out
