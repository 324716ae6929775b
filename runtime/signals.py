"""SIGINT (Ctrl-C) and SIGTERM (a scheduler's pre-emption) during training: finish the step, save, stop."""
from __future__ import annotations

import contextlib
import signal
from pathlib import Path

from runtime.errors import Interrupted


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
