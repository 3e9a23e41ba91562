"""What a Ray failure says, in one line: the cause, without Ray's traceback text.

Ray's errors carry whole remote tracebacks (a dead actor's name, ids, pid and address; a failed constructor's
stack). A `replica_failed` answer names the replica and the cause in a sentence; the full text stays in the
logs (the gateway logs the exception; Serve's controller logs the constructor's traceback).
"""

from __future__ import annotations

import re

import ray.exceptions as rex

LIMIT = 400  # characters of one cause
# "pkg.module.ClassName: message" at the start of a line: an exception as a traceback ends with it
_RAISED = re.compile(r"^(?:[A-Za-z_]\w*\.)*([A-Z]\w*): (\S.*)$")


def _cut(text: str, limit: int = LIMIT) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _first_line(text: str) -> str:
    return next((line.strip() for line in text.splitlines() if line.strip()), "")


def replica_died(exc: BaseException) -> bool:
    """Whether `exc` says the replica (its actor) is gone, rather than the request failing there."""
    return isinstance(exc, (rex.ActorDiedError, rex.ActorUnavailableError, rex.RayActorError))


def cause_of(exc: BaseException) -> str:
    """`Type: first line` of what went wrong: a remote task's own exception rather than Ray's wrapper, a dead
    actor's first sentence rather than its ids and addresses."""
    if isinstance(exc, rex.RayTaskError) and exc.cause is not None and exc.cause is not exc:
        exc = exc.cause
    name = type(exc).__name__
    if isinstance(exc, rex.ActorDiedError):
        name = "replica died"
    return _cut(f"{name}: {_first_line(str(exc)) or 'no message'}")


def concise_failure(text: str) -> str:
    """A Serve failure text (a deployment that could not start) as its first sentence and the exception the
    replica raised: `Deploying application easel failed: ...; the replica raised WeightsNotFound: ...`."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines:
        return "no reason given"
    head = _cut(lines[0].split(" Error:")[0].split(" See controller logs")[0].rstrip(" ."), 240)
    raised = [m for line in lines[1:] if (m := _RAISED.match(line))]
    if not raised:
        return head
    name, message = raised[-1].groups()
    return f"{head}; the replica raised {name}: {_cut(message)}"
