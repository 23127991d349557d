"""``python -m diffaccel``: the ``diffaccel`` command (what ``torchrun -m diffaccel eval ...`` runs)."""

from __future__ import annotations

from .cli import main

if __name__ == "__main__":
    raise SystemExit(main())
