"""SemanticCache under a hostile service life: files reset under it, event loops next to an index
build, embedders that differ only where their labels are redacted, thresholds below the floor.

Each test is a bug a hostile tester found (and confirmed) in a running service:

* a SQLite file deleted and created again (an operator's reset), or restored from a backup,
  while a cache held an index of the old one: ids restart, and the old index named another
  tenant's rows, answered under the asked namespace;
* the build of the usearch index (seconds) held the cache's lock, and an ``alookup`` on a memory
  store, which runs inline on the event loop, waited for it: a 15 s stall of every coroutine;
* two remote embedders whose URLs differ only in a query string or userinfo shared one cache
  identity (the label, which redacts both), so one answered from the other's vectors;
* the candidate floor (cosine 0.5) applied whatever the threshold, so ``guard="dense"`` at 0.3
  never hit at cosine 0.4, and ``explain()`` said nothing.
"""

from __future__ import annotations

import asyncio
import shutil
import sqlite3
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from rag_rerank_plugins import ModelPool
from rag_rerank_plugins.semantic_cache import SemanticCache
from rag_rerank_plugins.semantic_cache import index as index_module
from rag_rerank_plugins.semantic_cache.stores import Entry, MemoryStore
from rag_rerank_plugins.spec import ModelSpec
from rag_rerank_plugins.testing import fake_embedder_spec

FAKE = fake_embedder_spec(dim=1024)
ART_72 = "What does Art. 72 say?"
SECRET = "secret question of tenant B"


def _sqlite_cache(path: Path, pool: ModelPool) -> SemanticCache:
    return SemanticCache(FAKE, pool=pool, guard="dense", threshold=0.99, store=f"sqlite:///{path}")


def _remove_files(folder: Path) -> None:
    for file in folder.iterdir():
        file.unlink()


# -- a replaced SQLite file --------------------------------------------------------------------


def test_a_recreated_sqlite_file_is_indexed_anew_never_read_under_old_ids(tmp_path: Path) -> None:
    pool = ModelPool()
    path = tmp_path / "cache.db"
    a = _sqlite_cache(path, pool)
    assert a.put(ART_72, "ANSWER-72", namespace="tenant-A")
    a.close()
    _remove_files(tmp_path)  # an operator resets the cache; another worker stores its answer
    assert _sqlite_cache(path, pool).put(SECRET, "SECRET-B", namespace="tenant-B")
    # ``a`` reconnects to the new file (as after close() or in a forked worker): it sees the new
    # file's entries where they belong, and nothing of the old file.
    hit = a.lookup(SECRET, namespace="tenant-B")
    assert hit is not None
    assert (hit.value, hit.namespace) == ("SECRET-B", "tenant-B")
    assert a.lookup(ART_72, namespace="tenant-A") is None


def test_a_file_restored_from_a_backup_never_answers_another_tenants_row(tmp_path: Path) -> None:
    """A backup shares the file's id, so only the row check can tell: the rows stored after the
    backup was taken get ids that the index already holds for other questions."""
    pool = ModelPool()
    path, backup = tmp_path / "cache.db", tmp_path / "backup.db"
    a = _sqlite_cache(path, pool)
    assert a.put("first question", "FIRST", namespace="tenant-B")
    a.close()  # the WAL is checkpointed: the file alone is the database
    shutil.copy(path, backup)
    assert a.put(ART_72, "ANSWER-72", namespace="tenant-A")  # the next id, in the index
    a.close()
    for suffix in ("-wal", "-shm"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)
    shutil.copy(backup, path)  # restored: ids go on from the backup's
    assert _sqlite_cache(path, pool).put(SECRET, "SECRET-B", namespace="tenant-B")
    assert a.lookup(ART_72, namespace="tenant-A") is None
    # The mismatch rebuilt the index from the file: the restored and new entries are found.
    hit = a.lookup(SECRET, namespace="tenant-B")
    assert hit is not None
    assert hit.value == "SECRET-B"
    assert a.lookup(ART_72, namespace="tenant-A") is None


