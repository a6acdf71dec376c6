"""The edge node's /docs works offline: every file the page loads is served by the node."""

from __future__ import annotations

import re

from fastapi import FastAPI
from fastapi.testclient import TestClient

from clients.edge.docs import serve_docs


def test_docs_page_loads_only_files_the_node_serves() -> None:
    app = FastAPI(docs_url=None, redoc_url=None)
    serve_docs(app)
    client = TestClient(app)

    page = client.get("/docs")

    assert page.status_code == 200 and "SwaggerUIBundle" in page.text
    # No script, style sheet or icon from another host (FastAPI's default is a CDN).
    assets = re.findall(r"""(?:src|href)=["']([^"']+)["']""", page.text)
    assert assets and not [a for a in assets if "//" in a], assets
    for asset in assets:
        response = client.get(asset)
        assert response.status_code == 200 and len(response.content) > 100, asset
    assert client.get("/openapi.json").status_code == 200
