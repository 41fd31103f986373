"""The command line's process tuning."""

from __future__ import annotations

import importlib.util
import sys

import pytest

from a1111_proxy.cli import skip_missing_sniffio


def test_a_missing_sniffio_fails_its_import_at_once_instead_of_searching_the_path(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delitem(sys.modules, "sniffio", raising=False)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)  # not installed
    skip_missing_sniffio()
    assert sys.modules["sniffio"] is None
    with pytest.raises(ModuleNotFoundError):
        import sniffio  # noqa: F401


def test_an_installed_sniffio_is_left_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delitem(sys.modules, "sniffio", raising=False)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: object())  # installed
    skip_missing_sniffio()
    assert "sniffio" not in sys.modules
