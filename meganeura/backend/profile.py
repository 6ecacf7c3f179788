"""GPU time of every kernel of every step, as a Chrome/Perfetto trace (`meganeura run --profile FILE`).

While a Profiler is attached to a runner, each dispatch of a step is encoded in its own compute pass whose
beginning and end write a timestamp query; the queries are resolved and read back after the step and
become one trace event per dispatch. Profiling changes what it measures a little (a pass per dispatch
instead of one pass per step), and the run path without a profiler is untouched.

Timeline: one process (the device), one thread, each step an event enclosing its kernels' events (so the
trace viewer nests them). A step starts where its first kernel began on the GPU clock, measured from the
first step's first kernel: the gaps between steps are host time (readback, sampling, the next submit).
"""
from __future__ import annotations

import json
import time

import numpy as np

QUERIES_PER_SET = 4096          # wgpu's largest query set
PID, TID = 1, 1


class ProfileUnsupported(RuntimeError):
    """The device cannot time kernels (no timestamp-query feature)."""


def _timestamp_period(gpu) -> float:
    """Nanoseconds per timestamp tick. Resolved timestamps are raw ticks in wgpu-native unless the instance
    normalizes them; wgpu-py does not expose the period, so it is read from wgpu-native directly."""
    try:
        from wgpu.backends.wgpu_native._api import libf
        return float(libf.wgpuQueueGetTimestampPeriod(gpu.queue._internal)) or 1.0
    except (ImportError, AttributeError):
        return 1.0


def check_device(device):
    if "timestamp-query" not in device.features:
        raise ProfileUnsupported(f"timing kernels (--profile) needs the timestamp-query feature, which the device "
                                 f"{device.name} does not offer (or MEGANEURA_DISABLE withholds)")


