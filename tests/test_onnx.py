"""The ONNX Runtime cross-encoder backend: predict's scores, the int8 quality bound, the export
cache (reused across pools and processes, invalidated by changed files, written atomically),
the missing extra, the adapters, and concurrency.

Offline: the models are the session's tiny random cross-encoder and one built from the packaged
all-MiniLM-L6-v2 encoder (real activations, seeded head). The quality test reads SciFact from
``../shared/data/scifact`` (skipped when absent).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from rag_rerank_plugins import ConfigurationError, ModelPool, ModelSpec
from rag_rerank_plugins.backends import check_options

pytest.importorskip("onnxruntime")
pytest.importorskip("sentence_transformers")

from rag_rerank_plugins.backends import onnx as onnx_backend
from rag_rerank_plugins.backends._onnx_common import publish

SCIFACT = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "scifact"
BACKEND = "onnx-cross-encoder"


@pytest.fixture(scope="module")
def onnx_cache(tmp_path_factory: pytest.TempPathFactory) -> str:
    """One export cache for the module, so each (model, mode) is exported once here."""
    return str(tmp_path_factory.mktemp("onnx-cache"))


def onnx_spec(path: str, cache: str, **options: Any) -> ModelSpec:
    return ModelSpec(path, backend=BACKEND, options={"cache_dir": cache, **options})


def reference(path: str, pairs: list[tuple[str, str]], raw: bool = False, **kw: Any) -> list[float]:
    """CrossEncoder.predict in float32: what the backend must reproduce."""
    import torch
    from sentence_transformers import CrossEncoder

    ce = CrossEncoder(path, device="cpu", model_kwargs={"dtype": torch.float32}, **kw)
    activation = torch.nn.Identity() if raw else None
    return [float(s) for s in ce.predict(pairs, activation_fn=activation, batch_size=16)]


def mixed_pairs(passages: list[str]) -> list[tuple[str, str]]:
    long = " ".join(["the cell converts energy from food into ATP"] * 80)  # truncated
    queries = ["what produces energy in cells", "capital of France", "Qu'est-ce qu'un qubit ?"]
    return [(q, p) for q in queries for p in [*passages, long]]


# -- scores ------------------------------------------------------------------------------------


@pytest.mark.parametrize("which", ["tiny", "real"])
def test_float32_scores_equal_cross_encoder_predict(
    which: str,
    tiny_ce_path: str,
    real_ce_path: str,
    onnx_cache: str,
    passages: list[str],
    pool: ModelPool,
) -> None:
    path = tiny_ce_path if which == "tiny" else real_ce_path
    pairs = mixed_pairs(passages)
    got = pool.score_pairs(onnx_spec(path, onnx_cache), pairs)
    want = reference(path, pairs)
    assert max(abs(a - b) for a, b in zip(got, want, strict=True)) <= 1e-4
    raw = pool.score_pairs(onnx_spec(path, onnx_cache, score_mode="raw"), pairs)
    want_raw = reference(path, pairs, raw=True)
    assert max(abs(a - b) for a, b in zip(raw, want_raw, strict=True)) <= 1e-4
    stats = pool.spec_stats(onnx_spec(path, onnx_cache))
    assert (stats["device"], stats["dtype"]) == ("cpu", "float32")
    # The export computes the last layer for the first token only (what the head reads).
    assert stats["kernels"] == "last layer for the first token only"


def test_max_length_truncates_like_cross_encoder(
    real_ce_path: str, onnx_cache: str, passages: list[str], pool: ModelPool
) -> None:
    pairs = mixed_pairs(passages)
    spec = ModelSpec(
        real_ce_path, backend=BACKEND, max_length=24, options={"cache_dir": onnx_cache}
    )
    got = pool.score_pairs(spec, pairs)
    want = reference(real_ce_path, pairs, max_length=24)
    assert max(abs(a - b) for a, b in zip(got, want, strict=True)) <= 1e-4
    assert pool.get(spec).model.max_tokens == 24


def test_a_model_reading_more_than_512_tokens_exports(
    tmp_path: Path, onnx_cache: str, pool: ModelPool
) -> None:
    """A model with 1024 positions reads a probe of ~800 tokens whole: our pass is padded to a
    length bucket (896), wider than CrossEncoder's; the export check compares the tokens, not
    the padding (it used to refuse every such model, max_length=512 included)."""
    from rag_rerank_plugins.testing import build_cross_encoder

    path = build_cross_encoder(tmp_path / "ce-1024", max_position_embeddings=1024)
    config = json.loads((path / "tokenizer_config.json").read_text())
    (path / "tokenizer_config.json").write_text(json.dumps({**config, "model_max_length": 1024}))
    pairs = [("what is it", "a passage " * 450), ("short", "a short passage")]
    for max_length in (None, 512):
        spec = ModelSpec(
            str(path), backend=BACKEND, max_length=max_length, options={"cache_dir": onnx_cache}
        )
        got = pool.score_pairs(spec, pairs)
        kw = {} if max_length is None else {"max_length": max_length}
        want = reference(str(path), pairs, **kw)
        assert max(abs(a - b) for a, b in zip(got, want, strict=True)) <= 1e-4


def test_two_phase_protocol(tiny_ce_path: str, onnx_cache: str, pool: ModelPool) -> None:
    import numpy as np

    from rag_rerank_plugins.backends.base import Task

    model = pool.get(onnx_spec(tiny_ce_path, onnx_cache)).model
    assert model.thread_safe is False
    task = Task("score")
    items = [("q", "a short passage"), ("query two", "a somewhat longer passage here")]
    batch = model.prepare(task, items)
    assert batch.size == 2
    assert all(v.dtype == np.int64 for v in batch.payload.values())
    assert batch.padded_tokens == batch.payload["input_ids"].size
    # The real tokens too: without them the engine's stats took its length estimate for them
    # (padding_ratio came out negative) and its token scale never learned this tokenizer.
    assert batch.real_tokens == int(batch.payload["attention_mask"].sum())
    assert 0 < batch.real_tokens < batch.padded_tokens  # the short pair is padded
    scores = model.finish(task, model.forward(task, batch))
    assert scores == model.score_pairs(items, batch_size=1)


def test_stats_count_the_tokenizers_real_tokens(
    real_ce_path: str, onnx_cache: str, passages: list[str]
) -> None:
    pool = ModelPool()
    spec = onnx_spec(real_ce_path, onnx_cache)
    pool.score_pairs(spec, mixed_pairs(passages))
    stats = pool.spec_stats(spec)
    assert 0 <= stats["padding_ratio"] < 0.5
    assert stats["token_scale"] != 1.0  # learned from the passes' real counts
    pool.clear()


# -- int8 quality on real text ---------------------------------------------------------------


def scifact_pairs(n_queries: int = 16, per_query: int = 12) -> list[tuple[str, str]]:
    """SciFact test claims x their top passages by word overlap (a cheap BM25 stand-in)."""
    from rag_rerank_plugins.testing import beir_pairs

    if not (SCIFACT / "corpus.jsonl").exists():
        pytest.skip("../shared/data/scifact is not available")
    return beir_pairs(SCIFACT, n_queries, per_query)


def spearman(a: list[float], b: list[float]) -> float:
    import numpy as np

    ra = np.argsort(np.argsort(a)).astype(float)
    rb = np.argsort(np.argsort(b)).astype(float)
    return float(np.corrcoef(ra, rb)[0, 1])


@pytest.fixture(scope="module")
def scifact_quality(real_ce_path: str, onnx_cache: str) -> dict[str, tuple[float, float]]:
    """Per mode: (max |error| / FP32 score range, Spearman) of raw logits vs torch FP32."""
    pairs = scifact_pairs()
    want = reference(real_ce_path, pairs, raw=True, max_length=256)
    pool = ModelPool()
    out = {}
    for mode, options in (("float32", {}), ("int8", {"quantize": "int8"})):
        spec = ModelSpec(
            real_ce_path,
            backend=BACKEND,
            max_length=256,
            options={"cache_dir": onnx_cache, "score_mode": "raw", **options},
        )
        got = pool.score_pairs(spec, pairs)
        error = max(abs(a - b) for a, b in zip(got, want, strict=True)) / (max(want) - min(want))
        out[mode] = (error, spearman(got, want))
    pool.clear()
    print(f"SciFact quality vs torch FP32 ({len(pairs)} pairs): {out}")
    return out


@pytest.mark.slow
def test_float32_quality_on_scifact(scifact_quality: dict[str, tuple[float, float]]) -> None:
    error, rho = scifact_quality["float32"]
    assert error <= 1e-4
    assert rho >= 0.9999


@pytest.mark.slow
def test_int8_quality_on_scifact_measured_envelope(
    scifact_quality: dict[str, tuple[float, float]],
) -> None:
    """int8 stays within what was measured when it was built (10.7 % of the range, Spearman
    0.986); it does NOT meet issue 12's bound (see the xfail below), so it stays opt-in.
    Dynamic quantization scales depend on each pass's contents, so int8 scores also depend
    (slightly) on how requests are batched."""
    error, rho = scifact_quality["int8"]
    assert error <= 0.15
    assert rho >= 0.975


@pytest.mark.slow
@pytest.mark.xfail(
    strict=True,
    reason="dynamic int8 (per-tensor activations) misses issue 12's bound on this model: "
    "max error ~11 % of the FP32 range, Spearman ~0.986 (docs/onnx.md)",
)
def test_int8_meets_issue_quality_bound(scifact_quality: dict[str, tuple[float, float]]) -> None:
    error, rho = scifact_quality["int8"]
    assert error <= 0.02
    assert rho >= 0.99


# -- the export cache ------------------------------------------------------------------------


def test_export_is_cached_across_pools_and_invalidated_by_changed_files(
    tiny_ce_path: str, tmp_path: Path
) -> None:
    model = tmp_path / "model"
    shutil.copytree(tiny_ce_path, model)
    cache = str(tmp_path / "cache")
    spec = onnx_spec(str(model), cache)
    pairs = [("q", "a passage"), ("another query", "another passage, longer")]

    first, second = ModelPool(), ModelPool()
    before = onnx_backend.export_count()
    scores = first.score_pairs(spec, pairs)
    assert onnx_backend.export_count() == before + 1
    entries = [p for p in Path(cache).iterdir() if not p.name.startswith(".")]
    assert len(entries) == 1
    assert not [p for p in Path(cache).iterdir() if p.name.startswith(".tmp-")]
    mtime = (entries[0] / "model.onnx").stat().st_mtime_ns

    assert second.score_pairs(spec, pairs) == scores  # a second pool: reused, not exported
    assert onnx_backend.export_count() == before + 1
    assert (entries[0] / "model.onnx").stat().st_mtime_ns == mtime
    first.clear()
    second.clear()

    config = json.loads((model / "config.json").read_text())
    config["rag_rerank_test_marker"] = 1  # a changed model file -> a new export
    (model / "config.json").write_text(json.dumps(config))
    third = ModelPool()
    third.score_pairs(spec, pairs)
    third.clear()
    assert onnx_backend.export_count() == before + 2
    assert len([p for p in Path(cache).iterdir() if not p.name.startswith(".")]) == 2

    third = ModelPool()  # int8 is its own entry
    third.score_pairs(onnx_spec(str(model), cache, quantize="int8"), pairs)
    third.clear()
    assert onnx_backend.export_count() == before + 3

    full = ModelPool()  # so is the full last layer, with the same scores
    unpruned = onnx_spec(str(model), cache, prune_last_layer=False)
    assert full.score_pairs(unpruned, pairs) == pytest.approx(
        third.score_pairs(spec, pairs), abs=1e-5
    )
    assert full.spec_stats(unpruned)["kernels"] == ""
    full.clear()
    assert onnx_backend.export_count() == before + 4


def test_second_process_reuses_the_export_without_torch(
    tiny_ce_path: str, onnx_cache: str, pool: ModelPool
) -> None:
    pairs = [("q", "a passage"), ("another query", "another passage, longer")]
    scores = pool.score_pairs(onnx_spec(tiny_ce_path, onnx_cache), pairs)  # exported (or cached)
    code = textwrap.dedent(
        f"""
        import json, sys
        from rag_rerank_plugins import ModelPool, ModelSpec
        from rag_rerank_plugins.backends import onnx
        spec = ModelSpec({tiny_ce_path!r}, backend="onnx-cross-encoder",
                         options={{"cache_dir": {onnx_cache!r}}})
        scores = ModelPool().score_pairs(spec, {pairs!r})
        print(json.dumps([scores, onnx.export_count(), "torch" in sys.modules]))
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    got, exports, torch_imported = json.loads(out.stdout.strip().splitlines()[-1])
    assert exports == 0
    assert torch_imported is False
    assert got == pytest.approx(scores, abs=1e-6)


