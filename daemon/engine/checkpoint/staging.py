"""A checkpoint folder written whole or not at all: staged in a hidden folder beside its destination and
renamed into place, so a destination either does not exist or is complete.

The destination is checked, and the staging folder made, before anything is written (for `easel model
save`, before the model is loaded: minutes on a real checkpoint), so a destination that cannot be written
fails at once, with an error naming it rather than an OSError after the work.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from client.fs import file_in_the_way
from client.wire.errors import SaveFailed, SaveTargetExists


class StagedFolder:
    """`staging` is written; `commit()` renames it to `dst`; `discard()` removes it. As a context manager it
    commits when the block ends normally and discards on any exception."""

    def __init__(self, dst: str | os.PathLike[str], *, empty_ok: bool = False) -> None:
        self.dst = Path(dst).expanduser().absolute()
        if self.dst.exists() and not (empty_ok and self.dst.is_dir() and not any(self.dst.iterdir())):
            detail = "is not an empty folder" if empty_ok else "exists"
            raise SaveTargetExists(f"{self.dst} {detail}; refusing to write over it", path=str(self.dst))
        try:
            self.dst.parent.mkdir(parents=True, exist_ok=True)
            self.staging = Path(tempfile.mkdtemp(prefix=f".{self.dst.name}.", suffix=".partial", dir=self.dst.parent))
        except OSError as exc:
            blocker = file_in_the_way(self.dst.parent)
            reason = f"{blocker} is not a folder" if blocker is not None else exc.strerror or str(exc)
            raise SaveFailed(f"cannot write a folder at {self.dst}: {reason}", path=str(self.dst)) from None

    def commit(self) -> Path:
        try:
            self.staging.chmod(0o755)
            if self.dst.exists():
                self.dst.rmdir()  # empty: checked when staged (a folder filled since makes this fail)
            os.rename(self.staging, self.dst)
        except OSError as exc:
            self.discard()
            reason = exc.strerror or str(exc)
            raise SaveFailed(f"cannot put the folder in place at {self.dst}: {reason}", path=str(self.dst)) from None
        return self.dst

    def discard(self) -> None:
        shutil.rmtree(self.staging, ignore_errors=True)

    def __enter__(self) -> StagedFolder:
        return self

    def __exit__(self, exc_type: object, *_: object) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.discard()


def wrote_into(staged: StagedFolder, exc: OSError) -> SaveFailed:
    """An OSError while writing into `staged` (the disk filled, a file vanished) as the error naming `dst`."""
    return SaveFailed(f"writing {staged.dst} failed: {exc.strerror or exc}", path=str(staged.dst))