class Profiler:
    """Times each dispatch of the steps a runner encodes while attached (`runner.profiler`); `trace()` is
    everything so far as a Chrome trace."""

    def __init__(self, device):
        check_device(device)
        import wgpu

        self.wgpu, self.device, self.gpu = wgpu, device, device.wgpu_device
        self.period_ns = _timestamp_period(self.gpu)
        self.sets: list = []                 # query sets of QUERIES_PER_SET, grown as steps need more
        self.resolved = self.readback = None
        self.events: list[dict] = []
        self.steps = 0
        self.origin_ns: float | None = None  # the first step's first timestamp
        self.end_ns = 0.0                    # where the last step ended on the trace's clock
        self.pending = None

    # -- encoding a step
    def _buffers(self, queries: int):
        sets = -(-queries // QUERIES_PER_SET)
        while len(self.sets) < sets:
            self.sets.append(self.gpu.create_query_set(type=self.wgpu.QueryType.timestamp, count=QUERIES_PER_SET))
        size = self._offset(len(self.sets))
        if self.resolved is None or self.resolved.size < size:
            u = self.wgpu.BufferUsage
            self.resolved = self.gpu.create_buffer(size=size, usage=u.QUERY_RESOLVE | u.COPY_SRC)
            self.readback = self.gpu.create_buffer(size=size, usage=u.MAP_READ | u.COPY_DST)

    @staticmethod
    def _offset(set_index: int) -> int:
        return set_index * QUERIES_PER_SET * 8          # resolve offsets must be multiples of 256

    def encode(self, enc, runner, tokens: int, start_pos: int):
        """Encode the step's dispatches (runner.encoding(tokens)), each in its own timestamped pass, and the
        copy of the timestamps to a mappable buffer; `collect` reads them after the submit."""
        encoding = runner.encoding(tokens)
        node_of = {id(k): i for i, ks in runner.kernels.items() for k in ks}
        step_kernels = [k for k, _ in runner.dispatches if k.runs_for(tokens)]      # encoding's order
        self._buffers(2 * len(encoding))
        for n, d in enumerate(encoding):
            for j in d.mirrors:
                runner._mirror(enc, j, tokens, start_pos)
            q = 2 * n
            cp = enc.begin_compute_pass(timestamp_writes={
                "query_set": self.sets[q // QUERIES_PER_SET],
                "beginning_of_pass_write_index": q % QUERIES_PER_SET,
                "end_of_pass_write_index": q % QUERIES_PER_SET + 1})
            cp.set_pipeline(d.pipeline)
            cp.set_bind_group(0, d.group)
            cp.dispatch_workgroups(*d.grid)
            cp.end()
        queries = 2 * len(encoding)
        for s in range(-(-queries // QUERIES_PER_SET)):
            count = min(QUERIES_PER_SET, queries - s * QUERIES_PER_SET)
            enc.resolve_query_set(self.sets[s], 0, count, self.resolved, self._offset(s))
        if queries:        # every set but the last is full, so the step's queries lie back to back
            enc.copy_buffer_to_buffer(self.resolved, 0, self.readback, 0, queries * 8)
        kernels = []
        for k, (_, _, grid, _) in zip(step_kernels, encoding):
            node = node_of[id(k)]
            kernels.append((node, runner.graph[node].op, k.label, tuple(int(g) for g in grid)))
        self.pending = (kernels, tokens, start_pos, time.perf_counter())

    def collect(self):
        """After the step's submit: read its timestamps and append its events."""
        kernels, tokens, start_pos, t0 = self.pending
        self.pending = None
        if not kernels:
            return
        self.readback.map_sync(self.wgpu.MapMode.READ)
        raw = np.frombuffer(self.readback.read_mapped(0, 2 * len(kernels) * 8), np.uint64)
        self.readback.unmap()
        wall_ns = (time.perf_counter() - t0) * 1e9
        first = int(raw.min())
        ns = (raw - np.uint64(first)).astype(np.float64).reshape(-1, 2) * self.period_ns   # exact before scaling
        if self.origin_ns is None:
            self.origin_ns = first * self.period_ns
        # The GPU clock places the step; a clock that went backwards (or restarted) is not trusted
        # beyond keeping the steps in order.
        at = max(first * self.period_ns - self.origin_ns, self.end_ns)
        step_ns = float(ns.max())
        step = self.steps
        name = f"step {step}: {tokens} token{'s' if tokens > 1 else ''} at position {start_pos}"
        self.events.append(_event(name, "step", at, step_ns,
                                  {"step": step, "tokens": tokens, "start_pos": start_pos, "kernels": len(kernels),
                                   # host time from encoding the step to reading its timestamps
                                   "wall_us": round(wall_ns / 1e3, 3)}))
        for (node, op, label, grid), (b, e) in zip(kernels, ns):
            self.events.append(_event(f"{label} (%{node} {op})", "kernel", at + b, e - b,
                                      {"label": label, "node": node, "op": op, "workgroups": list(grid),
                                       "tokens": tokens, "step": step}))
        self.end_ns = at + step_ns
        self.steps += 1

    def trace(self, model: str | None = None) -> dict:
        meta = [{"ph": "M", "pid": PID, "tid": TID, "name": "process_name", "args": {"name": self.device.name}},
                {"ph": "M", "pid": PID, "tid": TID, "name": "thread_name", "args": {"name": "kernels"}}]
        return {"traceEvents": meta + self.events, "displayTimeUnit": "ns",
                "otherData": {"device": self.device.name, "backend": self.device.backend, "model": model,
                              "timestamp_period_ns": self.period_ns}}

    def write(self, path: str, model: str | None = None):
        with open(path, "w", encoding="utf-8") as f:
            json.dump(self.trace(model), f)


def _event(name: str, cat: str, at_ns: float, dur_ns: float, args: dict) -> dict:
    # Chrome trace times are microseconds; three decimals keep whole nanoseconds. The end is rounded
    # as the start is, so an event ends exactly where the next one may begin.
    ts, end = round(at_ns / 1e3, 3), round((at_ns + max(dur_ns, 0.0)) / 1e3, 3)
    return {"name": name, "cat": cat, "ph": "X", "pid": PID, "tid": TID, "ts": ts, "dur": round(end - ts, 3),
            "args": args}


def attach(program) -> Profiler:
    """Time every step `program` (a compiled graph on the wgpu backend) runs from now on."""
    runner = getattr(program, "_runner", None)
    if runner is None:
        raise ValueError("profiling needs the wgpu backend")
    profiler = Profiler(runner.dev)
    runner.profiler = profiler
    return profiler
