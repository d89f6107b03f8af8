"""A folder written whole or not at all: built in a temp folder beside its final place, renamed at the end."""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from flowspec.errors import ModelError

__all__ = ["atomic_dir"]


@contextmanager
def atomic_dir(final: Path, need_bytes: float, what: str) -> Iterator[Path]:
    """Yield an empty temp folder `.<what>-<final.name>-*` beside `final`; when the block ends, the temp folder
    replaces `final` (readers see the old folder, none, or the whole new one). Whatever ends the block early
    leaves nothing behind, and a full disk is a ModelError saying how much space the job needs
    (`need_bytes`, about) and how much is free."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{what}-{final.name}-", dir=final.parent))
    try:
        yield tmp
        tmp.chmod(0o755)  # mkdtemp makes it private; a cache entry is readable like any other
        if final.exists():
            shutil.rmtree(final)
        os.rename(tmp, final)
    except OSError as e:
        if e.errno == errno.ENOSPC:
            free = shutil.disk_usage(final.parent).free
            raise ModelError(f"disk full: need ~{need_bytes / 1e9:.1f} GB in {final.parent}, "
                             f"{free / 1e9:.1f} GB free") from e
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
