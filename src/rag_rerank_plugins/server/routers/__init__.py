"""The built-in server protocols, one module each (see :mod:`..registry`).

* :mod:`.tei` - text-embeddings-inference ``POST /rerank`` (and infinity's ``documents`` shape)
  and ``POST /embed``
* :mod:`.cohere` - Cohere ``POST /v1/rerank`` and ``POST /v1/embed``
* :mod:`.openai` - OpenAI/infinity ``POST /embeddings`` and ``POST /v1/embeddings``
* :mod:`.ops` - ``GET /health``, ``GET /info``, ``GET /metrics``

Each module defines ``PROTOCOL`` (a :class:`~..endpoints.ServerProtocol`) from plain handler
functions; importing them does not import FastAPI. They import :mod:`..endpoints`, not
:mod:`..registry` (which loads them).
"""
