"""The name a backend is shown by, and text scrubbed of URLs' user names and passwords."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from a1111_proxy.redaction import backend_name, scrub, scrub_all
from a1111_proxy.settings import Settings


@pytest.mark.parametrize(
    ("url", "name"),
    [
        ("http://user:secret@127.0.0.1:7860", "http://127.0.0.1:7860"),
        ("https://user:secret@sd.example.com/", "https://sd.example.com"),
        ("http://user@host:7860/base/", "http://host:7860/base"),
        ("http://user:p@ss@host:7860", "http://host:7860"),  # an unencoded @ in the password
        ("http://127.0.0.1:7860/", "http://127.0.0.1:7860"),
        ("diffusers:gpu-host:cuda", "diffusers:gpu-host:cuda"),
        ("fake0", "fake0"),
    ],
)
def test_a_backend_is_named_by_its_url_without_user_name_and_password(url: str, name: str) -> None:
    assert backend_name(url) == name
    assert backend_name(name) == name  # naming a name changes nothing


def test_every_url_in_a_text_loses_its_credentials_and_nothing_else_changes() -> None:
    text = (
        "A1111 at http://u:pw@a:1 failed, then postgresql+asyncpg://root:pw@db/x; "
        "mail me@example.com; see https://b/x?who=me@example.com"
    )
    assert scrub(text) == (
        "A1111 at http://a:1 failed, then postgresql+asyncpg://db/x; "
        "mail me@example.com; see https://b/x?who=me@example.com"
    )


def test_decoded_json_is_scrubbed_at_any_depth() -> None:
    value = {"detail": ["http://u:pw@a:1/x", {"n": 1, "url": "https://u:pw@b"}], "ok": True}
    expected = {"detail": ["http://a:1/x", {"n": 1, "url": "https://b"}], "ok": True}
    assert scrub_all(value) == expected


def test_a_backend_url_refused_by_the_settings_is_named_without_its_password() -> None:
    with pytest.raises(ValidationError) as refused:
        Settings(_env_file=None, a1111_urls="ftp://user:pw-secret@gpu:7860")  # type: ignore[call-arg]
    assert "'ftp://gpu:7860' is not an http(s) URL" in str(refused.value)
    assert "pw-secret" not in str(refused.value)
