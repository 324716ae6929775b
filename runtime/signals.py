"""SIGINT (Ctrl-C) and SIGTERM (a scheduler's pre-emption or time limit): during training, finish the step, save,
stop (`StopRequests`); outside it, SIGTERM stops the command as Ctrl-C does (`sigterm_as_ctrl_c`)."""
from __future__ import annotations

import contextlib
import os
import signal
from pathlib import Path

from runtime.errors import Interrupted


class Terminated(KeyboardInterrupt):
    """SIGTERM outside a training loop: it unwinds as Ctrl-C's KeyboardInterrupt does, through the same cleanup, and
    the command exits with status 143 (128 + SIGTERM)."""


@contextlib.contextmanager
def sigterm_as_ctrl_c():
    """While active, SIGTERM raises Terminated in this process, as Ctrl-C raises KeyboardInterrupt (by default it
    killed the command at once, silently, with -15). Further SIGTERMs while the first unwinds are ignored (srun and
    the job's step may both send one), so that its cleanup finishes; the training loop's StopRequests takes the
    signal over while it trains and gives it back. A process forked meanwhile (a loader worker) inherits the handler:
    there SIGTERM ends it at once, as before."""
    pid, received = os.getpid(), []

    def handle(signum, frame):
        if os.getpid() != pid:  # a forked child: the default, and the signal again
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGTERM)
            return
        if not received:
            received.append(signum)
            raise Terminated

    try:
        before = signal.signal(signal.SIGTERM, handle)
    except ValueError:  # not the main thread: leave signals alone
        before = handle
    try:
        yield
    finally:
        if before is not handle:  # None: a handler set outside Python, which cannot be set again from here
            signal.signal(signal.SIGTERM, signal.SIG_DFL if before is None else before)


class StopRequests:
    """While active (`with StopRequests() as stop:`), SIGINT and SIGTERM only set `.signal` (the name of the
    first one received): the training loop finishes its step, saves and stops. A second Ctrl-C aborts at once."""

    def __init__(self):
        self.signal = None
        self._before = {}

    def _handle(self, signum, frame):
        self.signal = signal.Signals(signum).name
        signal.signal(signal.SIGINT, signal.default_int_handler)  # a second Ctrl-C: KeyboardInterrupt now

    def __enter__(self):
        with contextlib.suppress(ValueError):  # not the main thread: leave signals alone
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._before[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, handler in self._before.items():
            signal.signal(sig, handler)

    def raise_if_stopped(self, ckpt_path: Path, step: int):
        if self.signal:
            raise Interrupted(f"{self.signal} received: saved {ckpt_path} at step {step}")  # driver.py: how to go on
