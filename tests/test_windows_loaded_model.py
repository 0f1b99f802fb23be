"""Long-document windows on an already-loaded model: what it needs after the load, and what it
keeps of the query.

* ``onnx-cross-encoder`` / ``openvino-cross-encoder``: the docs say the export cache folder may be
  deleted to start over; a model loaded before that must keep serving windowed calls (it re-read
  the entry's ``tokenizer.json`` on first use of windows and failed every such call).
* ``flag-llm-reranker`` with a small ``max_length``: FlagEmbedding cuts ``"A: " + query`` to
  ``query_max_length``; every (query, window) pair the windower plans must reach the model
  whole, so scoring it at a ``max_length`` that cuts nothing gives the same score.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest

from rag_rerank_plugins import ModelPool, ModelSpec
from rag_rerank_plugins.windows import WindowSettings, windower_for

pytest.importorskip("transformers")
pytest.importorskip("langchain_core")

QUERY = "which organelle produces the energy of the cell?"
LONG = "The mitochondria produce ATP, the energy currency of the cell. " * 40
SHORT = "Chloroplasts capture light."


@pytest.mark.parametrize("backend", ["onnx-cross-encoder", "openvino-cross-encoder"])
def test_windows_work_on_a_loaded_model_after_its_cache_folder_is_deleted(
    pool: ModelPool, tiny_ce_path: str, tmp_path: Path, backend: str
) -> None:
    pytest.importorskip("onnxruntime")
    pytest.importorskip("sentence_transformers")  # the first load exports the model
    if backend == "openvino-cross-encoder":
        pytest.importorskip("openvino")
    from rag_rerank_plugins.langchain import SharedRerankCompressor

    cache = tmp_path / "cache"
    common: dict[str, Any] = {
        "model": tiny_ce_path,
        "dtype": "float32",
        "device": "cpu",
        "pool": pool,
        "top_n": None,
    }
    on_disk = {"backend": backend, "model_kwargs": {"cache_dir": str(cache)}, **common}
    plain = SharedRerankCompressor(**on_disk)
    windowed = SharedRerankCompressor(window_tokens=32, **on_disk)
    plain.rank_texts(QUERY, [LONG])  # loaded and serving
    shutil.rmtree(cache)  # docs: "Delete the folder to start over", while it serves

    ranked, infos = windowed.rank_texts_windowed(QUERY, [LONG, SHORT])

    # The same windows and scores as the torch cross-encoder's (what the docs promise).
    torch_ce = SharedRerankCompressor(backend="cross-encoder", window_tokens=32, **common)
    want_ranked, want_infos = torch_ce.rank_texts_windowed(QUERY, [LONG, SHORT])
    assert infos is not None
    assert want_infos is not None
    assert [i.count for i in infos] == [i.count for i in want_infos]
    assert infos[0].count > 1, "the long passage is windowed"
    got = {r.index: r.score for r in ranked}
    want = {r.index: r.score for r in want_ranked}
    assert got == pytest.approx(want, abs=1e-5)


@pytest.fixture(scope="module")
def tiny_lm_path(tmp_path_factory: pytest.TempPathFactory) -> str:
    from rag_rerank_plugins.testing import build_causal_lm_reranker

    path = tmp_path_factory.mktemp("models") / "tiny-lm"
    return str(build_causal_lm_reranker(path, initializer_range=0.2, seed=1))


@pytest.mark.parametrize(
    "instructions",
    [
        {},  # FlagEmbedding's "A: " / "B: "
        {
            "query_instruction_for_rerank": "Query here please: ",
            "passage_instruction_for_rerank": "Passage text: ",
        },
    ],
    ids=["default-instructions", "long-instructions"],
)
def test_flag_llm_windows_reach_the_model_whole_with_a_small_max_length(
    pool: ModelPool, tiny_lm_path: str, instructions: dict[str, str]
) -> None:
    """At ``max_length=64`` FlagEmbedding keeps 48 tokens of ``"A: " + query``: a 55-token query
    was kept whole for the windows (``window_query_tokens`` 64), its tail cut by the model, and
    the windows shrank to 6 tokens (with longer instructions: no room at all, an error)."""
    pytest.importorskip("FlagEmbedding")
    from rag_rerank_plugins.langchain import SharedRerankCompressor

    query = "a much longer query with many words in it to eat the budget " * 2
    texts = ["abc def ghi " * 100, "what is abc", "jkl mno " * 30]
    common: dict[str, Any] = {
        "backend": "flag-llm-reranker",
        "device": "cpu",
        "dtype": "float32",
        "options": instructions,
    }
    small = ModelSpec(tiny_lm_path, max_length=64, **common)
    uncut = ModelSpec(tiny_lm_path, max_length=2000, **common)  # nothing is ever cut
    settings = WindowSettings(tokens="auto")
    plan = windower_for(pool.get(small).model).plan(query, texts, settings)

    assert plan.query != query, "the query is cut to what the model keeps"
    assert plan.window_tokens >= 12, "windows do not give up room for a dropped query tail"
    # Every window pair (cut query) reaches the model whole. ("what is abc" may fit beside the
    # whole query: then it is scored with it, exactly as with windows off.)
    cut = [(q, w) for q, w in plan.pairs if q == plan.query]
    assert len(cut) >= len(plan.pairs) - 1
    assert pool.score_pairs(small, cut) == pytest.approx(pool.score_pairs(uncut, cut), abs=1e-5)

    adapter = SharedRerankCompressor(
        model=tiny_lm_path,
        pool=pool,
        top_n=None,
        max_length=64,
        window_tokens="auto",
        model_kwargs=instructions,
        **{k: v for k, v in common.items() if k != "options"},
    )
    scores, _ = plan.aggregate(pool.score_pairs(small, plan.pairs))
    got = {r.index: r.score for r in adapter.rank_texts(query, texts)}
    assert [got[i] for i in range(len(texts))] == pytest.approx(scores, abs=1e-6)


def test_flag_reranker_windows_reach_the_model_whole_with_a_small_max_length(
    pool: ModelPool, tiny_ce_path: str
) -> None:
    """``flag-reranker`` has the same separate query cap (``query_max_length``, 3/4 of
    ``max_length``): a 52-token query at ``max_length=64`` was kept whole for the windows and
    its tail cut by the model."""
    pytest.importorskip("FlagEmbedding")
    query = "a much longer query with many words in it to eat the budget " * 4  # 52 tokens
    texts = ["abc def ghi " * 100, "jkl mno " * 30]
    common: dict[str, Any] = {"backend": "flag-reranker", "device": "cpu", "dtype": "float32"}
    small = ModelSpec(tiny_ce_path, max_length=64, **common)
    uncut = ModelSpec(tiny_ce_path, max_length=512, **common)
    plan = windower_for(pool.get(small).model).plan(query, texts, WindowSettings(tokens="auto"))

    assert plan.query != query, "the query is cut to what the model keeps"
    assert all(q == plan.query for q, _ in plan.pairs)
    assert pool.score_pairs(small, plan.pairs) == pytest.approx(
        pool.score_pairs(uncut, plan.pairs), abs=1e-5
    )
