"""The parts of webhook delivery that need no database: the SSRF guard and address pinning,
Standard Webhooks signatures, and the retry policy."""

from __future__ import annotations

import base64
import time
from email.utils import formatdate

import httpx
import pytest
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from a1111_proxy.deliveries import Delivery
from a1111_proxy.egress import (
    Answer,
    Blocked,
    address_allowed,
    fetch,
    make_client,
    parse_retry_after,
    pin,
    pinned_request,
    post,
)
from a1111_proxy.settings import Settings
from a1111_proxy.signatures import signing_key, webhook_headers
from a1111_proxy.webhooks import SCHEDULE_SECONDS, RetryPolicy, judge
from worker.main import sender_config

pytestmark = pytest.mark.anyio


@pytest.mark.parametrize(
    "address",
    [
        "127.0.0.1",
        "127.1.2.3",
        "::1",
        "::ffff:127.0.0.1",
        "169.254.169.254",
        "100.64.0.1",
        "64:ff9b::7f00:1",
        "64:ff9b::a9fe:a9fe",
        "2002:7f00:1::",
        "192.0.0.8",
        "224.0.0.1",
        "fe80::1",
        "fe80::1%eth0",
        "fec0::1",  # site-local
        "fd00::1",
        "fc00::1",
        "0.0.0.0",
        "::",
        "10.0.0.1",
        "172.16.0.1",
        "192.168.1.1",
        "::ffff:10.0.0.1",
        "198.18.0.1",
        "255.255.255.255",
        "240.0.0.1",
        "::7f00:1",
        "ff02::1",
        "192.0.2.1",
        "2001:db8::1",
        "fd00:ec2::254",
    ],
)
def test_internal_addresses_are_refused_however_they_are_written(address: str) -> None:
    assert not address_allowed(address)


@pytest.mark.parametrize(
    "address", ["93.184.216.34", "1.1.1.1", "2606:4700:4700::1111", "::ffff:93.184.216.34"]
)
def test_public_addresses_are_allowed(address: str) -> None:
    assert address_allowed(address)


def resolver(*answers: str):  # type: ignore[no-untyped-def]
    async def resolve(host: str, port: int) -> list[str]:
        return list(answers)

    return resolve


async def test_a_host_name_resolving_to_loopback_is_refused() -> None:
    with pytest.raises(Blocked, match="WEBHOOK_ALLOW_PRIVATE"):
        await pin("http://localhost:8080/hook", allow_private=False)


async def test_only_the_allowed_addresses_of_a_name_are_used() -> None:
    targets = await pin(
        "https://hooks.example/x",
        allow_private=False,
        resolve=resolver("10.0.0.5", "93.184.216.34", "::1"),
    )
    assert [t.address for t in targets] == ["93.184.216.34"]


async def test_private_addresses_are_allowed_when_the_setting_says_so() -> None:
    targets = await pin("http://box.lan/x", allow_private=True, resolve=resolver("192.168.1.9"))
    assert [t.address for t in targets] == ["192.168.1.9"]


async def test_the_request_goes_to_the_checked_address_with_the_name_as_host_and_sni() -> None:
    [target] = await pin(
        "https://hooks.example:8443/in?x=1", allow_private=False, resolve=resolver("93.184.216.34")
    )
    async with make_client() as client:
        request = pinned_request(client, target, b"{}", {"webhook-id": "msg_1"})
    assert str(request.url) == "https://93.184.216.34:8443/in?x=1"
    assert request.headers["host"] == "hooks.example:8443"
    assert request.extensions["sni_hostname"] == "hooks.example"
    assert request.headers["webhook-id"] == "msg_1"


async def test_an_ipv6_address_is_bracketed_and_plain_http_has_no_sni() -> None:
    [target] = await pin(
        "http://hooks.example/in", allow_private=False, resolve=resolver("2606:4700:4700::1111")
    )
    assert str(target.url) == "http://[2606:4700:4700::1111]/in"
    assert target.host_header == "hooks.example" and target.sni_hostname is None


async def test_a_blocked_receiver_is_reported_without_sending_anything() -> None:
    async def refuse(request: httpx.Request) -> httpx.Response:
        raise AssertionError("nothing may be sent")

    async with httpx.AsyncClient(transport=httpx.MockTransport(refuse)) as client:
        answer = await post(
            client, "http://169.254.169.254/latest/meta-data", b"{}", {}, allow_private=False
        )
    assert answer.blocked and answer.status_code is None and "169.254.169.254" in answer.error


