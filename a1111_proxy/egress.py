"""Outbound requests to addresses users chose (webhook URLs), made safely.

The SSRF guard resolves the host once, keeps only addresses that are allowed and connects to the
address it checked: the URL is rewritten to that IP, with the original `Host` header and, for
https, the original name as TLS SNI and certificate name (httpcore's `sni_hostname` request
extension). So a DNS answer that changes between check and connect (rebinding) cannot redirect
the request. `ipaddress.is_global` alone is not enough (it calls NAT64- and 6to4-wrapped
loopback, 192.0.0.8 and multicast global), hence the explicit blocklist, applied after unwrapping
IPv4-mapped addresses.

Certificates are checked against the public CAs (certifi's, as httpx does), plus those of
WEBHOOK_CA_BUNDLE when set (receivers with certificates from a private CA).

Redirects are never followed; answers are read up to 64 KiB; one attempt takes at most 15 s.
`stream` (model downloads) is the exception: it follows a few redirects, checking every hop, and
its caller reads the body as it comes; hosts the caller trusts (the configured Civitai site) may
be internal, and only they get the caller's credentials.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from ipaddress import IPv4Address, IPv6Address, ip_address, ip_network
from typing import Any

import certifi
import httpx

from a1111_proxy import __version__

CONNECT_TIMEOUT_SECONDS = 5.0
TOTAL_TIMEOUT_SECONDS = 15.0
MAX_RESPONSE_BYTES = 64 * 1024
MAX_REDIRECTS = 5  # `stream` only
REDIRECTS = frozenset({301, 302, 303, 307, 308})
log = logging.getLogger("a1111_proxy.egress")

BLOCKED_NETWORKS = tuple(
    ip_network(net)
    for net in (
        # IPv4: this network, private, CGNAT, loopback, link-local (cloud metadata), IETF protocol
        # assignments (192.0.0.8 ...), documentation, 6to4 relay, benchmarking, multicast, reserved.
        "0.0.0.0/8",
        "10.0.0.0/8",
        "100.64.0.0/10",
        "127.0.0.0/8",
        "169.254.0.0/16",
        "172.16.0.0/12",
        "192.0.0.0/24",
        "192.0.2.0/24",
        "192.88.99.0/24",
        "192.168.0.0/16",
        "198.18.0.0/15",
        "198.51.100.0/24",
        "203.0.113.0/24",
        "224.0.0.0/4",
        "240.0.0.0/4",
        # IPv6: unspecified, loopback, IPv4-compatible and -translated, NAT64 (well-known and
        # local-use), discard, Teredo, documentation, 6to4, unique-local, link-local, multicast.
        "::/128",
        "::1/128",
        "::/96",
        "::ffff:0:0:0/96",
        "64:ff9b::/96",
        "64:ff9b:1::/48",
        "100::/64",
        "2001::/32",
        "2001:db8::/32",
        "2002::/16",
        "fc00::/7",
        "fe80::/10",
        "fec0::/10",  # site-local (deprecated, still routed inside some networks)
        "ff00::/8",
    )
)

Resolver = Callable[[str, int], Awaitable[list[str]]]

# OpenSSL's verify codes for a certificate whose CA is not trusted: the issuer cannot be found
# (2, 20), or the chain ends in a self-signed certificate (18, 19).
UNKNOWN_ISSUER = frozenset({2, 18, 19, 20})


class Blocked(Exception):
    """The webhook URL's host resolves only to addresses that are not allowed.

    Its text, which callers are shown, never says what the host resolved to (that would make
    the guard a DNS oracle for internal names); `addresses` is for the logs."""

    def __init__(self, host: str, addresses: list[str]) -> None:
        super().__init__(
            f"{host} is refused: it resolves to a loopback, private, link-local or otherwise "
            "internal address, which a1111-proxy may not reach; set "
            "A1111_PROXY_WEBHOOK_ALLOW_PRIVATE=true for hosts on your own network"
        )
        self.host = host
        self.addresses = addresses

    def detail(self) -> str:
        """For the log: the addresses it resolved to."""
        return f"{self.host} resolves to {', '.join(self.addresses) or 'nothing'}"


class Unresolvable(Exception):
    """The webhook URL's host name could not be resolved."""


