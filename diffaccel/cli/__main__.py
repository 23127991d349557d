"""``python -m diffaccel.cli``: the ``diffaccel`` command."""

from __future__ import annotations

from . import main

if __name__ == "__main__":
    raise SystemExit(main())