def test_publish_keeps_the_winner_of_a_race(tmp_path: Path) -> None:
    final = tmp_path / "entry"
    final.mkdir()
    (final / "meta.json").write_text("{}")
    loser = tmp_path / ".tmp-entry-x"
    loser.mkdir()
    (loser / "meta.json").write_text('{"loser": true}')
    publish(loser, final)
    assert not loser.exists()
    assert (final / "meta.json").read_text() == "{}"


def test_fingerprint_follows_contents_of_small_files(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / ".git").mkdir()
    (tmp_path / ".git" / "HEAD").write_text("x")
    first = onnx_backend.model_fingerprint(tmp_path)
    (tmp_path / ".git" / "HEAD").write_text("y")  # hidden folders do not count
    assert onnx_backend.model_fingerprint(tmp_path) == first
    (tmp_path / "config.json").write_text('{"a": 1}')
    assert onnx_backend.model_fingerprint(tmp_path) != first


def test_fingerprint_keys_hub_cache_weights_by_their_blob_name(tmp_path: Path) -> None:
    """A weights file linked into a Hugging Face hub cache is keyed by its blob's name (the
    content hash): a new revision's same-size weights with the same mtime are a new key, and a
    cache copied without its mtimes keeps its keys. Plain files stay keyed by size and mtime."""
    import hashlib

    blobs, snapshot = tmp_path / "blobs", tmp_path / "snapshots" / "rev"
    blobs.mkdir()
    snapshot.mkdir(parents=True)

    def blob(fill: bytes) -> Path:
        data = fill * (5 * 1024 * 1024)  # over the 4 MiB hashed by content
        path = blobs / hashlib.sha256(data).hexdigest()
        path.write_bytes(data)
        return path

    def link(target: Path) -> None:
        weights = snapshot / "model.safetensors"
        weights.unlink(missing_ok=True)
        weights.symlink_to(os.path.relpath(target, snapshot))

    first, second = blob(b"a"), blob(b"b")
    os.utime(second, ns=(first.stat().st_atime_ns, first.stat().st_mtime_ns))
    link(first)
    key = onnx_backend.model_fingerprint(snapshot)
    os.utime(first, ns=(1, 1))  # copied without its mtimes
    assert onnx_backend.model_fingerprint(snapshot) == key
    link(second)  # a new revision: same size, same mtime
    assert onnx_backend.model_fingerprint(snapshot) != key
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "model.safetensors").write_bytes(first.read_bytes())
    before = onnx_backend.model_fingerprint(plain)
    os.utime(plain / "model.safetensors", ns=(2, 2))  # `touch` forces a new export
    assert onnx_backend.model_fingerprint(plain) != before


