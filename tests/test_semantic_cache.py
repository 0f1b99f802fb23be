"""SemanticCache (issue 23): the guards on real MiniLM embeddings, the stores, bad input, failures.

Quality tests use the packaged all-MiniLM-L6-v2 and the shipped labelled pairs
(tests/data/semantic_cache_pairs.jsonl); store and API tests use the fake embedder (hashed bag of
words through the real pool), so they run in milliseconds. The SQLite sharing and crash tests use
real subprocesses.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rag_rerank_plugins import ModelPool, ModelSpec
from rag_rerank_plugins.exceptions import ConfigurationError, InvalidInputError
from rag_rerank_plugins.semantic_cache import (
    GUARDS,
    CacheHit,
    MemoryStore,
    SemanticCache,
    SQLiteStore,
)
from rag_rerank_plugins.semantic_cache import core as core_module
from rag_rerank_plugins.semantic_cache.identity import disagreement, extract
from rag_rerank_plugins.semantic_cache.index import ExactIndex, UsearchIndex
from rag_rerank_plugins.testing import fake_embedder_spec, fake_reranker_spec

PAIRS = Path(__file__).parent / "data" / "semantic_cache_pairs.jsonl"
MUST_MISS_ZERO = ("number", "article", "date", "code")
FAKE = fake_embedder_spec(dim=1024)
SRC = str(Path(__file__).resolve().parents[1] / "src")


@pytest.fixture(scope="module")
def minilm_pool() -> ModelPool:
    fresh = ModelPool()
    yield fresh
    fresh.clear()


@pytest.fixture(scope="module")
def minilm_spec(minilm_path: str) -> ModelSpec:
    return ModelSpec(minilm_path, backend="sentence-transformers", device="cpu", dtype="float32")


def fake_cache(**kwargs: object) -> SemanticCache:
    kwargs.setdefault("guard", "dense")
    kwargs.setdefault("threshold", 0.99)
    return SemanticCache(FAKE, pool=ModelPool(), **kwargs)  # type: ignore[arg-type]


# -- quality on real embeddings ------------------------------------------------------------------


def test_seed_004_article_case(minilm_spec: ModelSpec, minilm_pool: ModelPool) -> None:
    cache = SemanticCache(minilm_spec, pool=minilm_pool)
    cache.put("O que diz o Art. 72?", {"answer": "art. 72"}, namespace="legal")
    assert cache.lookup("O que diz o Art. 75?", namespace="legal") is None
    hit = cache.lookup("O que diz o artigo 72?", namespace="legal")
    assert isinstance(hit, CacheHit)
    assert hit.value == {"answer": "art. 72"}
    assert hit.query == "O que diz o Art. 72?"
    assert hit.namespace == "legal"
    assert hit.age_s >= 0
    assert cache.lookup("O que diz o artigo 72?", namespace="other") is None
    stats = cache.stats()
    assert (stats["hits"], stats["misses"], stats["guard_rejections"]) == (1, 2, 1)


def test_dense_guard_shows_the_false_hit(minilm_spec: ModelSpec, minilm_pool: ModelPool) -> None:
    """Why the hybrid guard exists: at a usual cosine threshold the dense guard answers Art. 75
    with Art. 72's answer."""
    cache = SemanticCache(minilm_spec, guard="dense", threshold=0.9, pool=minilm_pool)
    cache.put("O que diz o Art. 72?", "art. 72")
    hit = cache.lookup("O que diz o Art. 75?")
    assert hit is not None
    assert hit.value == "art. 72"
    assert hit.score > 0.9


def test_labelled_pairs_hybrid(minilm_spec: ModelSpec, minilm_pool: ModelPool) -> None:
    pairs = [json.loads(line) for line in PAIRS.read_text(encoding="utf-8").splitlines()]
    kinds = {p["kind"] for p in pairs}
    assert len(pairs) >= 200
    assert {"paraphrase", "entity", "negation", *MUST_MISS_ZERO} <= kinds
    assert {p["lang"] for p in pairs} == {"en", "pt"}
    cache = SemanticCache(minilm_spec, pool=minilm_pool, max_entries=None)
    for cached in dict.fromkeys(p["cached"] for p in pairs):
        cache.put(cached, cached, namespace="eval")
    false_hits: dict[str, list[str]] = {k: [] for k in kinds}
    paraphrase_hits = 0
    for p in pairs:
        hit = cache.lookup(p["query"], namespace="eval")
        if p["kind"] == "paraphrase":
            paraphrase_hits += hit is not None and hit.value == p["cached"]
        elif hit is not None and hit.value != p["query"]:
            false_hits[p["kind"]].append(f"{p['query']!r} -> {hit.value!r}")
    n_para = sum(p["kind"] == "paraphrase" for p in pairs)
    for kind in MUST_MISS_ZERO:
        assert false_hits[kind] == [], kind
    assert paraphrase_hits / n_para >= 0.8
    # Entities and negations are no floor of the issue, but the shipped set has none either.
    assert false_hits["entity"] == false_hits["negation"] == []


