"""``python -m stealer``: see :mod:`stealer.cli`."""

from __future__ import annotations

import sys

if len(sys.argv) > 1 and sys.argv[1] == "node":
    from ._signals import remember_stop_requests

    remember_stop_requests()  # before the heavy imports below

from .cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
