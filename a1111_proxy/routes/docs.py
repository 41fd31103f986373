"""The OpenAPI document and Swagger UI, served from local assets (works air-gapped)."""

from __future__ import annotations

from functools import cache
from pathlib import Path
from typing import Any

from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.staticfiles import StaticFiles

from a1111_proxy.openapi import build_spec

INDEX = """<!doctype html>
<html lang="en">
<head>
  <meta charset="utf-8">
  <title>a1111-proxy API</title>
  <link rel="stylesheet" href="/doc/static/swagger-ui.css">
  <link rel="icon" type="image/png" href="/doc/static/favicon-32x32.png">
</head>
<body>
  <div id="swagger-ui"></div>
  <script src="/doc/static/swagger-ui-bundle.js"></script>
  <script src="/doc/static/swagger-ui-standalone-preset.js"></script>
  <script>
    window.ui = SwaggerUIBundle({
      url: "/openapi.json",
      dom_id: "#swagger-ui",
      deepLinking: true,
      persistAuthorization: true,
      tryItOutEnabled: true,
      presets: [SwaggerUIBundle.presets.apis, SwaggerUIStandalonePreset],
      layout: "StandaloneLayout"
    });
  </script>
</body>
</html>
"""


@cache
def spec() -> dict[str, Any]:
    return build_spec()


async def openapi_json(request: Request) -> Response:
    return JSONResponse(spec())


async def doc(request: Request) -> Response:
    return HTMLResponse(INDEX)


def swagger_assets() -> StaticFiles:
    import swagger_ui

    return StaticFiles(directory=Path(swagger_ui.__file__).parent / "static")