@pytest.mark.parametrize(
    ("a", "b", "reason"),
    [
        ("O que diz o Art. 72?", "O que diz o artigo 72?", None),
        ("O que diz o Art. 72?", "O que diz o Art. 75?", "numbers"),
        ("O que diz o inciso IV?", "O que diz o inciso 4?", None),
        ("O que diz o inciso IV?", "O que diz o inciso V?", "numbers"),
        ("O que diz a alínea a?", "O que diz a alínea b?", "codes"),
        ("Lei 8.078", "lei 8078", None),
        ("Python 3.10", "Python 3.1", "numbers"),
        ("inflation in May 2023", "inflation in 05/2023", None),
        ("error E11000", "error E11001", "numbers"),
        ("error E11000", "error F11000", "codes"),
        ("forecast for today", "forecast for tomorrow", "codes"),
        ("Quais alimentos têm glúten?", "Quais alimentos não têm glúten?", "negation"),
        ("Can I travel with a passport?", "Can I travel without a passport?", "negation"),
        ("Why does it crash?", "Why doesn't it crash?", "negation"),
        (
            "O que diz o artigo no código?",
            "O que diz o art. no código?",
            None,
        ),  # pt "no" = "in the"
        ("Which foods contain gluten?", "Which foods contain no gluten?", "negation"),
        ("What is the capital of France?", "What is the capital of Germany?", "entities"),
        ("What is France's capital?", "Which city is the capital of France?", None),
        # ordinals are numbers; "first" = "1st"
        ("Who was the first president of Brazil?", "Who was the second president?", "numbers"),
        ("Who was the first president of Brazil?", "Who was the 1st president of Brazil?", None),
        ("Quem foi a primeira presidente?", "Quem foi a segunda presidente?", "numbers"),
        ("Which one is cheaper?", "Which is cheaper?", "numbers"),  # a miss, never a wrong hit
        # numbers written as one symbol
        ("How much is ½ cup in grams?", "How much is ¼ cup in grams?", "numbers"),
        ("What is x² here?", "What is x³ here?", "numbers"),
        ("How much is ½ cup in grams?", "How much is 0.5 cup in grams?", None),
        # opposite sides of one contrast; one side against none is a paraphrase
        ("What is the minimum wage in Brazil?", "What is the maximum wage in Brazil?", "contrast"),
        ("What should I do before surgery?", "What should I do after surgery?", "contrast"),
        ("How to increase blood pressure?", "How to decrease blood pressure?", "contrast"),
        ("O que fazer antes da cirurgia?", "O que fazer depois da cirurgia?", "contrast"),
        ("How do I enable 2FA?", "How can I turn on 2FA?", None),
        ("How do I enable 2FA?", "How do I disable 2FA?", "contrast"),
        # two names with a direction between them
        (
            "How do I convert Celsius to Fahrenheit?",
            "How do I convert Fahrenheit to Celsius?",
            "codes",
        ),
        ("Is Python faster than Java?", "Is Java faster than Python?", "codes"),
        ("How do I convert Celsius to Fahrenheit?", "Convert Celsius into Fahrenheit", None),
        # numbers in text order: swapped, they ask something else (a multiset saw one question)
        ("What happened on 05/06/2023?", "What happened on 06/05/2023?", "numbers"),
        ("Is 2023-05-06 a holiday in Brazil?", "Is 2023-06-05 a holiday in Brazil?", "numbers"),
        ("O que diz o Art. 72, § 5?", "O que diz o Art. 5, § 72?", "numbers"),
        ("What is 7 minus 3?", "What is 3 minus 7?", "numbers"),
        # a sign and a leading point are part of the number
        ("Is a .5 mg dose of warfarin safe?", "Is a 5 mg dose of warfarin safe?", "numbers"),
        ("Is a .5 mg dose safe?", "Is a 0.5 mg dose safe?", None),
        ("Water at -10 degrees Celsius?", "Water at 10 degrees Celsius?", "numbers"),
        ("Pages 10-20 of CVE-2021-44228", "pages 10-20 of CVE-2021-44228", None),
        # symbols: an embedder reads them as one unknown token, BM25 drops them
        ("How much does 🍕 cost?", "How much does 🍔 cost?", "codes"),
        ("What is 🇫🇷's capital?", "What is 🇩🇪's capital?", "codes"),
        ("price of item Ⅻ", "price of item Ⅸ", "numbers"),
        ("price of item Ⅻ", "price of item 12", None),
        # English "Do" does not make "no" Portuguese
        (
            "Do children with no fever need antibiotics?",
            "Do children with fever need antibiotics?",
            "negation",
        ),
    ],
)
def test_identity_tokens(a: str, b: str, reason: str | None) -> None:
    assert disagreement(extract(a), extract(b)) == reason
    assert disagreement(extract(b), extract(a)) == reason