# -- missing extra ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "call",
    [
        "SharedRerankCompressor(model={ce!r}, backend='onnx-cross-encoder')"
        ".compress_documents([Document(page_content='p')], 'q')",
        "SharedEmbeddings(model={minilm!r}, backend='onnx-sentence-transformers').embed_query('q')",
    ],
    ids=["cross-encoder", "embedder"],
)
def test_missing_onnxruntime_raises_missing_dependency_error(
    call: str, tiny_ce_path: str, minilm_path: str
) -> None:
    """Both ONNX backends, through an adapter: the error names the extra to install."""
    pytest.importorskip("langchain_core")
    code = textwrap.dedent(
        """
        import importlib.abc, sys

        class _Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name == "onnxruntime" or name.startswith("onnxruntime."):
                    raise ImportError(f"No module named {name!r} (blocked)", name=name)
                return None

        sys.meta_path.insert(0, _Block())
        from langchain_core.documents import Document
        from rag_rerank_plugins import MissingDependencyError
        from rag_rerank_plugins.langchain import SharedEmbeddings, SharedRerankCompressor

        try:
            CALL
        except MissingDependencyError as exc:
            assert isinstance(exc, ImportError)
            print("OK", exc.extra, exc)
        """
    ).replace("CALL", call.format(ce=tiny_ce_path, minilm=minilm_path))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("OK onnx ")
    assert "rag-rerank-plugins[onnx]" in out.stdout


