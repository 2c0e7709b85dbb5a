"""Course-wide settings read from the environment, in one place.

`COURSE_SMOKE=1` switches the whole course (notebooks, exercises, tests, scripts) to
tiny sizes so that everything runs in CI in minutes. Nothing else in the course reads
the variable directly: ask :func:`smoke_mode` or use :func:`pick`.
"""
from __future__ import annotations

import os
from typing import TypeVar

T = TypeVar("T")

SMOKE_ENV_VAR = "COURSE_SMOKE"
_TRUE = {"1", "true", "yes", "on"}


def smoke_mode() -> bool:
    """True when quick mode is on (``COURSE_SMOKE`` set to 1/true/yes/on)."""
    return os.environ.get(SMOKE_ENV_VAR, "").strip().lower() in _TRUE


def pick(full: T, smoke: T) -> T:
    """Return ``smoke`` in quick mode and ``full`` otherwise.

    Notebooks write ``num_epochs = pick(10, 1)`` so a reader sees both sizes at once.
    """
    return smoke if smoke_mode() else full
