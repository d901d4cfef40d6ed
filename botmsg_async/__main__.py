"""``python -m botmsg_async``: the ``botmsg`` command line (see ``botmsg_async.cli``)."""

from __future__ import annotations

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
