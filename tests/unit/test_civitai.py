"""CivitaiClient against respx (through its `transport=`): summaries, 404s, retries, rate limit."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from email.utils import format_datetime

import httpx
import pytest
import respx

from a1111_proxy.civitai import CivitaiClient, CivitaiUnavailable, retry_after_seconds
from tests.fakes.civitai import CIVITAI, RecordedSleep, by_hash, transport, version

pytestmark = pytest.mark.anyio

SHA = "6ce0161689b3853acaa03779ec93eafe75a02f4ced659bee03f50797806fa2fa"


@pytest.fixture
def router() -> respx.Router:
    return respx.Router(assert_all_called=False)


@pytest.fixture
def sleep() -> RecordedSleep:
    return RecordedSleep()


def client_for(router: respx.Router, sleep: RecordedSleep, **options: object) -> CivitaiClient:
    return CivitaiClient(
        CIVITAI, transport=transport(router), sleep=sleep, clock=sleep.clock, **options
    )  # type: ignore[arg-type]


async def test_a_hit_is_summarized_with_names_words_images_and_urls(
    router: respx.Router, sleep: RecordedSleep
) -> None:
    route = by_hash(router, SHA).respond(200, json=version(42, "Dreamy", "LORA"))
    client = client_for(router, sleep)
    summary = await client.version(SHA)
    await client.aclose()
    assert summary == {
        "model_id": 1042,
        "version_id": 42,
        "model_name": "Dreamy",
        "version_name": "v1.0",
        "type": "LORA",
        "base_model": "SD 1.5",
        "trained_words": ["detailed"],
        "nsfw": False,
        "nsfw_level": 1,
        "images": [
            {"url": "https://image.test/42.jpeg", "nsfw_level": 1, "width": 512, "height": 768}
        ],
        "download_url": f"{CIVITAI}/api/download/models/42",
        "page_url": f"{CIVITAI}/models/1042?modelVersionId=42",
    }
    sent = route.calls.last.request
    assert "authorization" not in sent.headers
    assert sent.headers["user-agent"].startswith("a1111-proxy/")


async def test_the_token_is_sent_as_a_bearer_token(
    router: respx.Router, sleep: RecordedSleep
) -> None:
    route = by_hash(router, SHA).respond(200, json=version(1, "M"))
    client = client_for(router, sleep, token="s3cret")
    await client.version(SHA)
    await client.aclose()
    assert route.calls.last.request.headers["authorization"] == "Bearer s3cret"


async def test_a_404_means_not_on_civitai(router: respx.Router, sleep: RecordedSleep) -> None:
    route = by_hash(router, SHA).respond(404, json={"error": "Model not found"})
    client = client_for(router, sleep)
    assert await client.version(SHA) is None
    await client.aclose()
    assert route.call_count == 1 and sleep.waits == []


async def test_a_429_is_retried_after_at_least_what_retry_after_says(
    router: respx.Router, sleep: RecordedSleep
) -> None:
    route = by_hash(router, SHA).mock(
        side_effect=[
            httpx.Response(429, headers={"Retry-After": "7"}),
            httpx.Response(200, json=version(5, "Later")),
        ]
    )
    client = client_for(router, sleep)
    summary = await client.version(SHA)
    await client.aclose()
    assert summary is not None and summary["model_name"] == "Later"
    assert route.call_count == 2
    assert len(sleep.waits) == 1 and sleep.waits[0] >= 7


async def test_5xx_is_retried_with_backoff_then_gives_up_as_unavailable(
    router: respx.Router, sleep: RecordedSleep
) -> None:
    route = by_hash(router, SHA).respond(503)
    client = client_for(router, sleep, attempts=4)
    with pytest.raises(CivitaiUnavailable, match="503"):
        await client.version(SHA)
    await client.aclose()
    assert route.call_count == 4
    assert len(sleep.waits) == 3 and all(wait >= 1 for wait in sleep.waits)


async def test_a_retry_after_past_the_limit_ends_the_round_and_says_when(
    router: respx.Router, sleep: RecordedSleep
) -> None:
    route = by_hash(router, SHA).respond(429, headers={"Retry-After": "3600"})
    client = client_for(router, sleep, max_retry_after=300)
    with pytest.raises(CivitaiUnavailable) as raised:
        await client.version(SHA)
    await client.aclose()
    assert route.call_count == 1 and raised.value.retry_after == 3600


async def test_an_unreachable_civitai_is_unavailable_at_once(
    router: respx.Router, sleep: RecordedSleep
) -> None:
    route = by_hash(router, SHA).mock(side_effect=httpx.ConnectError("no route to host"))
    client = client_for(router, sleep)
    with pytest.raises(CivitaiUnavailable, match="ConnectError"):
        await client.version(SHA)
    await client.aclose()
    assert route.call_count == 1


async def test_requests_start_at_most_one_a_second(
    router: respx.Router, sleep: RecordedSleep
) -> None:
    router.get(url__startswith=f"{CIVITAI}/api/v1/model-versions/by-hash/").respond(404)
    client = client_for(router, sleep)
    for n in range(3):
        await client.version(f"{n:010x}")
    await client.aclose()
    assert sleep.waits == [pytest.approx(1.0), pytest.approx(1.0)]


def test_retry_after_may_be_an_http_date() -> None:
    when = datetime.now(UTC) + timedelta(seconds=120)
    response = httpx.Response(429, headers={"Retry-After": format_datetime(when, usegmt=True)})
    assert 110 < (retry_after_seconds(response) or 0) <= 120
    assert retry_after_seconds(httpx.Response(429, headers={"Retry-After": "soon"})) is None
