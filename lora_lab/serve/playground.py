"""The playground: a web page at `/` that puts one prompt to the base model and to adapters, side by side.

    python -m lora_lab.serve --checkpoint_dir ... --adapters sql=out/sql     # then open http://127.0.0.1:8000/

The page is plain HTML, CSS and JavaScript shipped inside the package (lora_lab/serve/static/): no build step, no
CDN, nothing fetched from elsewhere, so it works offline. It is only a client of the public API, as any other
client: it lists models with GET /v1/models, streams each column's answer from /v1/chat/completions (or
/v1/completions for a plain prompt), and loads and unloads adapters with /v1/load_lora_adapter and
/v1/unload_lora_adapter, sending `Authorization: Bearer KEY` when a key is typed into it. Nothing here changes what
the server does; tests/test_playground.py drives the page in a real headless Chromium.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse, HTMLResponse, Response

STATIC = Path(__file__).parent / "static"
# the files the page is made of, and their types: only these are served (no paths from the request touch the disk)
FILES = {"playground.css": "text/css; charset=utf-8", "playground.js": "text/javascript; charset=utf-8"}

PATHS = ("/", *(f"/static/{name}" for name in FILES))  # open without an API key (app.py's ServeOptions)

router = APIRouter(include_in_schema=False)


@router.get("/", response_class=HTMLResponse)
async def page() -> Response:
    return FileResponse(STATIC / "index.html", media_type="text/html; charset=utf-8",
                        headers={"Cache-Control": "no-cache"})


@router.get("/static/{name}")
async def static(name: str) -> Response:
    if name not in FILES:
        return Response(status_code=404)
    return FileResponse(STATIC / name, media_type=FILES[name], headers={"Cache-Control": "no-cache"})
