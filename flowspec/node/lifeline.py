"""A local stage process ends with the process that started it, however that one ends.

`LocalCluster` starts each stage with `--parent-pid PID` (its own pid) and the read end of a pipe as the stage's
stdin, and holds the write end until it stops the stage. The stage (flowspec.cli.node):

* asks Linux for SIGTERM once its parent exits (`PR_SET_PDEATHSIG`), then checks that its parent is still
  `PID`: a launcher that died before the request would never trigger it;
* watches stdin on its event loop: end-of-file means every copy of the write end is closed, so the launcher is
  gone, even after SIGKILL or `os._exit` (any Unix; the Linux signal also covers the seconds spent loading,
  before the loop runs).

Either way the stage shuts down as on SIGTERM: it closes its links, frees its port and logs why. A stage started
by hand has neither and stops on SIGINT or SIGTERM only.

Linux sends the parent-death signal when the *thread* that started the child exits: start stages from a thread
that lives as long as they do (the event loop's, as `LocalCluster.start` does).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import signal
import sys
from collections.abc import Callable

__all__ = ["Lifeline", "tie_to_parent", "watch_stdin"]

_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


class Lifeline:
    """The launcher's end: a pipe whose read end is every stage's stdin. Nothing is ever written to it."""

    def __init__(self) -> None:
        # os.pipe's ends are not inheritable: only the stages (as their stdin) get the read end, and no other
        # child of this process gets the write end, which would keep the pipe open after this process dies
        self._read, self._write = os.pipe()

    @property
    def stdin(self) -> int:
        """The read end, for `subprocess.Popen(..., stdin=)`."""
        return self._read

    def args(self) -> list[str]:
        """The stage options that tie it to this process."""
        return ["--parent-pid", str(os.getpid())]

    def close(self) -> None:
        """Close both ends (idempotent): a stage still running sees end-of-file and stops."""
        for fd in (self._write, self._read):
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self._read = self._write = -1


def tie_to_parent(parent_pid: int) -> bool:
    """Have the kernel send this process SIGTERM when its parent exits (Linux only; elsewhere the stdin watch
    alone ends it). False when the parent is not `parent_pid` (any more): it is gone, so stop at once."""
    if sys.platform.startswith("linux"):
        _set_parent_death_signal(signal.SIGTERM)
    return os.getppid() == parent_pid


def _set_parent_death_signal(sig: int) -> bool:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return int(libc.prctl(_PR_SET_PDEATHSIG, ctypes.c_ulong(sig), ctypes.c_ulong(0), ctypes.c_ulong(0),
                              ctypes.c_ulong(0))) == 0
    except (OSError, AttributeError):  # no prctl in this libc: the stdin watch remains
        return False


def watch_stdin(on_eof: Callable[[], None]) -> bool:
    """Call `on_eof()` on the running loop once stdin reaches end-of-file (or fails). False where this loop
    cannot watch it (Windows' proactor loop; stdin a regular file): then only signals stop the process."""
    loop = asyncio.get_running_loop()
    try:
        fd = sys.stdin.fileno()
    except (AttributeError, OSError, ValueError):  # no stdin at all: nothing to watch
        return False

    def readable() -> None:
        try:
            data = os.read(fd, 4096)  # the launcher never writes; anything read is dropped
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            loop.remove_reader(fd)
            on_eof()

    try:
        os.set_blocking(fd, False)  # AttributeError: not on Windows before 3.12
        loop.add_reader(fd, readable)
    except (AttributeError, NotImplementedError, OSError):
        return False
    return True