def test_rerank_guard_uses_the_shared_cross_encoder() -> None:
    pool = ModelPool()
    cache = SemanticCache(FAKE, guard="rerank", reranker=fake_reranker_spec(), threshold=0.8,
                          pool=pool)  # fmt: skip
    cache.put("reset my password please", "steps")
    # fake reranker: share of the new query's words found in the cached query
    assert cache.lookup("reset my password") is not None  # 3/3
    assert cache.lookup("reset my email password") is None  # 3/4 < 0.8
    assert cache.explain("reset my email password")[0].score == pytest.approx(0.75)
    assert pool.spec_stats(fake_reranker_spec())["calls"] == 3


# -- API, bad input, failures --------------------------------------------------------------------


def test_bad_input_and_settings() -> None:
    cache = fake_cache()
    for query in ("", "   ", None, 3):
        with pytest.raises(InvalidInputError, match="non-empty str"):
            cache.lookup(query)  # type: ignore[arg-type]
    with pytest.raises(InvalidInputError, match="namespace"):
        cache.lookup("q", namespace=42)  # type: ignore[arg-type]
    with pytest.raises(InvalidInputError, match="JSON-serialisable"):
        cache.put("q", object())
    with pytest.raises(InvalidInputError, match="JSON-serialisable"):
        cache.put("q", float("nan"))
    assert cache.stats()["puts"] == 0
    with pytest.raises(ConfigurationError, match="guard"):
        SemanticCache(FAKE, guard="cosine")
    with pytest.raises(ConfigurationError, match="store"):
        SemanticCache(FAKE, store="redis://x")
    with pytest.raises(ConfigurationError, match="index"):
        SemanticCache(FAKE, index="faiss")
    with pytest.raises(ConfigurationError, match="embedder"):
        SemanticCache(fake_reranker_spec())
    with pytest.raises(ConfigurationError, match="max_entries"):
        SemanticCache(FAKE, max_entries=0)
    with pytest.raises(ConfigurationError, match="ttl"):
        SemanticCache(FAKE, ttl=-1)
    assert set(GUARDS) == {"hybrid", "rerank", "dense"}


def test_values_round_trip_and_newest_answer_wins() -> None:
    cache = fake_cache()
    cache.put("a question", {"text": "x", "docs": [1, 2.5, None, True]})
    assert cache.lookup("a question").value == {"text": "x", "docs": [1, 2.5, None, True]}
    cache.put("a question", b"\x00raw")
    assert cache.lookup("a question").value == b"\x00raw"
    assert cache.stats()["entries"] == 1  # the new answer replaced the old one in the store


class BrokenStore(MemoryStore):
    def changes(self, since):  # type: ignore[no-untyped-def]
        raise sqlite3.OperationalError("disk I/O error")

    def put(self, entry, *, max_entries, ttl):  # type: ignore[no-untyped-def]
        raise sqlite3.OperationalError("database is locked")


def test_store_failure_is_a_counted_miss(caplog: pytest.LogCaptureFixture) -> None:
    cache = fake_cache(store=BrokenStore())
    cache.put("q", "v")  # no exception
    assert cache.lookup("q") is None
    stats = cache.stats()
    assert stats["errors"] == 3  # the first sync (at construction), the put, the lookup
    assert stats["misses"] == 1
    assert "database is locked" in caplog.text


