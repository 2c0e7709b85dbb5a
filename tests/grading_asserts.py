"""Assertion helpers shared by the tests of the grading checks."""
from __future__ import annotations

import pytest


def fails(check, *args, words=(), **kwargs) -> str:
    """Run a check that must fail; assert its message contains every word (case-insensitive)."""
    with pytest.raises(AssertionError) as info:
        check(*args, **kwargs)
    message = str(info.value)
    for word in words:
        assert word.lower() in message.lower(), f"{word!r} not in message:\n{message}"
    return message
