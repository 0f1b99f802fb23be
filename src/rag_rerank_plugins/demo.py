"""The offline demo behind ``rag-rerank demo``: proof that per-request adapters load nothing.

A web app typically builds its retriever pipeline per request. This module simulates that with
both LangChain and LlamaIndex over a bundled sample corpus: one vector store per framework is
built once, then every simulated request builds *fresh* reranker adapters and retrievers. The pool
statistics printed at the end show each model loaded exactly once, and the timings show that
building an adapter costs microseconds while a request costs milliseconds.

Everything runs offline with the packaged all-MiniLM-L6-v2 (extra ``offline``): it embeds, and the
``bi-encoder`` backend reranks with the very same loaded embedder. It needs the extras
``langchain,llama-index,offline`` (a missing one is named in a MissingDependencyError).
"""

from __future__ import annotations

import json
import logging
import math
import os
import statistics
import time
from collections.abc import Callable, Sequence
from importlib import import_module, resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .exceptions import MissingDependencyError

if TYPE_CHECKING:
    from .pool import ModelPool

__all__ = ["DEMO_EMBEDDER", "SAMPLE_QUERIES", "load_sample_corpus", "run_demo"]

logger = logging.getLogger(__name__)

#: Embedding model of the demo; with the ``offline`` extra it resolves to packaged weights.
DEMO_EMBEDDER = "sentence-transformers/all-MiniLM-L6-v2"
#: Candidates each framework's vector retriever hands to the reranker.
CANDIDATES = 8
#: Requests whose top results are printed.
SHOWN_REQUESTS = 2

_FRAMEWORK_NAMES = {"langchain": "LangChain", "llama_index": "LlamaIndex"}

#: Simulated user questions, one or two per topic of the sample corpus; requests cycle through them.
SAMPLE_QUERIES: tuple[str, ...] = (
    "How long does sunlight take to reach the Earth?",
    "Why does the sea have high and low tides?",
    "How do I keep pasta sauce from sliding off the noodles?",
    "Why does seared steak turn brown and tasty?",
    "Is looking up a key in a Python dict fast?",
    "Should I use threads or processes for CPU-heavy Python code?",
    "How many hours of sleep does an adult need?",
    "Do antibiotics help against a cold?",
    "When did the Western Roman Empire fall?",
    "How do heat pumps heat a house efficiently?",
)


def load_sample_corpus() -> list[dict[str, str]]:
    """The bundled passages: dicts with ``id``, ``title``, ``text`` and ``topic``."""
    source = resources.files("rag_rerank_plugins.data").joinpath("sample_corpus.jsonl")
    text = source.read_text(encoding="utf-8")
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def _is_offline_model(model: str) -> bool:
    """True when ``model`` loads without the hub: a local path or a packaged model."""
    from .offline import packaged_model_path

    return os.path.exists(os.path.expanduser(model)) or packaged_model_path(model) is not None


def _short_model(model: str) -> str:
    """A readable model name for the stats table (pool keys hold absolute packaged paths)."""
    from .offline import PACKAGED_MODELS, packaged_model_path

    for name in PACKAGED_MODELS:
        if packaged_model_path(name) == model:
            return f"{name.rsplit('/', 1)[-1]} (packaged)"
    if os.path.isabs(model):
        path = Path(model)
        return path.parent.name if path.name == "model" else path.name
    return model


