"""Time per TensorFlow op type from the profiler's trace (issue 14's slow processes).

`profile(call, repeats)` runs `call()` `repeats` times under
`tf.profiler.experimental` and reads the trace it writes (an `XSpace`
protobuf, parsed with the `xplane_pb2` module that TensorFlow ships);
`summarize(space, steps)` turns it into what tells a slow compiled step
from a fast one:

* `op_self_seconds`: per op type, the seconds per step its kernels ran,
  less the ops nested inside them (a `While` op contains its body's ops);
* `op_busy_seconds`: per step, how long at least one op ran on some thread;
* `op_overlap_seconds`: per step, how long ops ran on two or more threads at
  once. Two ops that each split their work over the intra-op threads at the
  same time compete for the same cores.

An op event of TensorFlow's executor is named `"<op name>:<op type>"`; the
executor's and thread pool's own events contain `"::"` and are left out.
"""

import collections
import glob
import os
import re
import shutil
import tempfile

_PICOSECONDS = 1e-12
# "<op name>:<op type>": no spaces (the runtime's "EagerLocalExecute: __inference_f"
# is not an op) and no "::" (nor "ExecutorState::Process").
_OP_EVENT = re.compile(r"^[^\s:]+:([A-Za-z_]\w*)$")


def profile(call, repeats, logdir=None):
    """Runs `call()` `repeats` times under the profiler; returns the trace's `XSpace`."""
    import tensorflow as tf
    from tensorflow.tsl.profiler.protobuf import xplane_pb2

    own_dir = logdir is None
    logdir = logdir or tempfile.mkdtemp(prefix="op_profile_")
    try:
        tf.profiler.experimental.start(logdir)
        try:
            for _ in range(repeats):
                call()
        finally:
            tf.profiler.experimental.stop()
        (path,) = glob.glob(os.path.join(logdir, "**", "*.xplane.pb"), recursive=True)
        with open(path, "rb") as f:
            return xplane_pb2.XSpace.FromString(f.read())
    finally:
        if own_dir:
            shutil.rmtree(logdir, ignore_errors=True)


def _op_type(name):
    match = _OP_EVENT.match(name)
    return match.group(1) if match else None


def _line_ops(line, metadata):
    """`(start, end, op type)` in picoseconds of the op events of one thread, in order."""
    ops = []
    for event in line.events:
        op_type = _op_type(metadata[event.metadata_id].name)
        if op_type is not None:
            start = line.timestamp_ns * 1000 + event.offset_ps
            ops.append((start, start + event.duration_ps, op_type))
    ops.sort(key=lambda op: (op[0], -op[1]))
    return ops


def _self_times(ops):
    """Per op type, its events' durations less those of the events nested in them."""
    self_ps = collections.Counter()
    stack = []  # (end, op type) of the enclosing events
    for start, end, op_type in ops:
        while stack and stack[-1][0] <= start:
            stack.pop()
        if stack:
            self_ps[stack[-1][1]] -= end - start
        self_ps[op_type] += end - start
        stack.append((end, op_type))
    return self_ps


def _outer_intervals(ops):
    """The union of one thread's op events as disjoint `(start, end)` intervals."""
    intervals = []
    for start, end, _ in ops:
        if intervals and start <= intervals[-1][1]:
            intervals[-1][1] = max(intervals[-1][1], end)
        else:
            intervals.append([start, end])
    return intervals


def _busy_and_overlap(threads):
    """Picoseconds with at least one thread busy, and with two or more."""
    edges = sorted(
        (time, change)
        for intervals in threads
        for start, end in intervals
        for time, change in ((start, 1), (end, -1))
    )
    busy = overlap = 0
    active = 0
    previous = None
    for time, change in edges:
        if previous is not None:
            busy += (time - previous) * (active >= 1)
            overlap += (time - previous) * (active >= 2)
        active += change
        previous = time
    return busy, overlap


def summarize(space, steps, top=15):
    """Per-step op times of a trace (see the module docstring); JSON-serialisable.

    Args:
        space: An `XSpace` (from `profile`).
        steps: How many steps the trace covers: every figure is per step.
        top: Keep the `top` op types with the most self time.

    Returns:
        A dict: `op_self_seconds` (op type -> seconds per step, largest first),
        `op_busy_seconds`, `op_overlap_seconds`, `threads_with_ops`.
    """
    self_ps = collections.Counter()
    threads = []
    for plane in space.planes:
        for line in plane.lines:
            ops = _line_ops(line, plane.event_metadata)
            if ops:
                self_ps.update(_self_times(ops))
                threads.append(_outer_intervals(ops))
    busy, overlap = _busy_and_overlap(threads)
    per_step = lambda ps: round(ps * _PICOSECONDS / steps, 6)
    return {
        "op_self_seconds": {name: per_step(ps) for name, ps in self_ps.most_common(top)},
        "op_busy_seconds": per_step(busy),
        "op_overlap_seconds": per_step(overlap),
        "threads_with_ops": len(threads),
    }
