"""Typed errors shared by the daemon and the client (pure Python: the thin client imports it).

Every error has a stable wire `code` (see docs/protocol.md). The daemon turns any EaselError into an
error response; the client turns an error response back into the same class by its code.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
    from client.wire.report import FileReport

# code -> class, filled as each EaselError subclass is defined (see EaselError.__init_subclass__).
ERROR_CLASSES: dict[str, type[EaselError]] = {}


class EaselError(Exception):
    """Base of every error easel reports to a user; `code` is what travels on the wire.

    Every subclass registers its code when it is defined (wherever that is), so a reply carrying any
    code decodes back into its class, and two classes can never claim one code.
    """

    code: ClassVar[str] = "internal"

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "code" not in cls.__dict__:
            raise TypeError(f"{cls.__name__} must define its own error code")
        other = ERROR_CLASSES.get(cls.code)
        if other is not None and other.__qualname__ != cls.__qualname__:
            raise TypeError(f"error code {cls.code!r} of {cls.__name__} is already {other.__name__}'s")
        ERROR_CLASSES[cls.code] = cls

    def __init__(self, message: str, **details: Any) -> None:
        super().__init__(message)
        self.message = message
        self.details = details

    def to_wire(self) -> dict[str, Any]:
        return {"code": self.code, "message": self.message, "details": self.details}


ERROR_CLASSES[EaselError.code] = EaselError


class InvalidRequest(EaselError):
    """A request field is missing, of the wrong type or out of range; `field` names it."""

    code = "invalid_request"

    def __init__(self, message: str, *, field: str | None = None, **details: Any) -> None:
        super().__init__(message, field=field, **details)
        self.field = field


class DuplicateId(InvalidRequest):
    """A request reused the id of a request still in flight on its connection (any op). Answered as a
    connection-level error (no `id`; `details.id` names the id) so it can never pass for the answer of
    the request that holds the id."""

    code = "duplicate_id"


class WeightsNotFound(EaselError):
    """A real preset's weights are not on this machine (easel never downloads at run time)."""

    code = "weights_not_found"


class ModelLoadError(EaselError):
    """A checkpoint could not be loaded as the model easel builds; nothing was half-loaded."""

    code = "model_load_error"


class ModelPartMissing(ModelLoadError):
    """A component folder, a tokenizer or a part a single-file setup names is not there."""

    code = "model_part_missing"


class ModelShardMissing(ModelLoadError):
    """A shard that a checkpoint's index file names is not on disk (an incomplete download or copy)."""

    code = "model_shard_missing"


class ModelShardTruncated(ModelLoadError):
    """A weights file is shorter than its header says, or its header is unreadable (an interrupted copy)."""

    code = "model_shard_truncated"


class ModelMismatch(ModelLoadError):
    """The checkpoint's tensors do not fit the model: wrong shapes, missing or unknown names (another model)."""

    code = "model_mismatch"


class ModelVersionMismatch(ModelLoadError):
    """A quantized mflux-saved folder written by an mflux version whose quantized layout this one cannot read."""

    code = "model_version_mismatch"


class ModelTooLarge(ModelLoadError):
    """The model would leave no room in the memory available for its LoRA caches' bounds and the smallest
    render; `--quantize`, smaller caches or `--force` are the ways on."""

    code = "model_too_large"


class RenderTooLarge(InvalidRequest):
    """A render's size would need more memory than the daemon has beside its model and LoRA caches (its
    estimate); `details`: needed_bytes, available_bytes and largest_pixels, the most that fits."""

    code = "render_too_large"


class SaveTargetExists(EaselError):
    """`easel model save` never writes over an existing folder."""

    code = "save_target_exists"


class SaveFailed(EaselError):
    """A checkpoint folder could not be written (its place cannot be made or written, the disk filled);
    nothing is left at the destination."""

    code = "save_failed"


class LoraError(EaselError):
    """A LoRA file could not be used (unreadable, wrong format, unsupported, matched nothing)."""

    code = "lora_error"


class LoraNotFound(LoraError):
    code = "lora_not_found"


