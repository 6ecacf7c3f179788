"""Kernel timing: `meganeura run --profile FILE` and `profile.attach` write a Chrome trace whose events are
the dispatches the runner encodes, step by step, laid out without overlap; without timestamp queries
`--profile` exits 2."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

import meganeura as mn
from meganeura.default_model import PATH

EPS_US = 2e-3                 # two rounding steps of the trace's nanosecond precision


def cli(*args, env=None):
    e = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONIOENCODING="utf-8", **(env or {}))
    r = subprocess.run([sys.executable, "-m", "meganeura.cli", "run", *args], capture_output=True, env=e,
                       timeout=300)
    return r.returncode, r.stdout.decode("utf-8"), r.stderr.decode("utf-8")


def steps_of(trace):
    """[(step event, its kernel events in time order)], steps in time order."""
    events = [e for e in trace["traceEvents"] if e["ph"] == "X"]
    steps = sorted((e for e in events if e["cat"] == "step"), key=lambda e: e["ts"])
    kernels = [e for e in events if e["cat"] == "kernel"]
    assert len(steps) + len(kernels) == len(events)
    return [(s, sorted((k for k in kernels if k["args"]["step"] == s["args"]["step"]), key=lambda e: e["ts"]))
            for s in steps]


def expected_dispatches(runner, tokens):
    """(node id, kernel label) of each dispatch a step of `tokens` runs, from the lowering itself."""
    want = [(i, k.label) for i, ks in runner.kernels.items() for k in ks if k.tokens[0] <= tokens <= k.tokens[1]]
    assert len(want) == len(runner.encoding(tokens))
    return want


def check_timeline(trace):
    """Every duration >= 0; a step's kernels lie inside it and do not overlap; steps follow each other;
    a step's GPU span fits in the host time the step took (so timestamps are scaled to real time)."""
    end = -np.inf
    for step, kernels in steps_of(trace):
        assert step["ts"] >= end - EPS_US
        assert 0 <= step["dur"] <= step["args"]["wall_us"]
        assert len(kernels) == step["args"]["kernels"]
        at = step["ts"]
        for k in kernels:
            assert k["dur"] >= 0
            assert k["ts"] >= at - EPS_US
            at = k["ts"] + k["dur"]
        assert at <= step["ts"] + step["dur"] + EPS_US
        assert kernels[0]["ts"] == step["ts"]
        assert sum(k["dur"] for k in kernels) > 0
        end = step["ts"] + step["dur"]


@pytest.fixture(scope="module")
def profiled():
    """The built-in model, greedy over a prompt prefilled in chunks of 4 tokens, with a profiler attached."""
    from meganeura.backend.profile import attach

    model = mn.load_model(PATH, chunk=4)
    ids = model.encode_prompt("It is a truth universally acknowledged")
    profiler = attach(model.decoder)
    new = model.generate_ids(ids, max_new_tokens=4)
    return model, ids, new, profiler


def test_api_trace_has_one_event_per_dispatch_of_each_step(profiled):
    model, ids, new, profiler = profiled
    runner = model.decoder._runner
    trace = json.loads(json.dumps(profiler.trace(model="built-in")))
    assert trace["displayTimeUnit"] == "ns"
    assert trace["otherData"]["device"] == runner.dev.name and trace["otherData"]["model"] == "built-in"
    steps = steps_of(trace)
    chunks = [ids[at:at + 4] for at in range(0, len(ids), 4)]
    sizes = [len(c) for c in chunks] + [1] * (len(new) - 1)
    assert len(chunks) >= 2
    assert [s["args"]["tokens"] for s, _ in steps] == sizes
    assert [s["args"]["start_pos"] for s, _ in steps] == list(np.cumsum([0] + sizes[:-1]))
    for step, kernels in steps:
        tokens = step["args"]["tokens"]
        want = expected_dispatches(runner, tokens)
        assert [(k["args"]["node"], k["args"]["label"]) for k in kernels] == want
        for k, (node, label) in zip(kernels, want):
            assert k["name"].startswith(label + " ") and k["args"]["op"] == runner.graph[node].op
            assert k["args"]["tokens"] == tokens and len(k["args"]["workgroups"]) == 3
    check_timeline(trace)


def test_profiled_steps_compute_what_the_reference_computes(profiled):
    """One pass per dispatch must not change the results: greedy ids equal the numpy executor's."""
    model, ids, new, _ = profiled
    ref = mn.load_model(PATH, backend="numpy", chunk=4, context=model.cache.context)
    assert new == ref.generate_ids(ids, max_new_tokens=4)


def test_cli_profile_writes_a_trace(tmp_path, profiled):
    model = profiled[0]
    out = tmp_path / "trace.json"
    rc, stdout, stderr = cli("--profile", str(out), "--prompt", "Hi", "--max-new-tokens", "3")
    assert rc == 0, stderr
    assert stdout.strip()
    trace = json.loads(out.read_text())
    steps = steps_of(trace)
    prompt = len(model.encode_prompt("Hi"))
    assert [s["args"]["tokens"] for s, _ in steps] == [prompt, 1, 1]
    runner = model.decoder._runner           # same checkpoint, same device: the same lowering
    for step, kernels in steps[1:]:
        assert len(kernels) == len(runner.encoding(1))
        assert [k["args"]["label"] for k in kernels] == [label for _, label in expected_dispatches(runner, 1)]
    check_timeline(trace)
    assert trace["otherData"]["model"] == "built-in"


def test_cli_profile_without_timestamp_queries_exits_2(tmp_path):
    out = tmp_path / "trace.json"
    rc, stdout, stderr = cli("--profile", str(out), "--prompt", "Hi", "--max-new-tokens", "1",
                             env={"MEGANEURA_DISABLE": "timestamp-query"})
    lines = [line for line in stderr.splitlines() if line.strip() and not line.startswith("error: XDG")]
    assert rc == 2 and len(lines) == 1 and "timestamp-query" in lines[0], stderr
    assert not out.exists() and not stdout


@pytest.mark.parametrize("target, args, needle", [
    ("trace.json", ["--backend", "numpy"], "wgpu"),
    ("no/such/dir/trace.json", [], "does not exist"),
])
def test_cli_profile_bad_input_exits_2(tmp_path, target, args, needle):
    rc, _, stderr = cli("--profile", str(tmp_path / target), "--prompt", "Hi", *args)
    lines = [line for line in stderr.splitlines() if line.strip() and not line.startswith("error: XDG")]
    assert rc == 2 and len(lines) == 1 and needle in lines[0], stderr