def test_corrupt_sqlite_file_is_a_miss(tmp_path: Path) -> None:
    path = tmp_path / "corrupt.db"
    path.write_bytes(b"this is not a database" * 100)
    cache = fake_cache(store=f"sqlite:///{path}")
    cache.put("q", "v")
    assert cache.lookup("q") is None
    stats = cache.stats()
    assert stats["errors"] == 3  # opening (at construction), the put, the lookup
    assert stats["entries"] is None  # the count failed too (and was logged)


def test_locked_sqlite_file_is_a_miss(tmp_path: Path) -> None:
    path = tmp_path / "locked.db"
    cache = fake_cache(store=SQLiteStore(path, timeout=0.05))
    cache.put("q", "v")
    assert cache.lookup("q").value == "v"
    other = sqlite3.connect(path, isolation_level=None)
    other.execute("BEGIN EXCLUSIVE")
    try:
        cache.put("q2", "v2")  # the writer lock is held: skipped, counted
        assert cache.stats()["errors"] >= 1
    finally:
        other.execute("ROLLBACK")
        other.close()
    cache.put("q2", "v2")
    assert cache.lookup("q2").value == "v2"


class _LockedAtFirst:
    """A real connection whose first ``n`` WAL switches fail as SQLite fails them when several
    processes open a new file at once: "database is locked" at once, without waiting."""

    def __init__(self, conn: sqlite3.Connection, n: int, error: str = "database is locked"):
        self._conn, self.n, self.error, self.tries = conn, n, error, 0

    def execute(self, sql: str, *args: object) -> object:
        if sql.startswith("PRAGMA journal_mode"):
            self.tries += 1
            if self.n:
                self.n -= 1
                raise sqlite3.OperationalError(self.error)
        return self._conn.execute(sql, *args)

    def __getattr__(self, name: str) -> object:
        return getattr(self._conn, name)


def _flaky_connect(monkeypatch: pytest.MonkeyPatch, n: int, **kwargs: object) -> list:
    made: list[_LockedAtFirst] = []
    real = sqlite3.connect

    def connect(*args: object, **kw: object) -> _LockedAtFirst:
        made.append(_LockedAtFirst(real(*args, **kw), n, **kwargs))
        return made[-1]

    monkeypatch.setattr(sqlite3, "connect", connect)
    return made


