"""`prefer_lean_extensions`: what `sdproxy run` sets before aiohttp is imported (RSS)."""

from __future__ import annotations

import os

import pytest

from proxy.cli import prefer_lean_extensions


def test_frozenlist_defaults_to_pure_python(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FROZENLIST_NO_EXTENSIONS", raising=False)
    prefer_lean_extensions()
    assert os.environ["FROZENLIST_NO_EXTENSIONS"] == "1"


@pytest.mark.parametrize("explicit", ["", "0", "1"])
def test_explicit_choice_wins(monkeypatch: pytest.MonkeyPatch, explicit: str) -> None:
    monkeypatch.setenv("FROZENLIST_NO_EXTENSIONS", explicit)
    prefer_lean_extensions()
    assert os.environ["FROZENLIST_NO_EXTENSIONS"] == explicit
