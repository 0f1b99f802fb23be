"""Backends and loaders that call models of their pool: a model calling itself from inside its
own pass, or a loader asking for the model it is loading, is refused at once (each used to wait
for itself forever), and a call to another model gets that model's answer, its timeout
included, as any caller does.

Before the fix: a scheduled model whose ``forward`` (or ``prepare``, or ``finish``) called the
same model hung without a timeout on a single device thread (a GPU, or one CPU worker), and
worked or hung on parallel CPU workers depending on whether another worker was free. A nested
call to *another* model that timed out reached the outer caller as "no result within None s",
the outer caller's timeout that it never set. Every wait here is bounded: a wedged engine fails
the test instead of hanging it.
"""

from __future__ import annotations

import asyncio
import re
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import pytest

from rag_rerank_plugins import ModelPool, ModelSpec
from rag_rerank_plugins.backends import register_backend
from rag_rerank_plugins.backends.base import Prepared, RerankerModel, Task
from rag_rerank_plugins.engine_config import EngineConfig
from rag_rerank_plugins.exceptions import InferenceError, ModelLoadError, RequestTimeoutError
from rag_rerank_plugins.testing import FakeReranker
from test_engine_hostile import _in_thread, _outcome

PAIRS = [("red apple", "a red apple"), ("red apple", "a green pear")]
EXPECTED = FakeReranker().score_pairs(PAIRS, 2)
NESTED = ("nested", "nested")  # the item a nested call sends; its pass makes no call


class Calling(RerankerModel):
    """A two-phase reranker whose ``stage`` (prepare, forward or finish) runs ``call`` once per
    pass that is not itself a nested call, and records what the call raised."""

    def __init__(self, stage: str, *, device: str = "cuda", pass_s: float = 0.0) -> None:
        self.stage = stage
        self.device = device
        self.parallel_forward = device == "cpu"  # type: ignore[misc]  # per instance
        self.pass_s = pass_s
        self.call: Callable[[], Any] = lambda: None
        self.raised: list[BaseException] = []
        self.threads: set[str] = set()

    def _maybe_call(self, stage: str, pairs: Sequence[tuple[str, str]]) -> None:
        if stage != self.stage or NESTED in pairs:
            return
        self.threads.add(threading.current_thread().name)
        try:
            self.call()
        except BaseException as exc:
            self.raised.append(exc)
            raise

    def prepare(self, task: Task, items: Sequence[Any]) -> Prepared:
        self._maybe_call("prepare", items)
        return Prepared(list(items), len(items))

    def forward(self, task: Task, batch: Prepared) -> Any:
        self._maybe_call("forward", batch.payload)
        time.sleep(self.pass_s)
        return batch.payload

    def finish(self, task: Task, pending: Any) -> list[float]:
        self._maybe_call("finish", pending)
        return FakeReranker().score_pairs(pending, len(pending))

    def score_pairs(self, pairs: Sequence[tuple[str, str]], batch_size: int) -> list[float]:
        return self.finish(Task("score"), self.forward(Task("score"), self.prepare(Task(), pairs)))


def _spec(model: RerankerModel) -> ModelSpec:
    name = f"nested-{uuid.uuid4().hex[:8]}"
    register_backend(name, lambda spec, provider: model, "reranker", uses_torch=False, replace=True)
    return ModelSpec("m", backend=name, device="cpu")


def _bounded(fn: Callable[[], Any], seconds: float = 10.0) -> Any:
    """fn()'s result or exception, from a daemon thread; fails the test if it hangs."""
    return _outcome(_in_thread(fn), seconds, "the call (the engine waits on itself)")


@pytest.fixture
def pool() -> Iterator[ModelPool]:
    pool = ModelPool(config=EngineConfig(cpu_workers=2))
    yield pool
    thread = threading.Thread(target=pool.clear, name="nested-clear", daemon=True)
    thread.start()
    thread.join(5)