def _shorten(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def _percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (``q`` in 0..100); works for a single value too."""
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


def _stats_table(stats: dict[str, dict[str, Any]]) -> list[str]:
    header = ("spec", "kind", "loads", "calls", "items", "load s", "device", "dtype")
    rows = [
        (
            _shorten(f"{s['backend']}:{_short_model(s['model'])}", 52),
            str(s["kind"]),
            str(s["loads"]),
            str(s["calls"]),
            str(s["items"]),
            f"{s['load_seconds']:.2f}",
            str(s["device"]),
            str(s["dtype"]),
        )
        for s in stats.values()
    ]
    widths = [max(len(row[i]) for row in (header, *rows)) for i in range(len(header))]
    numeric = {2, 3, 4, 5}

    def fmt(row: Sequence[str]) -> str:
        cells = [
            cell.rjust(widths[i]) if i in numeric else cell.ljust(widths[i])
            for i, cell in enumerate(row)
        ]
        return "  ".join(cells).rstrip()

    return [fmt(header), fmt(["-" * w for w in widths]), *(fmt(row) for row in rows)]


def _check_reranker(adapter: Any, model: str, backend: str, top_n: int, pool: ModelPool) -> None:
    """Build one reranker adapter (microseconds, nothing loads) so that a bad model or backend
    is this package's error before anything slow runs, not a pydantic ``ValidationError``."""
    from pydantic import ValidationError

    from .exceptions import ConfigurationError, RagRerankError

    try:
        adapter(model=model, backend=backend, top_n=top_n, pool=pool)
    except ValidationError as exc:
        for error in exc.errors():
            cause = (error.get("ctx") or {}).get("error")
            if isinstance(cause, RagRerankError):
                raise cause from None
        raise ConfigurationError(f"reranker {model!r} with backend {backend!r}: {exc}") from None


def run_demo(
    requests: int = 20,
    reranker: str | None = None,
    backend: str | None = None,
    top_n: int = 3,
    out: Callable[[str], object] = print,
    *,
    pool: ModelPool | None = None,
) -> dict[str, Any]:
    """Serve ``requests`` simulated queries through LangChain and LlamaIndex; report the pool.

    ``reranker``/``backend`` pick the reranking model (default: the packaged MiniLM with
    ``backend="bi-encoder"``; a given ``reranker`` defaults to ``backend="cross-encoder"``).
    ``out`` receives every line of the report; ``pool`` defaults to the process-wide pool.

    Returns a dict with ``loads`` (spec label -> loads), ``stats`` (the full pool stats),
    ``construction_us_median``, ``request_ms_median``, ``request_ms_p95``, ``index_build_s`` and
    ``results`` (one entry per framework: the first request's query, top titles and scores).
    """
    if requests < 1:
        raise ValueError(f"requests must be at least 1, got {requests}.")
    if top_n < 1:
        raise ValueError(f"top_n must be at least 1, got {top_n}.")
    from .exceptions import ConfigurationError

    for name, given in (("reranker", reranker), ("backend", backend)):
        if given is not None and not given.strip():  # was silently the default model/backend
            raise ConfigurationError(
                f"{name} must be a non-empty name, got {given!r}; leave it out for the default."
            )
    rerank_model = reranker or DEMO_EMBEDDER
    rerank_backend = backend or ("cross-encoder" if reranker else "bi-encoder")
    if _is_offline_model(DEMO_EMBEDDER) and _is_offline_model(rerank_model):
        # Set before transformers/huggingface_hub are imported: they read it at import time.
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
    else:
        logger.warning(
            "demo models are not all packaged or local (%s, %s): they may be downloaded",
            DEMO_EMBEDDER,
            rerank_model,
        )

    # Heavy imports only here, so that importing this module (and the CLI) stays cheap. Our
    # adapter packages first: without langchain-core or llama-index-core they raise
    # MissingDependencyError naming the extra, where the stock imports below gave a bare
    # ModuleNotFoundError.
    for adapters in ("langchain", "llama_index"):
        import_module(f"{__package__}.{adapters}._compat")  # their import guards

    from langchain_core.documents import Document
    from langchain_core.vectorstores import InMemoryVectorStore
    from llama_index.core import VectorStoreIndex
    from llama_index.core.schema import TextNode

    try:
        from langchain_classic.retrievers import ContextualCompressionRetriever
    except ImportError:  # LangChain < 1.0 ships it in the main package
        try:
            from langchain.retrievers import (  # type: ignore[no-redef,import-not-found]
                ContextualCompressionRetriever,
            )
        except ImportError:
            raise MissingDependencyError(
                "langchain-classic", "langchain", "rag-rerank demo"
            ) from None

    from .langchain import SharedEmbeddings, SharedRerankCompressor
    from .llama_index import SharedEmbedding, SharedRerankPostprocessor
    from .pool import get_pool

    pool = pool if pool is not None else get_pool()
    # A bad --backend failed with a pydantic traceback, after the vector stores were built.
    _check_reranker(SharedRerankCompressor, rerank_model, rerank_backend, top_n, pool)
    corpus = load_sample_corpus()
    out(
        f"rag-rerank demo: {len(corpus)} passages, {requests} requests, "
        f"embedder {DEMO_EMBEDDER}, reranker {rerank_model} ({rerank_backend}), top_n={top_n}"
    )

    # -- built once per process: the vector stores (this is where the embedder loads) ----------
    start = time.perf_counter()
    store = InMemoryVectorStore(embedding=SharedEmbeddings(model=DEMO_EMBEDDER, pool=pool))
    store.add_documents(
        [
            Document(
                page_content=p["text"],
                metadata={"title": p["title"], "topic": p["topic"]},
                id=p["id"],
            )
            for p in corpus
        ]
    )
    nodes = [
        TextNode(
            id_=p["id"],
            text=p["text"],
            metadata={"title": p["title"], "topic": p["topic"]},
            # Embed and rerank the bare text, exactly as LangChain does, so the rankings compare.
            excluded_embed_metadata_keys=["title", "topic"],
        )
        for p in corpus
    ]
    index = VectorStoreIndex(
        nodes, embed_model=SharedEmbedding(model_name=DEMO_EMBEDDER, pool=pool)
    )
    index_build_s = time.perf_counter() - start
    logger.info("demo: both vector stores built in %.2fs", index_build_s)
    out(f"vector stores built once in {index_build_s:.2f} s (LangChain + LlamaIndex)")

    # -- per request: fresh adapters and retrievers, as a web handler would build them --------
    construction_us: dict[str, list[float]] = {"langchain": [], "llama_index": []}
    framework_ms: dict[str, list[float]] = {"langchain": [], "llama_index": []}
    request_ms: list[float] = []
    results: list[dict[str, Any]] = []
    for i in range(requests):
        query = SAMPLE_QUERIES[i % len(SAMPLE_QUERIES)]
        t_request = time.perf_counter()

        t0 = time.perf_counter()
        compressor = SharedRerankCompressor(
            model=rerank_model, backend=rerank_backend, top_n=top_n, pool=pool
        )
        construction_us["langchain"].append((time.perf_counter() - t0) * 1e6)
        retriever = ContextualCompressionRetriever(
            base_compressor=compressor,
            base_retriever=store.as_retriever(search_kwargs={"k": CANDIDATES}),
        )
        lc_docs = retriever.invoke(query)
        t_lc = time.perf_counter()
        framework_ms["langchain"].append((t_lc - t_request) * 1e3)

        t0 = time.perf_counter()
        postprocessor = SharedRerankPostprocessor(
            model=rerank_model, backend=rerank_backend, top_n=top_n, pool=pool
        )
        construction_us["llama_index"].append((time.perf_counter() - t0) * 1e6)
        li_retriever = index.as_retriever(similarity_top_k=CANDIDATES)
        li_nodes = postprocessor.postprocess_nodes(li_retriever.retrieve(query), query_str=query)
        t_end = time.perf_counter()
        framework_ms["llama_index"].append((t_end - t_lc) * 1e3)
        request_ms.append((t_end - t_request) * 1e3)
        logger.debug("demo request %d took %.1f ms: %r", i + 1, request_ms[-1], query)

        ranked = {
            "langchain": [
                (str(d.metadata["title"]), float(d.metadata["relevance_score"])) for d in lc_docs
            ],
            "llama_index": [
                (str(n.node.metadata["title"]), float(n.score or 0.0)) for n in li_nodes
            ],
        }
        if i == 0:
            results = [
                {
                    "framework": framework,
                    "query": query,
                    "titles": [title for title, _ in top],
                    "scores": [score for _, score in top],
                }
                for framework, top in ranked.items()
            ]
        if i < SHOWN_REQUESTS:
            out("")
            out(f"request {i + 1}: {query!r}")
            for framework, top in ranked.items():
                for rank, (title, score) in enumerate(top):
                    label = _FRAMEWORK_NAMES[framework] if rank == 0 else ""
                    out(f"  {label:<11} {score:7.3f}  {title}")

    # -- report ---------------------------------------------------------------------------------
    stats = pool.stats()
    all_construction = construction_us["langchain"] + construction_us["llama_index"]
    summary = {
        "construction_us_median": statistics.median(all_construction),
        "request_ms_median": statistics.median(request_ms),
        "request_ms_p95": _percentile(request_ms, 95),
    }
    out("")
    out("model pool (one entry per loaded model):")
    for line in _stats_table(stats):
        out(f"  {line}")
    out("")
    out(
        f"adapter construction: median {summary['construction_us_median']:.0f} µs "
        f"(LangChain {statistics.median(construction_us['langchain']):.0f} µs, "
        f"LlamaIndex {statistics.median(construction_us['llama_index']):.0f} µs; "
        f"{len(all_construction)} adapters built)"
    )
    out(
        f"request latency (both frameworks): median {summary['request_ms_median']:.1f} ms, "
        f"p95 {summary['request_ms_p95']:.1f} ms over {requests} requests "
        f"(LangChain median {statistics.median(framework_ms['langchain']):.1f} ms, "
        f"LlamaIndex median {statistics.median(framework_ms['llama_index']):.1f} ms)"
    )
    loads = {label: int(s["loads"]) for label, s in stats.items()}
    out(
        f"{len(all_construction)} reranker adapters built; {len(loads)} model(s) in the pool, "
        f"{sum(loads.values())} load(s) in total"
    )
    return {
        "requests": requests,
        "embedder": DEMO_EMBEDDER,
        "reranker": {"model": rerank_model, "backend": rerank_backend},
        "loads": loads,
        "stats": stats,
        **summary,
        "construction_us": {k: statistics.median(v) for k, v in construction_us.items()},
        "framework_ms_median": {k: statistics.median(v) for k, v in framework_ms.items()},
        "index_build_s": index_build_s,
        "results": results,
    }