# -- options ---------------------------------------------------------------------------------


def test_options_are_checked(tiny_ce_path: str, onnx_cache: str, pool: ModelPool) -> None:
    from rag_rerank_plugins.backends import available_backends

    assert available_backends()[BACKEND].options == onnx_backend.OPTIONS
    check_options(BACKEND, {"quantize": "int8", "intra_op_threads": 1, "cache_dir": "/x"})
    with pytest.raises(ConfigurationError, match="Accepted"):
        check_options(BACKEND, {"quantise": "int8"})
    bad = [
        ModelSpec(tiny_ce_path, backend=BACKEND, dtype="bfloat16"),
        ModelSpec(tiny_ce_path, backend=BACKEND, device="cuda"),
        onnx_spec(tiny_ce_path, onnx_cache, quantize="int4"),
        onnx_spec(tiny_ce_path, onnx_cache, intra_op_threads=0),
        onnx_spec(tiny_ce_path, onnx_cache, opset=3),
        onnx_spec(tiny_ce_path, onnx_cache, score_mode="softmax"),
    ]
    for spec in bad:
        with pytest.raises(ConfigurationError):
            pool.get(spec)


def test_thread_policy(
    tiny_ce_path: str, onnx_cache: str, pool: ModelPool, monkeypatch: pytest.MonkeyPatch
) -> None:
    cores = onnx_backend.default_threads()
    assert 1 <= cores <= (os.cpu_count() or 1)
    assert pool.get(onnx_spec(tiny_ce_path, onnx_cache)).model.threads == cores
    assert pool.get(onnx_spec(tiny_ce_path, onnx_cache, intra_op_threads=1)).model.threads == 1
    monkeypatch.setenv(onnx_backend.THREADS_ENV, "3")
    spec = onnx_spec(tiny_ce_path, onnx_cache, opset=17)  # a new key: loads under the env var
    assert pool.get(spec).model.threads == 3
    monkeypatch.setenv(onnx_backend.THREADS_ENV, "many")
    with pytest.raises(ConfigurationError, match=onnx_backend.THREADS_ENV):
        pool.get(onnx_spec(tiny_ce_path, onnx_cache, opset=16))