def test_a_new_file_opened_by_another_process_at_the_same_moment_is_waited_for(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Processes opening a new cache file at once race to switch it to WAL, and SQLite answers
    the losers "database is locked" without waiting: their first put or lookup failed (a counted
    error), although the file was free a millisecond later. The switch is now retried."""
    made = _flaky_connect(monkeypatch, 3)
    cache = fake_cache(store=SQLiteStore(tmp_path / "new.db"))
    assert cache.put("q", "v")
    assert cache.lookup("q").value == "v"
    assert cache.stats()["errors"] == 0
    assert made[0].tries == 4


def test_a_file_locked_for_longer_than_the_timeout_still_fails_in_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import time

    _flaky_connect(monkeypatch, 10**9)
    store = SQLiteStore(tmp_path / "new.db", timeout=0.2)
    started = time.monotonic()
    with pytest.raises(sqlite3.OperationalError, match="locked"):
        store.count()
    assert 0.1 < time.monotonic() - started < 2.0


def test_other_open_errors_are_not_retried(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    made = _flaky_connect(monkeypatch, 1, error="disk I/O error")
    with pytest.raises(sqlite3.OperationalError, match="disk I/O"):
        SQLiteStore(tmp_path / "new.db").count()
    assert made[0].tries == 1


OPENER = textwrap.dedent(
    """
    import sys, time
    from rag_rerank_plugins.semantic_cache import SQLiteStore
    store = SQLiteStore(sys.argv[1])
    start = float(sys.argv[2])
    while time.time() < start:
        pass
    try:
        print(store.count())
    except Exception as exc:
        print(repr(exc))
    """
)


def test_processes_opening_one_new_file_at_the_same_instant_all_succeed(tmp_path: Path) -> None:
    """The real race, in real processes started together (it failed 4 trials in 20 before)."""
    import time

    env = {**os.environ, "PYTHONPATH": SRC}
    for trial in range(3):
        path = tmp_path / f"race{trial}.db"
        start = time.time() + 2.0
        procs = [
            subprocess.Popen(
                [sys.executable, "-c", OPENER, str(path), str(start)],
                stdout=subprocess.PIPE,
                text=True,
                env=env,
            )
            for _ in range(6)
        ]
        outs = [proc.communicate(timeout=120)[0].strip() for proc in procs]
        assert outs == ["0"] * 6, outs


def test_async_lookup_and_put(tmp_path: Path) -> None:
    async def main() -> None:
        for store in ("memory", f"sqlite:///{tmp_path / 'a.db'}"):
            cache = fake_cache(store=store)
            await cache.aput("async question", [1, 2])
            hit = await cache.alookup("async question")
            assert hit is not None
            assert hit.value == [1, 2]
            assert await cache.alookup("another topic entirely") is None

    asyncio.run(main())


def test_invalidate_clear_and_stats() -> None:
    cache = fake_cache()
    cache.put("q1", 1, namespace="a")
    cache.put("q2", 2, namespace="a")
    cache.put("q1", 3, namespace="b")
    assert cache.invalidate("a") == 2
    assert cache.lookup("q1", namespace="a") is None
    assert cache.lookup("q1", namespace="b").value == 3
    cache.clear()
    assert cache.lookup("q1", namespace="b") is None
    stats = cache.stats()
    assert stats["entries"] == 0
    assert stats["lookup_ms_p50"] is not None
    assert stats["search_ms_p95"] is not None


# -- store invariants (hypothesis) ---------------------------------------------------------------

ops = st.lists(st.tuples(st.sampled_from("abc"), st.integers(0, 15)), min_size=1, max_size=40)


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(ops=ops, max_entries=st.integers(1, 8), sqlite=st.booleans())
def test_lru_bound_and_namespace_isolation(
    ops: list[tuple[str, int]],
    max_entries: int,
    sqlite: bool,
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    store = f"sqlite:///{tmp_path_factory.mktemp('h') / 'c.db'}" if sqlite else "memory"
    cache = fake_cache(store=store, max_entries=max_entries)
    model: dict[tuple[str, str], int] = {}  # expected most recent survivors (LRU by put or hit)
    order: list[tuple[str, str]] = []
    for i, (ns, n) in enumerate(ops):
        key = (ns, f"question number {n}")
        cache.put(key[1], i, namespace=ns)
        model[key] = i
        order = [k for k in order if k != key] + [key]
        assert cache.stats()["entries"] <= max_entries
    survivors = set(order[-max_entries:]) if max_entries < len(set(order)) else set(order)
    for (ns, q), value in model.items():
        hit = cache.lookup(q, namespace=ns)
        if hit is not None:
            assert hit.value == value  # never another namespace's or an older answer
            assert hit.namespace == ns
    # the most recent put always survives
    last_ns, last_q = order[-1]
    assert cache.lookup(last_q, namespace=last_ns).value == model[order[-1]]
    assert survivors


def test_lru_keeps_recently_hit_entries() -> None:
    cache = fake_cache(max_entries=2)
    cache.put("alpha question", 1)
    cache.put("beta question", 2)
    assert cache.lookup("alpha question") is not None  # alpha is now the most recent
    cache.put("gamma question", 3)  # evicts beta
    assert cache.lookup("beta question") is None
    assert cache.lookup("alpha question").value == 1
    assert cache.stats()["evictions"] == 1


@pytest.mark.parametrize("sqlite", [False, True])
def test_ttl(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, sqlite: bool) -> None:
    clock = [1000.0]
    monkeypatch.setattr(core_module, "now", lambda: clock[0])
    cache = fake_cache(ttl=10, store=f"sqlite:///{tmp_path / 't.db'}" if sqlite else "memory")
    cache.put("old question", 1)
    clock[0] += 5
    hit = cache.lookup("old question")
    assert hit is not None
    assert hit.age_s == pytest.approx(5)
    clock[0] += 6
    assert cache.lookup("old question") is None
    cache.put("new question", 2)
    assert cache.stats()["entries"] == 1


# -- index ---------------------------------------------------------------------------------------


def test_usearch_and_exact_agree() -> None:
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((3000, 64)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    exact, ann = ExactIndex(64), UsearchIndex(64)
    for i, v in enumerate(vectors):
        exact.add(i, v)
        ann.add(i, v)
    for i in range(0, 3000, 7):
        exact.remove(i)
        ann.remove(i)
    agree = 0
    for q in vectors[:100]:
        top_exact, top_ann = exact.search(q, 1)[0], ann.search(q, 1)[0]
        agree += top_exact[0] == top_ann[0]
        assert top_exact[1] == pytest.approx(float(vectors[top_exact[0]] @ q), abs=1e-5)
    assert agree >= 95
    assert len(exact) == len(ann) == 3000 - len(range(0, 3000, 7))


def test_import_is_light() -> None:
    code = "import sys, rag_rerank_plugins.semantic_cache; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# -- SQLite across processes ---------------------------------------------------------------------

CHILD = textwrap.dedent(
    """
    import sys
    from rag_rerank_plugins.semantic_cache import SemanticCache
    from rag_rerank_plugins.testing import fake_embedder_spec
    cache = SemanticCache(fake_embedder_spec(dim=1024), guard="dense", threshold=0.99,
                          store="sqlite:///" + sys.argv[1], max_entries=None)
    if sys.argv[2] == "put":
        cache.put("shared question", {"from": "child"})
    elif sys.argv[2] == "get":
        hit = cache.lookup("shared question")
        print(hit.value["from"] if hit else "miss", flush=True)
    else:
        i = 0
        while True:
            cache.put(f"question {i} " + "x" * 2000, i)
            print(i, flush=True)
            i += 1
    """
)


def child(path: Path, mode: str) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": SRC}
    return subprocess.Popen(
        [sys.executable, "-c", CHILD, str(path), mode], stdout=subprocess.PIPE, text=True, env=env
    )


def test_sqlite_shared_between_processes(tmp_path: Path) -> None:
    path = tmp_path / "shared.db"
    mine = fake_cache(store=f"sqlite:///{path}")
    assert mine.lookup("shared question") is None  # index built before the other process puts
    assert child(path, "put").wait(timeout=120) == 0
    hit = mine.lookup("shared question")
    assert hit is not None
    assert hit.value == {"from": "child"}
    mine.put("shared question", {"from": "parent"})
    proc = child(path, "get")
    out, _ = proc.communicate(timeout=120)
    assert out.strip() == "parent"


def test_sqlite_survives_kill_9_mid_write(tmp_path: Path) -> None:
    path = tmp_path / "crash.db"
    proc = child(path, "loop")
    acknowledged = []
    assert proc.stdout is not None
    for line in proc.stdout:
        acknowledged.append(int(line))
        if len(acknowledged) >= 40:
            break
    proc.send_signal(signal.SIGKILL)  # mid-write: the loop never pauses between puts
    proc.wait(timeout=30)
    db = sqlite3.connect(path)
    assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    stored = {json.loads(v) for (v,) in db.execute("SELECT payload FROM entries")}
    db.close()
    assert set(acknowledged) <= stored
    cache = fake_cache(store=f"sqlite:///{path}")
    assert cache.lookup("question 0 " + "x" * 2000).value == 0


def test_collector_exports_the_cache_stats_like_the_pool_metrics() -> None:
    """SemanticCacheCollector: counters, entries and latency gauges per named cache."""
    from prometheus_client import CollectorRegistry, generate_latest

    from rag_rerank_plugins.metrics import SemanticCacheCollector

    class Stub:
        def stats(self) -> dict[str, object]:
            return {
                "lookups": 3, "hits": 2, "misses": 1, "guard_rejections": 1, "errors": 0,
                "puts": 4, "evictions": 0, "entries": 4, "lookup_ms_p50": 2.0,
                "search_ms_p50": None, "guard": "hybrid", "store": "MemoryStore",
            }  # fmt: skip

    registry = CollectorRegistry()
    registry.register(SemanticCacheCollector({"answers": Stub()}))
    text = generate_latest(registry).decode()
    labels = 'cache="answers",guard="hybrid",store="MemoryStore"'
    assert f"rag_rerank_semantic_cache_hits_total{{{labels}}} 2.0" in text
    assert f"rag_rerank_semantic_cache_entries{{{labels}}} 4.0" in text
    assert f"rag_rerank_semantic_cache_lookup_ms_p50_seconds{{{labels}}} 0.002" in text
    assert "search_ms_p50_seconds{" not in text  # None: left out, not 0
