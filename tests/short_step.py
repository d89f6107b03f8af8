"""The `flowspec` command with a short step timeout, which no flag sets (the API's `step_timeout=`):

    python -m tests.short_step SECONDS run --peers peers.txt ...

Every head the command builds gets `step_timeout=SECONDS`; everything else is the real command.
"""

from __future__ import annotations

import sys
from typing import Any

from flowspec.cli import main
from flowspec.node.head import HeadNode


def shorten(seconds: float) -> None:
    init = HeadNode.__init__

    def short(self: HeadNode, *args: Any, **kwargs: Any) -> None:
        init(self, *args, **kwargs)
        self.step_timeout = seconds

    HeadNode.__init__ = short  # type: ignore[method-assign]


if __name__ == "__main__":
    shorten(float(sys.argv[1]))
    sys.exit(main(sys.argv[2:]))
