"""https webhooks through the pinned address: the sender resolves the host once, connects to the
checked IP, and still asks for the URL's host name (SNI) and checks the certificate against it.
A CA made here (with the `openssl` command), a receiver on 127.0.0.1 with a certificate for
`hooks.test`, and a resolver that says where `hooks.test` is."""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from a1111_proxy.egress import tls_context
from a1111_proxy.jobs import JobRepository, NewJob
from a1111_proxy.wakeup import make_wakeup
from a1111_proxy.webhooks import RetryPolicy
from tests.claims import claim_next
from tests.fakes.webhook_sink import WebhookSink
from tests.servers import TLS, serve
from worker.sender import SenderConfig, WebhookSender

pytestmark = [
    pytest.mark.anyio,
    pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command"),
]

HOST = "hooks.test"


@pytest.fixture
def database_url(sqlite_url: str) -> str:
    return sqlite_url  # TLS does not depend on the database


# --- a CA of our own -----------------------------------------------------------------------------


@dataclass(frozen=True)
class CA:
    cert: Path
    key: Path


def _openssl(*args: str | Path) -> None:
    subprocess.run(["openssl", *map(str, args)], check=True, capture_output=True)


def make_ca(folder: Path, name: str) -> CA:
    folder.mkdir(parents=True, exist_ok=True)
    ca = CA(folder / f"{name}.pem", folder / f"{name}.key")
    _openssl(
        "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
        "-keyout", ca.key, "-out", ca.cert, "-days", "2", "-subj", f"/CN={name}",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign",
    )  # fmt: skip
    return ca


