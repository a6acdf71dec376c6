"""``/docs`` served from the node itself: Swagger UI's files from a packaged distribution.

FastAPI's default ``/docs`` page loads Swagger UI's script and style sheet from a public
CDN, so on a site network without internet access it stays blank. The node serves the
same files from the ``swagger-ui-bundle`` package instead, as FastAPI documents for
self-hosting (https://fastapi.tiangolo.com/how-to/custom-docs-ui-assets/). ReDoc has no
packaged distribution here, so ``/redoc`` is off.
"""

from __future__ import annotations

from fastapi import FastAPI
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles

ASSETS = "/docs/assets"


def serve_docs(app: FastAPI) -> None:
    """Add ``/docs`` and its assets to an app created with ``docs_url=None``."""
    from swagger_ui_bundle import swagger_ui_path

    app.mount(ASSETS, StaticFiles(directory=str(swagger_ui_path)), name="swagger-ui")

    @app.get("/docs", include_in_schema=False)
    def docs() -> HTMLResponse:
        return get_swagger_ui_html(
            openapi_url=app.openapi_url or "/openapi.json",
            title=f"{app.title} - API docs",
            swagger_js_url=f"{ASSETS}/swagger-ui-bundle.js",
            swagger_css_url=f"{ASSETS}/swagger-ui.css",
            swagger_favicon_url=f"{ASSETS}/favicon-32x32.png",
        )