def test_cache_dir_from_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(onnx_backend.CACHE_ENV, str(tmp_path))
    assert onnx_backend.default_cache_dir() == tmp_path
    monkeypatch.delenv(onnx_backend.CACHE_ENV)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert onnx_backend.default_cache_dir() == tmp_path / "xdg" / "rag-rerank-plugins" / "onnx"


# -- adapters and concurrency ----------------------------------------------------------------


def test_adapters_accept_the_onnx_backend(
    tiny_ce_path: str, onnx_cache: str, passages: list[str], pool: ModelPool
) -> None:
    pytest.importorskip("langchain_core")
    pytest.importorskip("llama_index.core")
    from langchain_core.documents import Document
    from llama_index.core.schema import NodeWithScore, TextNode

    from rag_rerank_plugins.langchain import SharedRerankCompressor
    from rag_rerank_plugins.llama_index import SharedRerankPostprocessor

    query = "where does the cell get energy"
    want = reference(tiny_ce_path, [(query, p) for p in passages])
    best = sorted(zip(want, passages, strict=True), reverse=True)
    kw = {"backend": BACKEND, "model_kwargs": {"cache_dir": onnx_cache}, "pool": pool}

    comp = SharedRerankCompressor(model=tiny_ce_path, top_n=3, **kw)
    docs = comp.compress_documents([Document(page_content=p) for p in passages], query)
    assert [d.page_content for d in docs] == [p for _, p in best[:3]]
    assert docs[0].metadata["relevance_score"] == pytest.approx(best[0][0], abs=1e-4)

    post = SharedRerankPostprocessor(model=tiny_ce_path, top_n=3, **kw)
    nodes = [NodeWithScore(node=TextNode(text=p), score=0.0) for p in passages]
    out = post.postprocess_nodes(nodes, query_str=query)
    assert [n.node.get_content() for n in out] == [p for _, p in best[:3]]
    assert pool.spec_stats(comp.spec)["loads"] == 1  # both adapters share one model


def test_16_threads_load_once_and_match_sequential(
    tiny_ce_path: str, onnx_cache: str, passages: list[str], pool: ModelPool
) -> None:
    spec = onnx_spec(tiny_ce_path, onnx_cache)
    requests = [[(f"query {i} " * (i % 5 + 1), p) for p in passages] for i in range(32)]
    with ThreadPoolExecutor(16) as ex:
        concurrent = list(ex.map(lambda r: pool.score_pairs(spec, r), requests))
    assert pool.spec_stats(spec)["loads"] == 1
    sequential = [pool.score_pairs(spec, r) for r in requests]
    for got, want in zip(concurrent, sequential, strict=True):
        assert got == pytest.approx(want, abs=1e-6)