def address_allowed(address: str) -> bool:
    """True for a public unicast address; False for anything internal, however it is written."""
    ip: IPv4Address | IPv6Address = ip_address(address.split("%", 1)[0])
    if isinstance(ip, IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if not ip.is_global:
        return False
    return not any(ip in net for net in BLOCKED_NETWORKS if net.version == ip.version)


async def system_resolve(host: str, port: int) -> list[str]:
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(
            host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP
        )
    except socket.gaierror as exc:
        raise Unresolvable(f"cannot resolve {host}: {exc.strerror or exc}") from None
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


@dataclass(frozen=True)
class Target:
    """Where one request really goes: a checked address, and the names the server expects."""

    url: httpx.URL  # the original URL with its host replaced by `address`
    address: str
    host_header: str
    sni_hostname: str | None


async def pin(url: str, *, allow_private: bool, resolve: Resolver = system_resolve) -> list[Target]:
    """Resolve the URL's host; one target per allowed address. Raises Blocked, Unresolvable."""
    parsed = httpx.URL(url)
    host, port = parsed.host, parsed.port or (443 if parsed.scheme == "https" else 80)
    addresses = await resolve(host, port)
    allowed = [a.split("%", 1)[0] for a in addresses if allow_private or address_allowed(a)]
    if not allowed:
        raise Blocked(host, addresses)
    return [
        Target(
            url=parsed.copy_with(host=address),
            address=address,
            host_header=parsed.netloc.decode("ascii"),
            sni_hostname=host if parsed.scheme == "https" else None,
        )
        for address in allowed
    ]


def pinned_request(
    client: httpx.AsyncClient, target: Target, body: bytes, headers: dict[str, str]
) -> httpx.Request:
    extensions = {"sni_hostname": target.sni_hostname} if target.sni_hostname else {}
    return client.build_request(
        "POST",
        target.url,
        content=body,
        extensions=extensions,
        headers={
            **headers,
            "Host": target.host_header,
            "Content-Type": "application/json",
            "Accept-Encoding": "identity",
        },
    )


@dataclass(frozen=True)
class Answer:
    """What one POST got: an HTTP answer, or an error (then `status_code` is None)."""

    started_at: float
    duration_ms: int
    status_code: int | None = None
    body: str | None = None
    retry_after: float | None = None
    error: str | None = None
    blocked: bool = False
    address: str | None = None


def make_client(
    ca_bundle: str = "", *, timeout: float = TOTAL_TIMEOUT_SECONDS
) -> httpx.AsyncClient:
    """One client per sender. No keep-alive: a pooled connection is keyed by IP, and must not be
    reused for another host name (its TLS certificate was checked for the first one).
    `ca_bundle`: a PEM file of CA certificates trusted besides the public ones; `timeout`: the
    longest wait for a connection's next bytes."""
    return httpx.AsyncClient(
        verify=tls_context(ca_bundle),
        timeout=httpx.Timeout(timeout, connect=CONNECT_TIMEOUT_SECONDS),
        limits=httpx.Limits(max_keepalive_connections=0),
        follow_redirects=False,
        trust_env=False,
        headers={"User-Agent": f"a1111-proxy/{__version__}"},
    )


def tls_context(ca_bundle: str = "") -> ssl.SSLContext:
    """Certificate checks against the public CAs, and those in `ca_bundle` when given. Raises
    ValueError naming the file when it cannot be read."""
    context = ssl.create_default_context(cafile=certifi.where())
    if ca_bundle:
        try:
            context.load_verify_locations(cafile=ca_bundle)
        except (OSError, ssl.SSLError) as exc:
            raise ValueError(
                f"A1111_PROXY_WEBHOOK_CA_BUNDLE: cannot load CA certificates from {ca_bundle} "
                f"({exc}); it must be a PEM file of one or more certificates"
            ) from None
    return context


def certificate_refused(exc: BaseException, host: str) -> str | None:
    """What an attempt's log says when the receiver's certificate failed the check (its name,
    its CA or its dates); None for other errors."""
    cause: BaseException | None = exc
    while cause is not None and not isinstance(cause, ssl.SSLCertVerificationError):
        cause = cause.__cause__ or cause.__context__
    if cause is None:
        return None
    reason = str(cause.verify_message or cause).rstrip(".")
    message = f"tls: the certificate of {host} was refused ({reason})"
    if cause.verify_code in UNKNOWN_ISSUER:
        message += "; a receiver whose certificate comes from a private CA needs that CA in "
        message += "A1111_PROXY_WEBHOOK_CA_BUNDLE"
    return message


async def post(
    client: httpx.AsyncClient,
    url: str,
    body: bytes,
    headers: dict[str, str],
    *,
    allow_private: bool,
    resolve: Resolver = system_resolve,
    timeout: float = TOTAL_TIMEOUT_SECONDS,
) -> Answer:
    """POST `body` to `url` through the guard; never raises for network trouble."""
    started, clock = time.time(), time.monotonic()
    tried: list[str] = []

    def answer(**fields: Any) -> Answer:
        duration = int((time.monotonic() - clock) * 1000)
        return Answer(started, duration, address=tried[-1] if tried else None, **fields)

    try:
        async with asyncio.timeout(timeout):
            targets = await pin(url, allow_private=allow_private, resolve=resolve)
            status, text, retry_after = await _post_first(client, targets, body, headers, tried)
    except Blocked as exc:
        log.warning("refused to send a webhook: %s", exc.detail())
        return answer(error=f"blocked: {exc}", blocked=True)
    except Unresolvable as exc:
        return answer(error=f"dns: {exc}")
    except TimeoutError:
        return answer(error=f"timeout: no complete answer within {timeout:g} s")
    except httpx.ConnectTimeout:
        return answer(error=f"timeout: could not connect within {CONNECT_TIMEOUT_SECONDS:g} s")
    except httpx.HTTPError as exc:
        refused = certificate_refused(exc, httpx.URL(url).host)
        return answer(error=refused or f"{type(exc).__name__}: {exc or 'connection failed'}")
    return answer(status_code=status, body=text, retry_after=retry_after)


async def _post_first(
    client: httpx.AsyncClient,
    targets: list[Target],
    body: bytes,
    headers: dict[str, str],
    tried: list[str],
) -> tuple[int, str, float | None]:
    """POST to the first address that accepts a connection (a dual-stack host may have a dead
    IPv6 address); an error from the last one is raised."""
    for target in targets:
        tried.append(target.address)
        try:
            response = await client.send(pinned_request(client, target, body, headers), stream=True)
        except (httpx.ConnectError, httpx.ConnectTimeout):
            if target is targets[-1]:
                raise
            continue
        try:
            text = await _read_limited(response)
        finally:
            await response.aclose()
        return response.status_code, text, parse_retry_after(response.headers.get("retry-after"))
    raise AssertionError("pin() returns at least one target")


async def fetch(
    url: str,
    *,
    allow_private: bool,
    max_bytes: int,
    resolve: Resolver = system_resolve,
    ca_bundle: str = "",
) -> bytes:
    """GET `url` through the guard (an input image a client gave by URL). Raises ValueError
    with a message for the client when it cannot be had."""
    if not url.startswith(("http://", "https://")):
        raise ValueError("only http(s) URLs can be fetched")
    try:
        async with asyncio.timeout(TOTAL_TIMEOUT_SECONDS), make_client(ca_bundle) as client:
            target = (await pin(url, allow_private=allow_private, resolve=resolve))[0]
            extensions = {"sni_hostname": target.sni_hostname} if target.sni_hostname else {}
            request = client.build_request(
                "GET", target.url, extensions=extensions, headers={"Host": target.host_header}
            )
            response = await client.send(request, stream=True)
            try:
                if response.status_code != 200:
                    raise ValueError(f"fetching it answered HTTP {response.status_code}")
                data = b""
                async for chunk in response.aiter_raw():
                    data += chunk
                    if len(data) > max_bytes:
                        raise ValueError(f"it is larger than {max_bytes} bytes")
                return data
            finally:
                await response.aclose()
    except Blocked as exc:
        log.warning("refused to fetch an input image: %s", exc.detail())
        raise ValueError(str(exc)) from None
    except Unresolvable as exc:
        raise ValueError(str(exc)) from None
    except TimeoutError:
        raise ValueError(f"no complete answer within {TOTAL_TIMEOUT_SECONDS:g} s") from None
    except httpx.HTTPError as exc:
        raise ValueError(f"it could not be fetched ({type(exc).__name__})") from None


@asynccontextmanager
async def stream(
    client: httpx.AsyncClient,
    url: str,
    *,
    allow_private: bool,
    headers: Mapping[str, str] | None = None,
    trusted: Callable[[str], bool] = lambda url: False,
    trusted_headers: Mapping[str, str] | None = None,
    resolve: Resolver = system_resolve,
) -> AsyncIterator[httpx.Response]:
    """GET `url` through the guard, following up to MAX_REDIRECTS redirects, each hop resolved
    and checked, except hosts that `trusted` accepts (they may be internal). `trusted_headers`
    (a token) go to trusted hosts only: a redirect elsewhere never carries them. Yields the last
    answer with its body unread; raises Blocked, Unresolvable, httpx.HTTPError."""
    for _ in range(MAX_REDIRECTS + 1):
        is_trusted = trusted(url)
        sent = {**(headers or {}), **((trusted_headers or {}) if is_trusted else {})}
        targets = await pin(url, allow_private=allow_private or is_trusted, resolve=resolve)
        response = await _get_first(client, targets, sent)
        location = response.headers.get("location")
        if response.status_code not in REDIRECTS or not location:
            break
        await response.aclose()
        url = _redirected(url, location)
    else:
        raise httpx.TooManyRedirects(f"more than {MAX_REDIRECTS} redirects", request=None)
    try:
        yield response
    finally:
        await response.aclose()


def _redirected(url: str, location: str) -> str:
    target = httpx.URL(url).join(location)
    if target.scheme not in ("http", "https"):
        raise httpx.UnsupportedProtocol(f"a redirect to a {target.scheme}: URL")
    return str(target)


async def _get_first(
    client: httpx.AsyncClient, targets: list[Target], headers: dict[str, str]
) -> httpx.Response:
    """GET from the first address that accepts a connection; an error from the last one is
    raised."""
    for target in targets:
        extensions = {"sni_hostname": target.sni_hostname} if target.sni_hostname else {}
        request = client.build_request(
            "GET",
            target.url,
            extensions=extensions,
            headers={**headers, "Host": target.host_header},
        )
        try:
            return await client.send(request, stream=True)
        except (httpx.ConnectError, httpx.ConnectTimeout):
            if target is targets[-1]:
                raise
    raise AssertionError("pin() returns at least one target")


async def _read_limited(response: httpx.Response) -> str:
    data = b""
    async for chunk in response.aiter_raw():
        data += chunk
        if len(data) >= MAX_RESPONSE_BYTES:
            break
    return data[:MAX_RESPONSE_BYTES].decode("utf-8", "replace")


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds from a `Retry-After` header (delay-seconds or an HTTP date), or None."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))
