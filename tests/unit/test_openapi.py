"""The OpenAPI document: every route in it, the committed openapi/openapi.json current, OpenAPI
3.1 with both auth schemes. The running server against the document is in
tests/integration/test_openapi.py."""

from __future__ import annotations

import json
import re

from starlette.routing import Route

from a1111_proxy.openapi import OPERATIONS, build_spec
from a1111_proxy.routes import ROUTES
from tests.servers import ROOT

# Pages for people (Swagger UI, the web UI), not API operations.
UNDOCUMENTED = {
    "/openapi.json",
    "/doc",
    "/",
    "/ui",
    "/ui/",
    "/ui/assets/{version}/{path:path}",
    "/sdapi/v1/{rest:path}",
    "/controlnet/{rest:path}",
}


def test_every_route_is_documented_and_every_documented_operation_exists() -> None:
    routes = {
        (method.lower(), re.sub(r"{(\w+):\w+}", r"{\1}", route.path))
        for route in ROUTES
        if isinstance(route, Route) and route.path not in UNDOCUMENTED
        for method in (route.methods or ())
        if method != "HEAD"
    }
    documented = {(op.method, op.path) for op in OPERATIONS}
    assert routes == documented


def test_the_committed_openapi_json_is_current() -> None:
    committed = json.loads((ROOT / "openapi" / "openapi.json").read_text())
    assert committed == build_spec(), "openapi/openapi.json is stale: run `make openapi`"


def test_the_document_is_openapi_3_1_with_both_auth_schemes_and_marked_extensions() -> None:
    spec = build_spec()
    assert spec["openapi"] == "3.1.0"
    assert set(spec["components"]["securitySchemes"]) == {"bearer", "basic"}
    proxy = spec["components"]["schemas"]["ProxyFields"]["properties"]
    assert all("a1111-proxy extension" in field["description"] for field in proxy.values())
    txt2img = spec["components"]["schemas"]["Txt2ImgRequest"]["properties"]
    assert txt2img["steps"]["default"] == 50 and txt2img["sampler_index"]["default"] == "Euler"
    assert spec["paths"]["/health"]["get"]["security"] == []