# -- a graph with fewer inputs than the tokenizer gives ----------------------------------------


@pytest.fixture(scope="module")
def distil_ce_path(tmp_path_factory: pytest.TempPathFactory, minilm_path: str) -> str:
    """A random DistilBERT cross-encoder with a BERT tokenizer: the tokenizer gives
    ``token_type_ids``, the model never reads them, so the exporter drops that input."""
    import torch
    from transformers import AutoTokenizer, DistilBertConfig, DistilBertForSequenceClassification

    tok = AutoTokenizer.from_pretrained(minilm_path)
    assert "token_type_ids" in tok.model_input_names
    torch.manual_seed(0)
    config = DistilBertConfig(
        vocab_size=tok.vocab_size, dim=32, n_layers=2, n_heads=2, hidden_dim=64, num_labels=1
    )
    path = tmp_path_factory.mktemp("models") / "distil-ce"
    DistilBertForSequenceClassification(config).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


@pytest.mark.parametrize("backend", ["onnx-cross-encoder", "openvino-cross-encoder"])
def test_model_that_ignores_token_types_loads_and_scores_like_predict(
    backend: str, distil_ce_path: str, onnx_cache: str, pool: ModelPool
) -> None:
    """onnxruntime refuses a feed the graph lacks: the backend feeds the graph's inputs, which
    the export records (before: 'Invalid input name: token_type_ids' at the load's check)."""
    if backend.startswith("openvino"):
        pytest.importorskip("openvino")
    pairs = [("q", "a short passage"), ("another query", "a longer passage with more words")]
    spec = ModelSpec(distil_ce_path, backend=backend, options={"cache_dir": onnx_cache})
    got = pool.score_pairs(spec, pairs)
    assert got == pytest.approx(reference(distil_ce_path, pairs), abs=1e-4)
    model = pool.get(spec).model
    model = getattr(model, "inner", model)  # OpenVINO wraps its ONNX twin
    assert model.meta["feeds"] == ["input_ids", "attention_mask"]


def test_entry_without_recorded_feeds_asks_the_session(
    distil_ce_path: str, onnx_cache: str, tmp_path: Path, pool: ModelPool
) -> None:
    """Entries exported before the feeds were recorded still open: the session names them."""
    spec = ModelSpec(distil_ce_path, backend=BACKEND, options={"cache_dir": onnx_cache})
    entry = Path(pool.get(spec).model.path)
    want = pool.score_pairs(spec, [("q", "p")])
    old = tmp_path / "old-entry"
    shutil.copytree(entry, old)
    meta = json.loads((old / "meta.json").read_text())
    del meta["feeds"]
    (old / "meta.json").write_text(json.dumps(meta))
    model = onnx_backend.OnnxCrossEncoder(old, threads=1)
    assert model.score_pairs([("q", "p")], batch_size=4) == pytest.approx(want, abs=1e-6)
    model.close()


@pytest.mark.parametrize("backend", ["onnx-cross-encoder", "onnx-sentence-transformers"])
def test_max_length_above_the_position_table_truncates_there(
    backend: str, tiny_ce_path: str, minilm_path: str, onnx_cache: str, pool: ModelPool
) -> None:
    """max_length=1024 on a 512-position model failed every pass holding a long text inside
    onnxruntime ("Attempting to broadcast an axis ..."); it is truncated at the table, with the
    same results as max_length=512, as the torch backends do."""
    path = tiny_ce_path if backend == "onnx-cross-encoder" else minilm_path
    long_text = "word " * 900
    options = {"cache_dir": onnx_cache}
    over = ModelSpec(path, backend=backend, max_length=1024, options=options)
    at = ModelSpec(path, backend=backend, max_length=512, options=options)
    if backend == "onnx-cross-encoder":
        pairs = [("q", long_text), ("q", "short")]
        assert pool.score_pairs(over, pairs) == pool.score_pairs(at, pairs)
    else:
        texts = [long_text, "short"]
        assert pool.embed(over, texts) == pool.embed(at, texts)
    assert pool.get(over).model.max_tokens == 512
