"""Work handed to the render thread (daemon.model_thread): run there at a step boundary, its value or its
exception back to the caller; refused outside a render; failed when the render ends first."""

from __future__ import annotations

import threading

import pytest

from daemon.model_thread import ModelThreadCalls, NotRendering


def _caller(calls: ModelThreadCalls, fn) -> tuple[threading.Thread, dict]:
    box: dict = {}

    def run() -> None:
        try:
            box["value"] = calls.call(fn)
        except BaseException as exc:  # noqa: BLE001 - the test looks at it
            box["error"] = exc

    thread = threading.Thread(target=run)
    thread.start()
    while not calls._pending and thread.is_alive():
        thread.join(0.005)
    return thread, box


def test_a_call_runs_on_the_render_thread_at_its_next_step_boundary():
    calls = ModelThreadCalls()
    calls.open()
    thread, box = _caller(calls, lambda: threading.get_ident())
    assert box == {}  # nothing runs until the render thread reaches a boundary
    calls.run_pending()  # this thread plays the render thread
    thread.join()
    assert box == {"value": threading.get_ident()}
    failing, box2 = _caller(calls, lambda: 1 / 0)
    calls.run_pending()
    failing.join()
    assert isinstance(box2["error"], ZeroDivisionError)
    calls.run_pending()  # nothing queued: a no-op
    calls.close()


def test_outside_a_render_a_call_is_refused_and_a_render_that_ends_fails_what_it_did_not_run():
    calls = ModelThreadCalls()
    with pytest.raises(NotRendering):
        calls.call(lambda: 1)
    calls.open()
    ran = []
    thread, box = _caller(calls, lambda: ran.append(1))
    calls.close()
    thread.join()
    assert isinstance(box["error"], NotRendering) and ran == []
    calls.run_pending()  # closed and empty: nothing left to run
    assert ran == []
    with pytest.raises(NotRendering):
        calls.call(lambda: 1)
