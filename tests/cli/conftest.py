"""Fixtures of the fault suites (helpers in faults_support.py)."""

from __future__ import annotations

import pytest


@pytest.fixture
def marker(tmp_path):
    """Where a malicious pickle would write if it ran; it must never exist at the end of a test."""
    path = tmp_path / "PWNED"
    yield path
    assert not path.exists(), "a malicious pickle was executed"
