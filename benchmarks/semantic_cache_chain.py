"""Issue 23: a semantic-cache hit through a LangChain chain, end to end, on the CPU (<= 50 ms).

Seed 004 answered a hit in ~50 ms instead of ~10 s. This measures what a user's chain pays for a
hit with :class:`~rag_rerank_plugins.langchain.SharedSemanticCache` installed by
``set_llm_cache``: ``(PromptTemplate | FakeListLLM).invoke(paraphrase)``, where the fake LLM
stands for the model that is *not* called. The time covers LangChain's chain and callbacks, the
query embedding (packaged all-MiniLM-L6-v2 through the shared pool, with the pool's query cache
off, so each hit embeds its query: a repeated question whose embedding the pool remembers is
faster), the nearest-neighbour search, the guard and ``loads`` of the cached generations.

Paraphrases are looked up in rotation against ``--entries`` cached questions (the rest are
filler in the same namespace). Also printed: the same chain with the in-process LLM called
(a miss + update), the median of ``cache.lookup`` alone, and the async chain.

    python benchmarks/semantic_cache_chain.py                 # 200 hits, 1000 cached entries
    python benchmarks/semantic_cache_chain.py --hits 50 --entries 100 --guard rerank

Measured: see docs/guides/semantic-cache.md ("How fast is a hit").
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import time
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

PAIRS = [
    ("O que diz o Art. 72?", "O que diz o artigo 72?"),
    ("What is the capital of France?", "Which city is the capital of France?"),
    ("How do I reset my password?", "How can I reset my password?"),
    ("What are the side effects of ibuprofen?", "Which side effects does ibuprofen have?"),
    ("How long does shipping to Canada take?", "How many days does shipping to Canada take?"),
    ("What is the refund policy?", "What's your refund policy?"),
    ("Who wrote Dom Casmurro?", "Who is the author of Dom Casmurro?"),
    ("How do I export a report to PDF?", "How can I export a report as PDF?"),
]


def _ms(samples: list[float]) -> str:
    ordered = sorted(samples)
    p95 = ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]
    return f"p50 {statistics.median(ordered):6.2f} ms   p95 {p95:6.2f} ms   (n={len(ordered)})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hits", type=int, default=200)
    parser.add_argument("--entries", type=int, default=1000)
    parser.add_argument("--guard", default="hybrid", choices=("hybrid", "dense", "rerank"))
    args = parser.parse_args()

    import torch
    from langchain_core.globals import set_llm_cache
    from langchain_core.language_models import FakeListLLM
    from langchain_core.prompts import PromptTemplate

    from rag_rerank_plugins import ModelPool
    from rag_rerank_plugins.engine_config import EngineConfig
    from rag_rerank_plugins.langchain import SharedSemanticCache
    from rag_rerank_plugins.semantic_cache import SemanticCache

    pool = ModelPool(config=EngineConfig(query_cache_size=0))
    options: dict[str, Any] = {"pool": pool, "guard": args.guard, "max_entries": None}
    if args.guard == "rerank":
        from rag_rerank_plugins.testing import build_cross_encoder_from_encoder

        options["reranker"] = str(build_cross_encoder_from_encoder("/tmp/semcache-bench-ce"))
    cache = SemanticCache(**options)
    adapter = SharedSemanticCache(cache)
    set_llm_cache(adapter)
    llm = FakeListLLM(responses=["the answer " * 40])  # ~400 characters cached per entry
    chain = PromptTemplate.from_template("{question}") | llm
    seen: dict[str, str] = {}
    update = adapter.update

    def recording_update(prompt: str, llm_string: str, return_val: Any) -> None:
        seen["llm_string"] = llm_string  # LangChain's identity string of this LLM
        update(prompt, llm_string, return_val)

    adapter.update = recording_update  # type: ignore[method-assign]
    for question, _ in PAIRS:
        chain.invoke({"question": question})  # a miss: the LLM answers, the adapter stores
    adapter.update = update  # type: ignore[method-assign]
    namespace = adapter.namespace_for(seen["llm_string"])
    filler = max(0, args.entries - len(PAIRS))
    value = adapter._encode(llm.generate(["x"]).generations[0])
    for i in range(filler):
        cache.put(f"Filler question number {i} about topic {i % 97}?", value, namespace=namespace)
    # Warm up: the first calls build kernels and caches.
    for _, paraphrase in PAIRS:
        chain.invoke({"question": paraphrase})

    hits: list[float] = []
    lookups: list[float] = []
    for i in range(args.hits):
        _, paraphrase = PAIRS[i % len(PAIRS)]
        t0 = time.perf_counter()
        answer = chain.invoke({"question": paraphrase})
        hits.append((time.perf_counter() - t0) * 1000)
        assert answer.startswith("the answer"), answer
        t0 = time.perf_counter()
        assert cache.lookup(paraphrase, namespace=namespace) is not None
        lookups.append((time.perf_counter() - t0) * 1000)
    stats = adapter.stats()
    assert stats["errors"] == 0, stats

    async def async_hits() -> list[float]:
        samples = []
        for i in range(min(args.hits, 100)):
            _, paraphrase = PAIRS[i % len(PAIRS)]
            t0 = time.perf_counter()
            await chain.ainvoke({"question": paraphrase})
            samples.append((time.perf_counter() - t0) * 1000)
        return samples

    ahits = asyncio.run(async_hits())
    misses: list[float] = []
    for i in range(min(args.hits, 50)):
        t0 = time.perf_counter()
        chain.invoke({"question": f"A question never asked before, number {i}?"})
        misses.append((time.perf_counter() - t0) * 1000)

    print(
        f"semantic cache through a LangChain chain: guard={args.guard}, "
        f"{cache.stats().get('entries', args.entries)} entries, torch threads "
        f"{torch.get_num_threads()}, CPU"
    )
    print(f"  hit, chain.invoke (end to end)   {_ms(hits)}")
    print(f"  hit, chain.ainvoke (end to end)  {_ms(ahits)}")
    print(f"  cache.lookup alone (embed+guard) {_ms(lookups)}")
    core = cache.stats()
    print(
        f"  of which beyond the embedding    p50 {core['search_ms_p50']:6.2f} ms   "
        f"p95 {core['search_ms_p95']:6.2f} ms   (the cache's own stats)"
    )
    print(f"  miss + update, chain.invoke      {_ms(misses)}  (the fake LLM answers at once)")
    floor = statistics.median(hits)
    print(f"  floor <= 50 ms end to end: {'met' if floor <= 50 else 'NOT met'} ({floor:.2f} ms)")
    pool.clear()


if __name__ == "__main__":
    main()
