"""The first passes of a fresh process, run by several threads at once, never deadlock.

OpenVINO's Python bindings build their element-type <-> numpy dtype maps in C++ function-local
statics on first use, and building them drops the GIL (pybind11's numpy API lookup). Two threads
touching numpy through the bindings for the first time together could deadlock: one holding the
static's guard and waiting for the GIL, the other holding the GIL and waiting for the guard. The
engine's device workers did exactly that on the first passes of a fresh process (1 run in ~20 of
``test_a_cached_ir_loads_in_a_new_process_without_torch``, idle forever). A session warms the
bindings up in one thread before any pass (:func:`_openvino_common.warm_bindings`).

The race is widened here (8 threads released together by a barrier, the GIL switching as often
as it can): without the warm-up a child deadlocked in ~2 of 3 runs (measured; 1 in 3 on a loaded
machine), so six fresh processes catch it; with it, none in ~200 runs (this child and the real one).
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

pytest.importorskip("openvino")

#: A fresh process: a tiny model compiled without touching numpy through the bindings, one
#: session, then N threads run their first pass at the same moment.
CHILD = """
import sys, threading
import numpy as np
import openvino as ov
from openvino import opset13 as ops
from rag_rerank_plugins.backends._openvino_common import OpenVinoSession

x = ops.parameter(ov.PartialShape([-1, 4]), ov.Type.f32, name="x")
y = ops.relu(x)
x.output(0).get_tensor().set_names({"x"})
y.output(0).get_tensor().set_names({"y"})
config = {"NUM_STREAMS": 1, "INFERENCE_NUM_THREADS": 1}
compiled = ov.Core().compile_model(ov.Model([y], [x], "tiny"), "CPU", config)
session = OpenVinoSession(compiled, streams=1, threads=1)
count = int(sys.argv[1])
sys.setswitchinterval(1e-6)  # the GIL changes hands as often as it can
barrier = threading.Barrier(count)
out = [None] * count

def first_pass(i):
    (request,) = session._requests(1)  # this thread's infer request, as a device worker's
    tensor = request.get_input_tensor(0)  # no numpy yet
    barrier.wait()
    tensor.data  # what a pass does first with numpy (data_dispatcher: `tensor.data[:] = ...`)
    out[i] = session.run(["y"], {"x": np.full((2, 4), i - 1.0, dtype=np.float32)})[0]

threads = [threading.Thread(target=first_pass, args=(i,)) for i in range(count)]
for t in threads:
    t.start()
for t in threads:
    t.join()
assert all((out[i] == max(i - 1.0, 0.0)).all() and out[i].shape == (2, 4) for i in range(count))
print("ok")
"""


def test_threads_running_the_first_passes_at_once_do_not_deadlock() -> None:
    env = {**os.environ, "PYTHONFAULTHANDLER": "1"}
    for attempt in range(6):  # each fresh process is one chance for the race
        try:
            out = subprocess.run(
                [sys.executable, "-c", CHILD, "8"],
                capture_output=True,
                text=True,
                timeout=60,
                env=env,
            )
        except subprocess.TimeoutExpired:
            pytest.fail(
                f"fresh process {attempt + 1}: threads running their first OpenVINO passes at "
                "once deadlocked (bindings not warmed up before the first pass)"
            )
        assert out.returncode == 0, out.stderr[-4000:]
        assert out.stdout.strip().splitlines()[-1] == "ok"
