"""The spinners that keep a CPU device's idle cores polling while a submit runs (backend/polling.py)."""
import os
import time

import pytest

from meganeura.backend import polling

pytestmark = pytest.mark.skipif(not hasattr(os, "SCHED_IDLE"), reason="SCHED_IDLE is Linux's")


def _state(pid: int) -> str:
    """The process's scheduler state letter: R running, S sleeping, Z exited but not reaped."""
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0]


def _wait_for(predicate, timeout: float = 10.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(0.02)
    return False


def test_spinners_spin_after_a_kick_then_sleep_and_exit_when_closed():
    spinners = polling.Pollers(2)
    try:
        assert spinners.children == []                  # nothing runs before the first kick
        spinners.kick()
        pids = [c.pid for c in spinners.children]
        assert len(pids) == 2
        # The spinners give way to any other thread.
        assert _wait_for(lambda: all(os.sched_getscheduler(p) == os.SCHED_IDLE for p in pids))
        assert _wait_for(lambda: all(_state(p) == "R" for p in pids))
        # After LINGER_S with no kick they sleep, and a kick wakes them again.
        assert _wait_for(lambda: all(_state(p) == "S" for p in pids))
        spinners.kick()
        assert _wait_for(lambda: all(_state(p) == "R" for p in pids))
    finally:
        spinners.close()
    assert spinners.children == []
    assert all(not os.path.exists(f"/proc/{p}") for p in pids)
    spinners.kick()                                     # closed for good: a kick starts nothing
    assert spinners.children == []


def test_spinners_exit_when_their_pipe_closes_while_spinning():
    spinners = polling.Pollers(1)
    spinners.kick()
    child = spinners.children[0]
    assert _wait_for(lambda: _state(child.pid) == "R")
    child.stdin.close()                                 # as when this process dies mid-spin
    assert child.wait(timeout=5) == 0
    spinners.close()


def test_poll_off(monkeypatch):
    monkeypatch.setenv("MEGANEURA_POLL", "0")
    assert polling.pollers() is None
    monkeypatch.setenv("MEGANEURA_POLL", "1")
    assert isinstance(polling.pollers(), polling.Pollers)


def test_only_cpu_devices_kick(monkeypatch):
    from meganeura.backend.device import open_device

    kicks = []
    monkeypatch.setattr(polling.Pollers, "kick", lambda self: kicks.append(self))
    dev = open_device()
    dev.awake()
    assert len(kicks) == (dev.adapter_type == "CPU")