@pytest.mark.parametrize("stage", ["prepare", "forward", "finish"])
@pytest.mark.parametrize("device", ["cuda", "cpu"])  # one device thread; parallel CPU workers
@pytest.mark.parametrize("how", ["sync", "async"])
def test_a_model_calling_itself_from_its_own_pass_is_refused_at_once(
    pool: ModelPool, stage: str, device: str, how: str
) -> None:
    model = Calling(stage, device=device)
    spec = _spec(model)

    def nested() -> Any:
        if how == "sync":
            return pool.score_pairs(spec, [NESTED])
        return asyncio.run(pool.ascore_pairs(spec, [NESTED]))

    model.call = nested
    started = time.monotonic()
    outcome = _bounded(lambda: pool.score_pairs(spec, PAIRS))
    assert time.monotonic() - started < 5  # at once, not after some timeout
    assert isinstance(outcome, InferenceError), outcome
    assert "from inside one of its own passes" in str(outcome)
    # The nested call raised (once per pass: CPU workers split the two pairs into two passes).
    assert model.raised
    assert all(type(e) is InferenceError for e in model.raised), model.raised
    # The threads that called were the engine's own (the refusal was for the right reason).
    assert all(name.startswith("rag-rerank-") for name in model.threads), model.threads
    # The model is intact: the next outer call (making no nested call) is served.
    model.call = lambda: None
    assert _bounded(lambda: pool.score_pairs(spec, PAIRS)) == EXPECTED
    assert pool.spec_stats(spec)["queue_depth"] == 0


def test_calls_from_other_threads_are_served_while_a_pass_runs(pool: ModelPool) -> None:
    """The refusal is by thread, not by model: callers outside the engine are never refused,
    even while the model is in a pass, and a model calling a different model is served."""
    inner = Calling("forward", pass_s=0.0)
    inner_spec = _spec(inner)
    outer = Calling("forward", pass_s=0.2)
    outer_spec = _spec(outer)
    outer.call = lambda: pool.score_pairs(inner_spec, PAIRS)
    first = threading.Thread(target=lambda: pool.score_pairs(outer_spec, PAIRS), daemon=True)
    first.start()
    time.sleep(0.05)  # the first outer pass is running
    assert _bounded(lambda: pool.score_pairs(outer_spec, [NESTED])) == [
        FakeReranker().score_pairs([NESTED], 1)[0]
    ]
    first.join(5)
    assert outer.raised == []
    assert _bounded(lambda: pool.score_pairs(outer_spec, PAIRS)) == EXPECTED


@pytest.mark.parametrize("how", ["sync", "async"])
def test_a_nested_calls_timeout_is_that_calls_error_not_the_outer_callers(
    pool: ModelPool, how: str
) -> None:
    """The outer caller set no timeout: it must get the inner model's RequestTimeoutError (its
    name and its 0.2 s), not a timeout of its own 'within None s'."""
    inner = Calling("forward", pass_s=2.0)
    inner_spec = _spec(inner)
    outer = Calling("forward")
    outer_spec = _spec(outer)
    outer.call = lambda: pool.score_pairs(inner_spec, PAIRS, timeout=0.2)
    if how == "sync":
        outcome = _bounded(lambda: pool.score_pairs(outer_spec, PAIRS))
    else:
        outcome = _bounded(lambda: asyncio.run(pool.ascore_pairs(outer_spec, PAIRS)))
    assert isinstance(outcome, RequestTimeoutError), outcome
    # 0.2 s, or what the inner model's cold load left of it (0.199 s)
    assert re.search(r"within 0\.(2|19\d*) s", str(outcome)), outcome
    assert "None" not in str(outcome), outcome
    assert outcome is outer.raised[0]  # the inner call's own error, unchanged
    # The outer model is intact; its own caller timeout still works (and names its own value).
    outer.call = lambda: None
    assert _bounded(lambda: pool.score_pairs(outer_spec, PAIRS)) == EXPECTED
    outer.pass_s = 1.0
    late = _bounded(lambda: pool.score_pairs(outer_spec, PAIRS, timeout=0.1))
    assert isinstance(late, RequestTimeoutError), late
    assert "0.1 s" in str(late), late


# -- loaders that call the pool ------------------------------------------------------------------


