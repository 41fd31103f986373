"""What A1111's /cmd-flags shows is stored without the credentials it leaks."""

from __future__ import annotations

from worker.catalogue import redact


def test_every_credential_a1111_shows_in_cmd_flags_is_redacted_at_any_depth() -> None:
    flags = {
        "api": True,
        "port": 7860,
        "api_auth": "user:hunter2",
        "gradio_auth": "admin:pw",
        "ngrok": "2abcNGROKTOKEN",
        "ngrok_region": "eu",
        "ngrok_options": {"basic_auth": "u:p", "domain": "x.ngrok.app"},
        "subpath": None,
        "share": False,
    }
    shown = redact(flags)
    assert shown["api_auth"] == shown["gradio_auth"] == shown["ngrok"] == "<redacted>"
    assert shown["ngrok_options"] == {"basic_auth": "<redacted>", "domain": "x.ngrok.app"}
    assert "hunter2" not in str(shown) and "NGROKTOKEN" not in str(shown)
    assert shown["api"] is True and shown["port"] == 7860 and shown["subpath"] is None
    assert shown["share"] is False
