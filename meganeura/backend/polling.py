"""Idle cores kept polling while a CPU device (lavapipe) works through a submit.

lavapipe runs a dispatch's workgroups on a thread pool and waits for them before the next dispatch, so
the pool's threads fall asleep between dispatches. On a virtual machine a sleeping core is halted, and
waking it again is slow: 50-120 us a dispatch on a 2-core VM, against 20-35 us when the cores are busy
with something else. A decode step makes about 50 dispatches, so that wait is a large part of it.

While a submit runs, one process per core spins at SCHED_IDLE priority. The spinners use only cores that
would otherwise halt, and they yield at once to any other thread, lavapipe's included. llama.cpp's CPU
thread pool polls for the same reason.

Each submit kicks the spinners. They spin for LINGER_S after the last kick and then sleep in a blocking
read, so an idle program costs nothing. They exit when this process closes their pipe or dies.
`MEGANEURA_POLL=0` turns them off.
"""
from __future__ import annotations

import atexit
import os
import subprocess
import sys

LINGER_S = 0.25

SPINNER = """
import os, sys, time
os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
linger = float(sys.argv[1])
while os.read(0, 64):                   # asleep until a kick; end of file when the parent is gone
    os.set_blocking(0, False)
    until = time.monotonic() + linger
    while time.monotonic() < until:
        for _ in range(2000):
            pass
        try:
            if not os.read(0, 64):
                sys.exit()
            until = time.monotonic() + linger
        except BlockingIOError:
            pass
    os.set_blocking(0, True)
"""


class Pollers:
    """`count` spinners, started at the first kick."""

    def __init__(self, count: int):
        self.count = count
        self.children: list[subprocess.Popen] = []
        self.pipes: list[int] = []
        self.closed = False

    def kick(self):
        """Spin for LINGER_S from now (starting the spinners if they are not running)."""
        if self.closed:
            return
        if not self.children:
            self._start()
        for pipe in self.pipes:
            try:
                os.write(pipe, b"k")
            except (BlockingIOError, BrokenPipeError):     # full: a kick is pending; broken: spinner gone
                pass

    def _start(self):
        try:
            for _ in range(self.count):
                child = subprocess.Popen([sys.executable, "-S", "-c", SPINNER, str(LINGER_S)],
                                         stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                         stderr=subprocess.DEVNULL)
                self.children.append(child)
                self.pipes.append(child.stdin.fileno())
                os.set_blocking(self.pipes[-1], False)
        except OSError:             # no interpreter to spawn: run without spinners
            self.close()

    def close(self):
        """Stop the spinners for good: they exit at the end of file on their pipes."""
        self.closed = True
        for child in self.children:
            child.stdin.close()
        for child in self.children:
            try:
                child.wait(timeout=2)
            except subprocess.TimeoutExpired:
                child.kill()
        self.children, self.pipes = [], []


_POLLERS: Pollers | None = None


def pollers() -> Pollers | None:
    """This process's spinners, one a core, or None where they are off (MEGANEURA_POLL=0, no SCHED_IDLE)."""
    global _POLLERS
    if os.environ.get("MEGANEURA_POLL", "1") == "0" or not hasattr(os, "SCHED_IDLE"):
        return None
    if _POLLERS is None:
        _POLLERS = Pollers(len(os.sched_getaffinity(0)))
        atexit.register(_POLLERS.close)
    return _POLLERS
