"""API_TOKENS: each entry names a tenant (`name:token`), a plain token gets a name that hides it,
and a bad entry is refused without showing any token. The callers' own jobs, through the API and
with running jobs, are in tests/integration and tests/processes (test_callers.py)."""

from __future__ import annotations

import hashlib

import pytest
from pydantic import ValidationError

from a1111_proxy.settings import Settings

TOKENS = "alice:alice-token,alice:alice-second-token,bob:bob-token,carol:carol-token,plain-token"


def test_api_tokens_name_tenants_and_a_plain_token_gets_a_name_that_hides_it() -> None:
    settings = Settings(_env_file=None, api_tokens=TOKENS)  # type: ignore[call-arg]
    plain = "token-" + hashlib.sha256(b"plain-token").hexdigest()[:8]
    assert settings.tenants() == [
        ("alice", "alice-token"),
        ("alice", "alice-second-token"),
        ("bob", "bob-token"),
        ("carol", "carol-token"),
        (plain, "plain-token"),
    ]
    assert "plain-token" not in plain


@pytest.mark.parametrize("entry", [":s3cret-token", "alice:", "alice: "])
def test_an_api_tokens_entry_with_an_empty_part_is_refused_without_showing_it(entry: str) -> None:
    with pytest.raises(ValidationError) as raised:
        Settings(_env_file=None, api_tokens=f"bob:bob-token,{entry}")  # type: ignore[call-arg]
    message = str(raised.value)
    assert "api_tokens" in message and "entry 2" in message and "name:token" in message
    assert "s3cret-token" not in message and "bob-token" not in message


def test_one_token_given_to_two_tenants_is_refused() -> None:
    with pytest.raises(ValidationError, match="two tenants, 'alice' and 'bob'") as raised:
        Settings(_env_file=None, api_tokens="alice:same,bob:same")  # type: ignore[call-arg]
    assert "same" not in str(raised.value).replace("'alice' and 'bob'", "")


def test_admin_tokens_name_admins_and_turn_auth_on_alone() -> None:
    settings = Settings(_env_file=None, admin_tokens="ops:ops-token", host="0.0.0.0")  # type: ignore[call-arg]
    assert settings.credentials() == [("ops", "ops-token", True)]
    assert settings.auth_enabled and settings.auth_problem() is None


def test_a_token_in_both_api_tokens_and_admin_tokens_is_refused_without_showing_it() -> None:
    with pytest.raises(ValidationError, match="both API_TOKENS and ADMIN_TOKENS") as raised:
        Settings(_env_file=None, api_tokens="alice:shared", admin_tokens="ops:shared")  # type: ignore[call-arg]
    assert "shared" not in str(raised.value)
