"""The batcher's token estimate, before and after one scale for every script, side by side.

    python benchmarks/token_estimate.py [--rounds 7] [--out benchmarks/results/token_estimate.md]

The engine sorts a request's items by ``engine.batching.estimate_tokens`` and cuts passes from
that order; padded runtimes (ONNX Runtime, OpenVINO; torch on GPUs) then pad every item of a
pass to its longest. The earlier rule estimated ASCII text by characters and any other text by
words x 1.3, which puts a Chinese passage at a fifth of its length. This runs the same requests
through two pools of one process, switching the batcher's estimate between the two rules before
each request (requests interleaved, the order flipped every round), per backend:

* ``scifact``: 1 query x 50 SciFact passages (``../shared/data/scifact``; ~23 % of them have a
  non-ASCII character: a Greek letter, a degree sign);
* ``mixed``: the same with every other passage replaced by a 40-300 character passage in
  Chinese, Japanese, Russian, Arabic or German.

Model: the MiniLM-L6 cross-encoder carrying the packaged all-MiniLM-L6-v2 encoder
(``testing.build_cross_encoder_from_encoder``). Each row gives the median latency and the
pool's ``padding_ratio`` and learned ``token_scale`` after the run. Results never depend on the
estimate (only pass shapes do), so scores are not compared.
"""

# ruff: noqa: RUF001
from __future__ import annotations

import argparse
import os
import random
import re
import statistics
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import run  # noqa: E402
from bench_common import pin_threads, threads_line  # noqa: E402
from cpu_peers import cpu_line, scifact_passages  # noqa: E402

OTHER_SCRIPTS = [
    "检索增强生成系统在每个请求中构建检索器，因此交叉编码器会被重复加载，内存占用不断上升。",
    "検索拡張生成のシステムでは、リクエストごとにリトリーバーが構築されるため、何度も読み込まれます。",
    "Системы генерации с дополненной выборкой создают ретривер на каждый запрос, поэтому модель "
    "загружается снова и снова.",
    "أنظمة التوليد المعزز بالاسترجاع تبني المسترجع لكل طلب، لذلك يتم تحميل النموذج مرارا وتكرارا.",
    "Systeme für abrufgestützte Generierung bauen pro Anfrage einen Retriever, daher wird das "
    "Modell immer wieder geladen – größer und größer.",
]
_WORDS = re.compile(r"\w+|[^\w\s]", re.UNICODE)


def before(text: str) -> int:
    """The estimate before this change: characters for ASCII, words x 1.3 for the rest."""
    if len(text) > 20_000:
        return len(text) // 3
    if text.isascii():
        return len(text) * 2 // 7 + 1
    return int(len(_WORDS.findall(text)) * 1.3) + 1


def mixed(passages: list[str]) -> list[str]:
    rng = random.Random(1)
    out = list(passages)
    for i in range(0, len(out), 2):
        text = OTHER_SCRIPTS[i // 2 % len(OTHER_SCRIPTS)] * 3
        out[i] = text[: rng.randint(40, 300)]
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--models", type=Path, default=HERE / ".models")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "token_estimate.md")
    parser.add_argument(
        "--backends",
        default="openvino-cross-encoder:bfloat16,onnx-cross-encoder:float32,cross-encoder:auto",
    )
    args = parser.parse_args(argv)
    pin_threads(None)
    os.environ["RAG_RERANK_ONNX_CACHE"] = str(args.models / "export-cache")

    import rag_rerank_plugins.engine.batching as batching
    from rag_rerank_plugins import ModelPool
    from rag_rerank_plugins.testing import build_cross_encoder_from_encoder

    after = batching.estimate_tokens
    rules = {"before": before, "after": after}
    model = args.models / "minilm-l6-real-ce"
    if not (model / "config.json").exists():
        build_cross_encoder_from_encoder(model)
    query, passages = scifact_passages(50)
    requests = {"scifact": passages, "mixed": mixed(passages)}
    lines = [
        f"CPU: {cpu_line()}",
        threads_line(),
        f"1 query x 50 passages, {args.rounds} interleaved rounds after 2 warm-up requests",
        "",
        "| backend | request | rule | median ms | padding_ratio | token_scale |",
        "|---|---|---|---:|---:|---:|",
    ]
    for entry in args.backends.split(","):
        backend, _, dtype = entry.partition(":")
        for name, texts in requests.items():
            docs, nodes = run.as_docs(texts)
            systems: dict[str, Any] = {}
            pools: dict[str, Any] = {}
            for rule in rules:
                pools[rule] = ModelPool()
                systems[rule] = run.ours_factory(model, pools[rule], backend=backend, dtype=dtype)()
                batching.estimate_tokens = rules[rule]
                for _ in range(2):
                    run.run_request(systems[rule], docs, nodes, query)
            times: dict[str, list[float]] = {rule: [] for rule in rules}
            for round_ in range(args.rounds):
                order = list(rules) if round_ % 2 == 0 else list(rules)[::-1]
                for rule in order:
                    batching.estimate_tokens = rules[rule]
                    time.sleep(1)
                    t0 = time.perf_counter()
                    run.run_request(systems[rule], docs, nodes, query)
                    times[rule].append(time.perf_counter() - t0)
            batching.estimate_tokens = after
            for rule in rules:
                stats = next(iter(pools[rule].stats().values()))
                row = (
                    f"| {backend} {dtype} | {name} | {rule} | "
                    f"{statistics.median(times[rule]) * 1000:.0f} | "
                    f"{stats['padding_ratio']:.3f} | {stats['token_scale']:.2f} |"
                )
                lines.append(row)
                print(row, flush=True)
                pools[rule].clear()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n", encoding="utf-8")
    print("\n".join(lines[:3]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