@pytest.mark.parametrize("target", ["key", "user-spec", "twin-spec"])
@pytest.mark.parametrize("how", ["sync", "timeout", "async", "get"])
def test_a_loader_asking_its_pool_for_its_own_model_is_refused_at_once(
    how: str, target: str
) -> None:
    """Before: a loader that warmed its model up through the pool (or fetched it with
    ``pool.get``) waited for its own load: forever without a timeout (the slot's lock), until
    the timeout with one (the shared load's future). Now the nested call raises
    ModelLoadError at once, and a loader that lets it escape fails only that load."""
    pool = ModelPool()
    name = f"nested-load-{uuid.uuid4().hex[:8]}"
    nested: list[BaseException] = []
    nest = [True]
    user_spec = ModelSpec("m", backend=name)  # device "auto": the loader gets it resolved

    # The loader gets the resolved key; the user's spec; a spec never seen that resolves to the
    # same key (found only by resolving it).
    twin = ModelSpec("m", backend=name, device="cpu")

    def load(spec: ModelSpec, provider: Any) -> FakeReranker:
        if nest[0]:
            other = {"key": spec, "user-spec": user_spec, "twin-spec": twin}[target]
            try:
                if how == "sync":
                    pool.score_pairs(other, PAIRS)
                elif how == "timeout":
                    pool.score_pairs(other, PAIRS, timeout=30)
                elif how == "async":
                    asyncio.run(pool.ascore_pairs(other, PAIRS))
                else:
                    pool.get(other)
            except BaseException as exc:
                nested.append(exc)
                raise
        return FakeReranker()

    register_backend(name, load, "reranker", uses_torch=False, replace=True)
    try:
        started = time.monotonic()
        outcome = _bounded(lambda: pool.score_pairs(user_spec, PAIRS))
        assert time.monotonic() - started < 5
        assert isinstance(outcome, ModelLoadError), outcome
        assert "asked the pool for the model it is loading" in str(outcome)
        assert [type(e) for e in nested] == [ModelLoadError]
        # The failed load left nothing behind: the next call loads (no nested call now).
        nest[0] = False
        assert _bounded(lambda: pool.score_pairs(user_spec, PAIRS)) == EXPECTED
        assert pool.spec_stats(user_spec)["loads"] == 1
    finally:
        _bounded(pool.clear)


@pytest.mark.parametrize("how", ["sync", "timeout", "async"])
@pytest.mark.parametrize("budget", [None, {"cpu": 10_000}])
def test_a_loader_may_use_other_models_of_its_pool(budget: dict[str, int] | None, how: str) -> None:
    """The refusal is for the model being loaded only: a loader that scores with another spec
    gets its answer. Under a memory budget the load holds the pool's memory lock: a call with a
    deadline, or an async one, used to hand the other spec's load to a load thread that waited
    for that lock (a timeout, or a hang); a loader's calls now load inline."""
    pool = ModelPool(memory_budget_mb=budget) if budget else ModelPool()
    inner_spec = _spec(FakeReranker())
    seen: list[list[float]] = []

    def load(spec: ModelSpec, provider: Any) -> FakeReranker:
        if how == "sync":
            seen.append(pool.score_pairs(inner_spec, PAIRS))
        elif how == "timeout":
            seen.append(pool.score_pairs(inner_spec, PAIRS, timeout=30))
        else:
            seen.append(asyncio.run(pool.ascore_pairs(inner_spec, PAIRS)))
        return FakeReranker()

    name = f"nested-outer-{uuid.uuid4().hex[:8]}"
    register_backend(name, load, "reranker", uses_torch=False, replace=True)
    try:
        outer = ModelSpec("m", backend=name, device="cpu")
        assert _bounded(lambda: pool.score_pairs(outer, PAIRS)) == EXPECTED
        assert seen == [EXPECTED]
    finally:
        _bounded(pool.clear)


