"""The playground's routes on a server: the page, its static files, and the benchmark endpoint.

Only the page and its static files are public (routes.is_public); the API key middleware guards the rest,
the benchmark endpoint included. The page learns which server it is on from a <meta> tag filled in here:
"serve" (the engine is this origin) or "manager" (`tokenmill playground`, engines behind /engines/{id}).
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles

from tokenmill.entrypoints.playground.bench import BenchRequest, BenchRunner

STATIC_DIR = Path(__file__).parent / "static"
PAGE_PATH = "/playground/"
STATIC_PREFIX = "/playground/static/"
_PAGE_PATHS = ("/", "/playground", PAGE_PATH)


def is_public(path: str) -> bool:
    """Whether a path is the playground's page or one of its static files (never data)."""
    return path in _PAGE_PATHS or (path.startswith(STATIC_PREFIX) and ".." not in path)


def page(mode: str) -> str:
    return (STATIC_DIR / "index.html").read_text(encoding="utf-8").replace("{{mode}}", mode)


def install_page(app: FastAPI, mode: str) -> None:
    """GET / redirects to the page; the page and its static files (public)."""
    html = page(mode)

    @app.get("/", include_in_schema=False)
    async def root() -> Response:
        return RedirectResponse(PAGE_PATH)

    @app.get("/playground", include_in_schema=False)
    @app.get(PAGE_PATH, include_in_schema=False)
    async def playground() -> Response:
        return HTMLResponse(html, headers={"Cache-Control": "no-cache"})

    app.mount(STATIC_PREFIX.rstrip("/"), StaticFiles(directory=STATIC_DIR), name="playground-static")


def install_playground(app: FastAPI) -> None:
    """The page for `tokenmill serve`, and POST /playground/api/bench (behind the API key like /v1)."""
    install_page(app, "serve")
    runner = BenchRunner()

    @app.post("/playground/api/bench")
    async def bench(request: BenchRequest, raw_request: Request) -> Response:
        return runner.start(request, raw_request)
