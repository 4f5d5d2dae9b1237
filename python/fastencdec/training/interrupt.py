"""Clean stops on Ctrl-C / SIGTERM: finish the step, checkpoint, exit with 128 + signal.

Inside :class:`StopOnSignal` the first SIGINT or SIGTERM only sets a flag (the
training loop checks it after each step, saves and raises
:class:`TrainingInterrupted`); a second one aborts at once with ``KeyboardInterrupt``.
Handlers can only be installed from the main thread; elsewhere the context does
nothing.
"""

from __future__ import annotations

import signal
import sys
import threading

__all__ = ["StopOnSignal", "TrainingInterrupted"]


class TrainingInterrupted(Exception):
    """Training stopped on a signal after saving; ``exit_code`` is 128 + the signal."""

    def __init__(self, step: int, signum: int, saved: str | None):
        self.step = step
        self.signum = signum
        self.saved = saved
        self.exit_code = 128 + signum
        super().__init__(f"interrupted at step {step}"
                         + ("; resume with --resume auto" if saved else
                            " (no output_dir: nothing was saved)"))


class StopOnSignal:
    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, *, announce: bool = True):
        self.signum: int | None = None
        self.announce = announce
        self._previous = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def _handle(self, signum, frame):
        if self.signum is not None:  # the second signal: stop now
            raise KeyboardInterrupt(f"second signal {signal.Signals(signum).name}: aborted "
                                    "without saving")
        self.signum = signum
        if self.announce:
            print(f"\n{signal.Signals(signum).name} received: finishing this step and saving "
                  "(send it again to abort without saving)", file=sys.stderr, flush=True)

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous = {}
        return False
