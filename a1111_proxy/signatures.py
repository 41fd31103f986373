"""Standard Webhooks signatures (v1, HMAC-SHA256), as `standardwebhooks.Webhook.verify` checks them.

The signed content is `{webhook-id}.{webhook-timestamp}.{body}`. The key is a `whsec_` secret
base64-decoded, or any other string's UTF-8 bytes. Receivers allow 5 minutes of clock skew, so a
signature is made at the moment of each attempt and never stored.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re

SECRET_PREFIX = "whsec_"
_BASE64 = re.compile(r"^[A-Za-z0-9+/]+={0,2}$")


def signing_key(secret: str) -> bytes:
    """The HMAC key for a secret. Raises ValueError for a `whsec_` secret that is not base64."""
    if not secret.startswith(SECRET_PREFIX):
        return secret.encode()
    encoded = secret[len(SECRET_PREFIX) :]
    if not _BASE64.match(encoded):
        raise ValueError("a whsec_ secret must be whsec_ followed by base64 of the key bytes")
    # Decoded exactly as standardwebhooks does (padding added, so unpadded base64 works too).
    return base64.b64decode(encoded + "==")


def sign(key: bytes, message_id: str, timestamp: int, body: bytes) -> str:
    content = f"{message_id}.{timestamp}.".encode() + body
    digest = hmac.new(key, content, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode("ascii")


def webhook_headers(message_id: str, body: bytes, secret: str, timestamp: int) -> dict[str, str]:
    """The Standard Webhooks headers for one attempt; unsigned when there is no secret."""
    headers = {"webhook-id": message_id, "webhook-timestamp": str(timestamp)}
    if secret:
        headers["webhook-signature"] = sign(signing_key(secret), message_id, timestamp, body)
    return headers