def test_a_store_answering_another_row_under_a_known_id_is_a_miss() -> None:
    """Whatever the store: a row of another namespace or question under an indexed id is never
    returned as a hit (the row check in the lookup, not the store's cursor)."""

    class MixedUp(MemoryStore):
        def get(self, ids: Any) -> dict[int, Entry]:
            found = super().get(ids)
            return {k: Entry(k, e.model, "tenant-B", SECRET, e.vector, b'"SECRET-B"', False,
                             e.created) for k, e in found.items()}  # fmt: skip

    cache = SemanticCache(FAKE, pool=ModelPool(), guard="dense", threshold=0.99, store=MixedUp())
    assert cache.put(ART_72, "ANSWER-72", namespace="tenant-A")
    assert cache.lookup(ART_72, namespace="tenant-A") is None


# -- the usearch build and the event loop ------------------------------------------------------


async def test_lookups_on_the_loop_never_wait_for_the_usearch_build(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    pytest.importorskip("usearch")
    monkeypatch.setattr(index_module, "AUTO_ANN_SIZE", 20)
    started, finish = threading.Event(), threading.Event()
    real_add_many = index_module.UsearchIndex.add_many

    def slow_add_many(self: Any, keys: list[int], vectors: np.ndarray) -> None:
        started.set()
        finish.wait(3)  # a build of seconds, over until the test has looked up (or 3 s)
        real_add_many(self, keys, vectors)

    monkeypatch.setattr(index_module.UsearchIndex, "add_many", slow_add_many)
    cache = SemanticCache(fake_embedder_spec(dim=16), pool=ModelPool(), max_entries=None)
    for i in range(20):
        assert cache.put(f"question number {i}", i, namespace="n")
    replaced = cache._by_text[("n", "question number 3")]

    gaps: list[float] = []

    async def loop_lag() -> None:
        last = time.perf_counter()
        while True:
            await asyncio.sleep(0.005)
            now = time.perf_counter()
            gaps.append(now - last)
            last = now

    probe_start = time.perf_counter()
    probe = asyncio.create_task(loop_lag())
    build = asyncio.create_task(cache.aput("one more question", 20, namespace="n"))
    assert await asyncio.to_thread(started.wait, 5)
    t0 = time.perf_counter()
    hit = await cache.alookup("question number 7", namespace="n")
    lookup_s = time.perf_counter() - t0
    # Changes while the build runs: the swap must replay them.
    assert await cache.aput("asked during the build", "new", namespace="n")
    assert await cache.aput("question number 3", "replaced", namespace="n")
    finish.set()
    assert await build
    probe.cancel()
    assert lookup_s < 2.0, f"alookup waited {lookup_s:.1f} s for the build"
    # No tick at all: everything ran within one 5 ms tick, or the loop stalled throughout.
    stall = max(gaps, default=time.perf_counter() - probe_start)
    assert stall < 2.0, f"the event loop stalled {stall:.1f} s"
    assert hit is not None
    assert hit.value == 7
    index = cache._indexes["n"]
    assert type(index._impl).__name__ == "UsearchIndex"
    assert len(index) == 22
    assert replaced not in index
    again = await cache.alookup("asked during the build", namespace="n")
    assert again is not None
    assert again.value == "new"
    again = await cache.alookup("question number 3", namespace="n")
    assert again is not None
    assert again.value == "replaced"


# -- the cache identity of remote embedders ----------------------------------------------------


class GatewayPool(ModelPool):
    """Every embedder behind one (fake) gateway: the vectors of the fake embedder, whatever the
    spec, so two deployments agree on every vector and only the cache identity tells them
    apart."""

    def embed(self, spec: ModelSpec, texts: Sequence[str], *args: Any, **kwargs: Any) -> Any:
        return super().embed(FAKE, texts, *args, **kwargs)

    async def aembed(self, spec: ModelSpec, texts: Sequence[str], *args: Any, **kwargs: Any) -> Any:
        return await super().aembed(FAKE, texts, *args, **kwargs)


@pytest.mark.parametrize(
    ("url_a", "url_b"),
    [
        ("http://gw:8080/embed?deployment=small-v1", "http://gw:8080/embed?deployment=multi-v2"),
        ("http://alice:pw1@gw:8080/embed", "http://bob:pw2@gw:8080/embed"),
    ],
)
def test_embedders_differing_only_where_the_label_redacts_never_share_answers(
    tmp_path: Path, url_a: str, url_b: str
) -> None:
    pool, store = GatewayPool(), f"sqlite:///{tmp_path / 'cache.db'}"
    a = SemanticCache(ModelSpec(url_a, backend="remote-embedder", device="cpu"), pool=pool,
                      store=store)  # fmt: skip
    b = SemanticCache(ModelSpec(url_b, backend="remote-embedder", device="cpu"), pool=pool,
                      store=store)  # fmt: skip
    assert a.put("What is the refund policy?", "from deployment A")
    assert b.lookup("What is the refund policy?") is None
    hit = a.lookup("What is the refund policy?")
    assert hit is not None
    assert hit.value == "from deployment A"
    # The identity in the file is the redacted label and a digest: no credentials.
    with sqlite3.connect(tmp_path / "cache.db") as db:
        (model,) = db.execute("SELECT model FROM entries").fetchone()
    assert model.startswith(a.embedder.label + "#")
    for secret in ("pw1", "pw2", "alice", "small-v1"):
        assert secret not in model


def test_entries_of_an_embedder_whose_label_hides_nothing_stay_readable() -> None:
    """Entries stored by an earlier version under the label (the identity then) still hit."""
    store = MemoryStore()
    vector = np.asarray(ModelPool().embed(FAKE, ["a cached question"], is_query=True,
                                          normalize=True)[0], dtype=np.float32)  # fmt: skip
    store.put(Entry(0, FAKE.label, "default", "a cached question", vector, b'"old"', False,
                    time.time()), max_entries=None, ttl=None)  # fmt: skip
    hit = SemanticCache(FAKE, pool=ModelPool(), store=store).lookup("a cached question")
    assert hit is not None
    assert hit.value == "old"


# -- the candidate floor -----------------------------------------------------------------------

WIDE = fake_embedder_spec(dim=4096)
STORED, ASKED = "alpha bravo charlie delta echo", "alpha bravo foxtrot golf hotel"


def test_a_dense_threshold_below_the_floor_means_what_it_says() -> None:
    pool = ModelPool()
    va, vb = (np.asarray(v) for v in pool.embed(WIDE, [STORED, ASKED], is_query=True,
                                                normalize=True))  # fmt: skip
    assert float(va @ vb) == pytest.approx(0.4, abs=0.01)
    cache = SemanticCache(WIDE, pool=pool, guard="dense", threshold=0.3)
    assert cache.put(STORED, "A")
    hit = cache.lookup(ASKED)
    assert hit is not None
    assert hit.value == "A"
    [verdict] = cache.explain(ASKED)
    assert verdict.passed
    assert verdict.score == pytest.approx(0.4, abs=0.01)


def test_explain_names_the_candidates_the_floor_cut() -> None:
    """``hybrid`` keeps the floor as a pre-filter (documented): a lookup misses, and explain()
    says why instead of returning nothing."""
    cache = SemanticCache(WIDE, pool=ModelPool(), guard="hybrid", threshold=0.3)
    assert cache.put(STORED, "A")
    assert cache.lookup(ASKED) is None
    [verdict] = cache.explain(ASKED)
    assert verdict.reason == "floor"
    assert verdict.candidate.query == STORED
    assert verdict.candidate.dense == pytest.approx(0.4, abs=0.01)