def test_a_child_forked_inside_a_loader_may_load_that_model() -> None:
    """The loads running in a thread are a thread-local, which fork copies on the forking
    thread: a child forked by a loader was refused the model its parent was loading, though
    nothing loads it in the child."""
    import multiprocessing

    pool = ModelPool()
    name = f"nested-fork-{uuid.uuid4().hex[:8]}"
    answers: list[Any] = []
    in_child = [False]

    def child(conn: Any) -> None:
        in_child[0] = True  # the child's own load of the model forks nothing
        try:
            conn.send(pool.score_pairs(ModelSpec("m", backend=name, device="cpu"), PAIRS))
        except BaseException as exc:
            conn.send(repr(exc))

    def load(spec: ModelSpec, provider: Any) -> FakeReranker:
        if not in_child[0]:
            ctx = multiprocessing.get_context("fork")
            parent_end, child_end = ctx.Pipe()
            process = ctx.Process(target=child, args=(child_end,), daemon=True)
            process.start()
            answers.append(parent_end.recv() if parent_end.poll(30) else "no answer")
            process.join(10)
        return FakeReranker()

    register_backend(name, load, "reranker", uses_torch=False, replace=True)
    try:
        assert _bounded(lambda: pool.score_pairs(ModelSpec("m", backend=name), PAIRS), 60) == (
            EXPECTED
        )
        assert answers == [EXPECTED]
    finally:
        _bounded(pool.clear)


@pytest.mark.parametrize("how", ["timeout", "async"])
def test_two_loaders_calling_each_others_model_end_at_their_timeout(how: str) -> None:
    """A cycle is not recognised, but its timeouts must still end it. A loader's calls load
    inline; at first their wait for the *other* loader's slot had no limit, so two loaders
    calling each other's model held each other for good and every later call of either model
    timed out. Their waits now end at the call's timeout, and the models load afterwards."""
    pool = ModelPool()
    tag = uuid.uuid4().hex[:8]
    a = ModelSpec("a", backend=f"cycle-a-{tag}", device="cpu")
    b = ModelSpec("b", backend=f"cycle-b-{tag}", device="cpu")
    both_loading = threading.Barrier(2)
    nest = [True]

    def loader(other: ModelSpec) -> Callable[[ModelSpec, Any], FakeReranker]:
        def load(spec: ModelSpec, provider: Any) -> FakeReranker:
            if nest[0]:
                both_loading.wait(5)
                if how == "timeout":
                    pool.score_pairs(other, PAIRS, timeout=0.5)
                else:
                    asyncio.run(pool.ascore_pairs(other, PAIRS, timeout=0.5))
            return FakeReranker()

        return load

    register_backend(a.backend, loader(b), "reranker", uses_torch=False, replace=True)
    register_backend(b.backend, loader(a), "reranker", uses_torch=False, replace=True)
    try:
        calls = [_in_thread(lambda spec=spec: pool.score_pairs(spec, PAIRS)) for spec in (a, b)]
        outcomes = [_outcome(call, 10, "a loader in a cycle") for call in calls]
        # At least one nested wait timed out and failed its load (the other may then finish).
        assert any(isinstance(o, ModelLoadError | RequestTimeoutError) for o in outcomes)
        nest[0] = False
        for spec in (a, b):  # nothing is left holding either model's slot
            assert _bounded(lambda spec=spec: pool.score_pairs(spec, PAIRS, timeout=5)) == EXPECTED
    finally:
        _bounded(pool.clear)


def test_binding_torch_threads_where_python_refuses_new_threads() -> None:
    """At exit on CPython 3.12.0-3.12.2 no short-lived thread can read torch's process-wide
    count: the binding still takes effect (it used to be undone by its own restore step)."""
    import subprocess
    import sys
    import textwrap

    script = textwrap.dedent(
        """
        import threading, torch
        from rag_rerank_plugins import _cpu, _exitsafe
        torch.set_num_threads(2)
        _exitsafe.start_thread = lambda thread: False  # as at exit on 3.12.0-3.12.2
        seen = []
        def bind():
            torch.get_num_threads()
            _cpu.set_thread_torch_threads(1)
            seen.append(torch.get_num_threads())
        t = threading.Thread(target=bind)
        _exitsafe.threading.Thread.start(t)
        t.join()
        print(seen)
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "[1]", done.stdout