class LoraFormatError(LoraError):
    """Not a safetensors file, corrupt, or a format easel does not read (pickle, s4nnc...)."""

    code = "lora_format"


class LoraUnsupported(LoraError):
    """A recognised but unsupported LoRA variant (for example DoRA)."""

    code = "lora_unsupported"


class LoraZeroMatch(LoraError):
    """A LoRA matched zero keys of the loaded model: never a silent no-op.

    `reports` (the daemon's side only, never on the wire) is what each file of the refused stack matched,
    in stack order, for the render's span: a trace shows `dust:0/96` beside the files that did match."""

    code = "lora_zero_match"

    def __init__(self, message: str, *, reports: Sequence[FileReport] = (), **details: Any) -> None:
        super().__init__(message, **details)
        self.reports = list(reports)


class PromoteError(LoraError):
    """A LoRA could not be promoted into a genre pack (failed gate, changed file, bad manifest)."""

    code = "lora_promote"


class KeymapError(EaselError):
    """A keymap YAML file is malformed (a packaging bug, not a user input error)."""

    code = "keymap_error"


class PathNotAllowed(EaselError):
    """A path resolves outside the configured LoRA or output roots."""

    code = "path_not_allowed"


class OutputExists(EaselError):
    """A render's `output_path` names a file that exists and the request did not say `overwrite`."""

    code = "output_exists"


class DaemonAlreadyRunning(EaselError):
    code = "daemon_already_running"


class UnsafeSocketPath(EaselError):
    code = "unsafe_socket_path"


class Busy(EaselError):
    """The daemon's queue is full; retry later (backpressure)."""

    code = "busy"


class Cancelled(EaselError):
    """The job was cancelled by its client (or its client went away)."""

    code = "cancelled"


class DeadlineExceeded(EaselError):
    code = "deadline_exceeded"


class ProtocolError(EaselError):
    """A frame or message that does not follow docs/protocol.md."""

    code = "protocol_error"


class FrameTooLarge(ProtocolError):
    code = "frame_too_large"


class UnknownOperation(ProtocolError):
    code = "unknown_op"


class ShuttingDown(EaselError):
    code = "shutting_down"


class PeerNotAllowed(EaselError):
    """The connecting process runs as another user than the daemon (SO_PEERCRED check)."""

    code = "peer_not_allowed"


class DaemonUnavailable(EaselError):
    """Client side: no daemon answers on the socket (not running, wrong path, refused)."""

    code = "daemon_unavailable"


class Timeout(EaselError):
    """Client side: the daemon did not answer in time."""

    code = "timeout"


class RenderFailed(EaselError):
    code = "render_failed"


class LoraNotShared(LoraError):
    """In a cluster (daemon/cluster): a LoRA path does not name the same bytes on the gateway and a
    replica (missing there, unreadable, or other content). Every LoRA path must name the same file on
    every machine (a shared or synced folder); `replica` says which one differs."""

    code = "lora_not_shared"


class ClusterUnavailable(EaselError):
    """No Ray cluster answers at the address a cluster command was given (`auto`: none on this machine);
    `address` names it. `easel cluster up` starts one."""

    code = "cluster_unavailable"


class ReplicaFailed(EaselError):
    """In a cluster: the render replicas could not do a render: a replica died twice under it (it is
    retried once on another replica), or none could load the model (reported, never retried forever)."""

    code = "replica_failed"


class InvalidEnvVar(EaselError):
    """An EASEL_* environment variable holds a value easel cannot use; `variable` names it (client/env.py)."""

    code = "invalid_env"


def error_from_wire(payload: dict[str, Any]) -> EaselError:
    """Rebuild the typed exception an error response describes (unknown codes become EaselError)."""
    code = str(payload.get("code", "internal"))
    message = str(payload.get("message", "unknown error"))
    details = payload.get("details") or {}
    cls = ERROR_CLASSES.get(code, EaselError)
    err = cls.__new__(cls)
    EaselError.__init__(err, message, **(details if isinstance(details, dict) else {}))
    if isinstance(err, InvalidRequest):
        err.field = err.details.get("field")
    if cls is EaselError and code != EaselError.code:
        err.details["code"] = code
    return err
