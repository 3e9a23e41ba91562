"""Work other threads hand to the render thread, run there between two denoising steps.

MLX work belongs on the thread that runs the model: a second thread evaluating MLX graphs beside a render
is what MLX's thread-safety notes warn about. A helper thread that needs a little MLX work done while a
render is in progress (the LoRA prebuild allocating the next stack's buffers) hands it over with `call`;
the render thread runs it at its next step boundary (`run_pending`, from the step callback). The runner
opens the calls when it starts a job (before the render thread picks it up) and the render's end closes
them: outside that window nobody would run a call, so `call` refuses (`NotRendering`), and closing fails
whatever was not run yet: a caller never waits past the render it counted on.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any


class NotRendering(RuntimeError):
    """No render is in progress (any more) to run the function on its thread."""


class ModelThreadCalls:
    """Functions queued for the render thread: `open` when a render is about to start, `close` when it
    ends, `run_pending` at its step boundaries (on the render thread), `call` from any other thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pending: list[tuple[Callable[[], Any], Future]] = []
        self._open = False

    def open(self) -> None:
        with self._lock:
            self._open = True

    def close(self) -> None:
        """The render ended: whatever it has not run fails with NotRendering."""
        with self._lock:
            self._open = False
            pending, self._pending = self._pending, []
        for _, fut in pending:
            if fut.set_running_or_notify_cancel():
                fut.set_exception(NotRendering("the render ended before it reached a step boundary"))

    def run_pending(self) -> None:
        """Run every queued function here (the render thread, at a step boundary), each one's outcome
        to its caller; a failing function fails its own caller only."""
        with self._lock:
            if not self._pending:
                return
            pending, self._pending = self._pending, []
        for fn, fut in pending:
            if not fut.set_running_or_notify_cancel():
                continue
            try:
                fut.set_result(fn())
            except BaseException as exc:  # noqa: BLE001 - handed to the caller, who decides
                fut.set_exception(exc)

    def call(self, fn: Callable[[], Any], timeout: float | None = None) -> Any:
        """`fn()` run on the render thread at its next step boundary; its value, or its exception.
        NotRendering when no render is in progress or the render ends first."""
        fut: Future = Future()
        with self._lock:
            if not self._open:
                raise NotRendering("no render in progress")
            self._pending.append((fn, fut))
        return fut.result(timeout)
