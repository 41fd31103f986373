"""The shared fixtures' own decisions, without the services they stand for."""

from __future__ import annotations

import pytest

from tests.conftest import postgres_unavailable


def test_an_unusable_postgresql_skips_its_tests_on_a_developers_machine() -> None:
    for environ in ({}, {"CI": ""}):
        with pytest.raises(pytest.skip.Exception, match='role "root" does not exist'):
            postgres_unavailable(
                'InvalidAuthorizationSpecificationError: role "root" does not exist', environ
            )


def test_an_unusable_postgresql_fails_its_tests_under_ci_saying_what_to_do() -> None:
    for value in ("1", "true"):
        with pytest.raises(pytest.fail.Exception) as failed:
            postgres_unavailable("ConnectionRefusedError: [Errno 111]", {"CI": value})
        message = str(failed.value)
        assert "ConnectionRefusedError" in message
        assert "start PostgreSQL" in message and "unset CI" in message
