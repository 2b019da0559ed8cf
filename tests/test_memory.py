"""vlpipe.memory: glibc's thresholds raised unless the user says system."""

from __future__ import annotations

import platform

import pytest

from vlpipe.memory import keep_freed_memory


def test_system_leaves_malloc_alone(monkeypatch):
    monkeypatch.setenv("VLPIPE_MALLOC", "system")
    assert keep_freed_memory() is False


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's mallopt only")
def test_thresholds_raised_on_glibc(monkeypatch):
    monkeypatch.delenv("VLPIPE_MALLOC", raising=False)
    assert keep_freed_memory() is True