async def test_a_refusal_names_the_host_and_the_setting_but_never_what_it_resolved_to(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The caller learns that the host is internal, not what DNS answered for it (the guard is
    no oracle for internal names); the log keeps the addresses."""

    async def internal(host: str, port: int) -> list[str]:
        return ["10.20.30.40", "fd00::7"]

    async def refuse(request: httpx.Request) -> httpx.Response:
        raise AssertionError("nothing may be sent")

    url = "http://build-server.corp.example/hook"
    with caplog.at_level("WARNING", "a1111_proxy.egress"):
        async with httpx.AsyncClient(transport=httpx.MockTransport(refuse)) as client:
            answer = await post(client, url, b"{}", {}, allow_private=False, resolve=internal)
        with pytest.raises(ValueError) as fetched:
            await fetch(url, allow_private=False, max_bytes=1024, resolve=internal)
    for shown in (answer.error or "", str(fetched.value)):
        assert "build-server.corp.example is refused" in shown
        assert "private" in shown and "A1111_PROXY_WEBHOOK_ALLOW_PRIVATE=true" in shown
        assert "10.20.30.40" not in shown and "fd00::7" not in shown
    assert answer.blocked and answer.address is None
    logged = [record.getMessage() for record in caplog.records]
    assert len(logged) == 2 and all("10.20.30.40, fd00::7" in line for line in logged)


def test_retry_after_is_read_as_seconds_or_as_a_date() -> None:
    now = time.time()
    assert parse_retry_after("120") == 120.0
    assert 58 <= parse_retry_after(formatdate(now + 60, usegmt=True), now=now) <= 60
    assert parse_retry_after("soon") is None and parse_retry_after(None) is None


def test_signatures_verify_with_standardwebhooks_for_whsec_and_plain_secrets() -> None:
    body = b'{"type":"job.completed"}'
    whsec = "whsec_" + base64.b64encode(b"0123456789abcdef0123").decode()
    now = int(time.time())
    Webhook(whsec).verify(body, webhook_headers("msg_a", body, whsec, now))
    Webhook(b"plain").verify(body, webhook_headers("msg_a", body, "plain", now))
    unpadded = whsec.rstrip("=")
    assert signing_key(unpadded) == signing_key(whsec)


def test_a_signature_is_made_for_its_moment_and_an_old_one_is_rejected() -> None:
    body = b"{}"
    old = webhook_headers("msg_a", body, "s", int(time.time()) - 301)
    fresh = webhook_headers("msg_a", body, "s", int(time.time()))
    with pytest.raises(WebhookVerificationError):
        Webhook(b"s").verify(body, old)
    Webhook(b"s").verify(body, fresh)
    assert old["webhook-signature"] != fresh["webhook-signature"]


def test_without_any_secret_messages_go_unsigned() -> None:
    assert "webhook-signature" not in webhook_headers("msg_a", b"{}", "", 1)


def test_a_whsec_secret_that_is_not_base64_is_refused() -> None:
    with pytest.raises(ValueError, match="base64"):
        signing_key("whsec_not base64!")


def test_the_retry_schedule_runs_about_a_day_with_20_percent_jitter() -> None:
    low, mid, high = (RetryPolicy(rng=lambda v=v: v) for v in (0.0, 0.5, 1.0))
    assert [mid.delay_after(n) for n in range(1, 8)] == [5, 300, 1800, 7200, 18000, 36000, 36000]
    assert low.delay_after(1) == pytest.approx(4.0) and high.delay_after(1) == pytest.approx(6.0)
    assert sum(mid.delay_after(n) or 0 for n in range(8)) / 3600 == pytest.approx(27.6, abs=0.1)
    assert mid.delay_after(8) is None  # eight attempts in all


def test_the_retry_schedule_and_the_senders_lease_are_settings(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    default = sender_config(Settings(_env_file=None))  # type: ignore[call-arg]
    assert default.policy.schedule == SCHEDULE_SECONDS and default.lease_seconds == 120
    monkeypatch.setenv("A1111_PROXY_WEBHOOK_RETRY_SECONDS", "0.2, 1")
    monkeypatch.setenv("A1111_PROXY_WEBHOOK_LEASE_SECONDS", "2.5")
    quick = sender_config(Settings(_env_file=None))  # type: ignore[call-arg]
    assert quick.policy.schedule == (0.0, 0.2, 1.0) and quick.lease_seconds == 2.5
    assert quick.policy.delay_after(3) is None  # three attempts in all
    monkeypatch.setenv("A1111_PROXY_WEBHOOK_RETRY_SECONDS", "5,-1")
    with pytest.raises(ValueError, match="webhook_retry_seconds"):
        Settings(_env_file=None)  # type: ignore[call-arg]


def test_retry_after_can_lengthen_a_wait_but_never_shorten_it() -> None:
    policy = RetryPolicy(rng=lambda: 0.5)
    assert policy.delay_after(1, retry_after=120) == 120
    assert policy.delay_after(2, retry_after=1) == 300
    assert policy.delay_after(1, retry_after=10**9) == 86400


def _delivery(event: str = "completed", trigger: str = "scheduled", attempt: int = 1) -> Delivery:
    return Delivery(1, "msg_x", 1, event, "http://x", "{}", 0.0, trigger, attempt, "t")


@pytest.mark.parametrize(
    ("status", "error", "outcome"),
    [
        (200, None, "delivered"),
        (204, None, "delivered"),
        (500, None, "pending"),
        (503, None, "pending"),
        (429, None, "pending"),
        (302, None, "pending"),
        (404, None, "pending"),
        (410, None, "failed"),
        (None, "timeout: no answer", "pending"),
        (None, "ConnectError: refused", "pending"),
    ],
)
def test_what_an_answer_means_for_a_completed_message(
    status: int | None, error: str | None, outcome: str
) -> None:
    answer = Answer(0.0, 5, status_code=status, error=error)
    assert judge(_delivery(), answer, RetryPolicy(), now=0).status == outcome


def test_intermediate_messages_manual_attempts_and_blocked_ones_are_not_retried() -> None:
    failed = Answer(0.0, 5, status_code=500)
    policy = RetryPolicy()
    assert judge(_delivery("progress"), failed, policy, 0).status == "failed"
    assert judge(_delivery("started"), failed, policy, 0).status == "failed"
    assert judge(_delivery(trigger="manual"), failed, policy, 0).status == "failed"
    blocked = Answer(0.0, 5, error="blocked: no", blocked=True)
    assert judge(_delivery(), blocked, policy, 0).status == "failed"
