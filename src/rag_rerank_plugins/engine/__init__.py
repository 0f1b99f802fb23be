"""The engine: how one loaded model serves many callers, as small stages read in one pass.

A request (:mod:`.request`) is built once by the handle and travels unchanged:

* :mod:`.request`   the request object and the invariant it owns: resolved exactly once;
* :mod:`.queue`     admission, lanes with aging, rounds of work for the worker;
* :mod:`.batching`  token estimates and length-sorted micro-batches;
* :mod:`.shapes`    the bounded set of pass shapes;
* :mod:`.worker`    the device worker's stages: prepare, forward, finish, delivery;
* :mod:`.oom`       out-of-memory recovery (free, shrink the budget, split);
* :mod:`.validate`  the checked seam: backend output validated once (count, type, finiteness);
* :mod:`.scheduler` one scheduled model: accepts requests, turns a worker crash into failed
  requests and a fresh worker;
* :mod:`.executor`  the scheduled path and the direct stage (thread-safe models), deadlines and
  error mapping shared by both.

The pool (:mod:`rag_rerank_plugins.pool`) sits above and the backends below; the engine imports
backends' protocol only (:mod:`rag_rerank_plugins.backends.base`).
"""