def issue(ca: CA, hostname: str, folder: Path) -> TLS:
    """A server certificate for `hostname`, signed by `ca`."""
    stem = f"{hostname.replace('.', '_')}-by-{ca.cert.stem}"
    extensions = folder / f"{stem}.ext"
    extensions.write_text(
        f"subjectAltName=DNS:{hostname}\nbasicConstraints=critical,CA:FALSE\n"
        "keyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\n"
        "subjectKeyIdentifier=hash\nauthorityKeyIdentifier=keyid\n"
    )
    key, csr, cert = (folder / f"{stem}.{suffix}" for suffix in ("key", "csr", "pem"))
    _openssl(
        "req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
        "-keyout", key, "-out", csr, "-subj", f"/CN={hostname}",
    )  # fmt: skip
    _openssl(
        "x509", "-req", "-in", csr, "-CA", ca.cert, "-CAkey", ca.key, "-set_serial", "2",
        "-days", "2", "-extfile", extensions, "-out", cert,
    )  # fmt: skip
    return TLS(cert, key)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Our CA with certificates for hooks.test and for other.test, and a CA nobody trusts with
    its own certificate for hooks.test."""
    folder = tmp_path_factory.mktemp("pki")
    ours, stranger = make_ca(folder, "our-ca"), make_ca(folder, "stranger-ca")
    return {
        "ca": ours,
        "hooks.test": issue(ours, HOST, folder),
        "other.test": issue(ours, "other.test", folder),
        "untrusted": issue(stranger, HOST, folder),
    }


# --- the receiver, the resolver and the sender -----------------------------------------------


@dataclass
class Receiver:
    sink: WebhookSink
    port: int
    server_names: list[str | None]


@pytest.fixture
def receiver_with() -> Iterator[Callable[[TLS], Receiver]]:
    """Start an https webhook receiver on 127.0.0.1 that presents the given certificate and
    records the server name (SNI) of each TLS handshake."""
    with contextlib.ExitStack() as stack:

        def start(tls: TLS) -> Receiver:
            names: list[str | None] = []
            sink = WebhookSink()
            presented = TLS(tls.certfile, tls.keyfile, on_server_name=names.append)
            url = stack.enter_context(serve(sink.app, presented))
            return Receiver(sink, int(url.rsplit(":", 1)[1]), names)

        yield start


async def resolve(host: str, port: int) -> list[str]:
    """The test's DNS: the receivers' names are on loopback."""
    assert host in (HOST, "other.test"), host
    return ["127.0.0.1"]


def sender(repo: JobRepository, database_url: str, ca_bundle: str = "") -> WebhookSender:
    config = SenderConfig(
        allow_private=True,  # the receiver is on loopback
        ca_bundle=ca_bundle,
        idle_seconds=0.02,
        timeout_seconds=10.0,
        stop_grace_seconds=0.2,
        policy=RetryPolicy(schedule=(0,)),  # one attempt: its log is what the tests read
    )
    return WebhookSender(repo, make_wakeup(database_url, 0.005), config, resolve=resolve)


async def announce(repo: JobRepository, url: str) -> int:
    """A job with this webhook URL, run to completion (its job.completed message is due)."""
    text = json.dumps({"prompt": "a cat"})
    new = NewJob(
        "txt2img", request=text, payload=text, webhook_url=url, webhook_events='["completed"]'
    )
    await repo.submit(new)
    claim = await claim_next(repo, "w1", "http://a1111")
    assert claim is not None
    assert await repo.complete(claim, {"images": [], "info": "{}"}, [])
    return claim.seq


async def send(repo: JobRepository, database_url: str, url: str, ca_bundle: str) -> Any:
    """Announce a job to `url` and make one delivery attempt; return that attempt."""
    seq = await announce(repo, url)
    made = sender(repo, database_url, ca_bundle)
    await made.run_until_idle()
    await made.aclose()
    [(delivery, [attempt])] = await repo.deliveries.for_job(seq)
    return delivery, attempt


# --- the tests -----------------------------------------------------------------------------------


async def test_an_https_webhook_goes_to_the_pinned_address_asking_for_the_host_name_and_checks_it(
    repo: JobRepository, database_url: str, pki: dict[str, Any], receiver_with: Any
) -> None:
    receiver = receiver_with(pki["hooks.test"])
    url = f"https://{HOST}:{receiver.port}/hook"
    delivery, attempt = await send(repo, database_url, url, str(pki["ca"].cert))
    assert delivery.status == "delivered" and attempt.status_code == 200, attempt.error
    assert attempt.address == "127.0.0.1"  # the address that was resolved and checked
    assert receiver.server_names == [HOST]  # SNI: the URL's name, not the IP
    [hook] = receiver.sink.received
    assert hook.headers["host"] == f"{HOST}:{receiver.port}"
    assert json.loads(hook.body)["type"] == "job.completed"


async def test_a_certificate_for_another_host_name_is_refused_saying_so(
    repo: JobRepository, database_url: str, pki: dict[str, Any], receiver_with: Any
) -> None:
    receiver = receiver_with(pki["other.test"])  # trusted CA, wrong name
    url = f"https://{HOST}:{receiver.port}/hook"
    delivery, attempt = await send(repo, database_url, url, str(pki["ca"].cert))
    assert delivery.status == "failed" and attempt.status_code is None
    assert attempt.error.startswith(f"tls: the certificate of {HOST} was refused")
    assert "Hostname mismatch" in attempt.error and HOST in attempt.error
    assert "CA_BUNDLE" not in attempt.error  # the CA is trusted: no hint about it
    assert receiver.sink.received == []  # nothing was sent over that connection


async def test_a_certificate_from_a_ca_that_is_not_trusted_is_refused(
    repo: JobRepository, database_url: str, pki: dict[str, Any], receiver_with: Any
) -> None:
    receiver = receiver_with(pki["untrusted"])  # the right name, from a stranger's CA
    url = f"https://{HOST}:{receiver.port}/hook"
    delivery, attempt = await send(repo, database_url, url, str(pki["ca"].cert))
    assert delivery.status == "failed" and attempt.status_code is None
    assert attempt.error.startswith(f"tls: the certificate of {HOST} was refused")
    assert "unable to get local issuer certificate" in attempt.error
    assert "A1111_PROXY_WEBHOOK_CA_BUNDLE" in attempt.error
    assert receiver.sink.received == []


async def test_without_the_ca_bundle_a_private_ca_is_not_trusted(
    repo: JobRepository, database_url: str, pki: dict[str, Any], receiver_with: Any
) -> None:
    receiver = receiver_with(pki["hooks.test"])
    url = f"https://{HOST}:{receiver.port}/hook"
    delivery, attempt = await send(repo, database_url, url, "")  # the public CAs only
    assert delivery.status == "failed"
    assert "unable to get local issuer certificate" in attempt.error
    assert receiver.sink.received == []


def test_a_ca_bundle_that_cannot_be_read_stops_the_sender_naming_the_setting(
    tmp_path: Path,
) -> None:
    broken = tmp_path / "ca.pem"
    broken.write_text("not a certificate")
    for path in (broken, tmp_path / "missing.pem"):
        with pytest.raises(ValueError, match=r"A1111_PROXY_WEBHOOK_CA_BUNDLE.*PEM"):
            tls_context(str(path))
