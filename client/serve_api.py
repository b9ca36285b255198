"""`storefed serve`: the store's recommendation API over HTTP (FastAPI + uvicorn).

Thin glue over :class:`client.serving.StoreServing`. The JSON shapes are the contract of
issue 15 / README "Serve recommendations at a store". Handlers are ``async def`` and
compute in about a millisecond, so they run on the event loop without a thread hop;
a watcher thread picks up a newly delivered model.
"""

from __future__ import annotations

import contextlib
import hmac
import json
import gc
import threading
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response

from client.serving import ReceiptRejected, StoreServing

K_MAX = 100
AUDIENCE_K_MAX = 10_000


def api_key(serving: StoreServing) -> str | None:
    """The bearer key from the store's configuration: store.json ``serve_api_key_file``
    (a file holding the key, kept out of store.json) or ``serve_api_key``; None = no key."""
    meta = serving.meta
    if meta.get("serve_api_key_file"):
        path = Path(str(meta["serve_api_key_file"]))
        path = path if path.is_absolute() else serving.store_dir / path
        return path.read_text().strip() or None
    key = meta.get("serve_api_key")
    return str(key) if key else None


class _Json(Response):
    media_type = "application/json"

    def render(self, content) -> bytes:
        return json.dumps(content, separators=(",", ":"), allow_nan=False).encode()


def _error(status: int, message: str, **extra) -> _Json:
    return _Json({"error": message, **extra}, status_code=status)


def create_api(serving: StoreServing, *, watch_s: float = 1.0) -> FastAPI:
    """The ASGI app; ``watch_s``: how often the watcher looks for a new model (0: never)."""
    stop = threading.Event()

    def watch() -> None:
        while not stop.wait(watch_s):
            try:
                serving.reload_model()
            except Exception as exc:  # keep serving the model in use; say why
                serving.model_error = f"{exc.__class__.__name__}: {exc}"

    @contextlib.asynccontextmanager
    async def lifespan(_app):
        if watch_s > 0:
            threading.Thread(target=watch, name="model-watcher", daemon=True).start()
        yield
        stop.set()

    app = FastAPI(title=f"storefed serve — store {serving.store_id}", lifespan=lifespan,
                  description="Recommendations, audiences and receipts at the store. Nothing here leaves it.")
    key = api_key(serving)
    expected = f"Bearer {key}".encode() if key else None

    @app.middleware("http")
    async def bearer(request: Request, call_next):
        if expected is not None and request.url.path.startswith("/v1/"):
            given = request.headers.get("authorization", "").encode()
            if not hmac.compare_digest(given, expected):
                return _error(401, "missing or wrong bearer key (Authorization: Bearer <key>)")
        return await call_next(request)

    @app.exception_handler(RequestValidationError)
    async def bad_request(request: Request, exc: RequestValidationError):
        problems = [f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg')}" for e in exc.errors()]
        return _error(422, "; ".join(problems) or "invalid request")

    @app.get("/v1/health")
    async def health():
        layer = serving.layer_info()
        return _Json({"status": "ok", "model": serving.model_info(), "local_layer": layer is not None,
                      "local_layer_fit": layer, "local_layer_note": serving.layer_error})

    @app.get("/v1/members/{member_id}/recommendations")
    async def recommendations(member_id: str, k: int = 10):
        if not 1 <= k <= K_MAX:
            return _error(422, f"k must be between 1 and {K_MAX}, got {k}")
        items = serving.recommendations(member_id, k)
        if items is None:
            return _error(404, f"unknown member '{member_id}' at store {serving.store_id}")
        return _Json({"member_id": member_id, "items": items, "model": serving.model_info(),
                      "local_layer": serving.layer_info() is not None})

    @app.get("/v1/items/{item_id}/audience")
    async def audience(item_id: str, k: int = 100):
        if not 1 <= k <= AUDIENCE_K_MAX:
            return _error(422, f"k must be between 1 and {AUDIENCE_K_MAX}, got {k}")
        members = serving.audience(item_id, k)
        if members is None:
            return _error(404, f"unknown item '{item_id}': not in the catalog")
        return _Json({"item_id": item_id, "members": members})

    @app.post("/v1/receipts", status_code=201)
    async def receipts(request: Request):
        try:
            body = await request.json()
        except ValueError:
            return _error(422, "the body is not JSON")
        try:
            receipt, new = serving.take_receipt(body)
        except ReceiptRejected as exc:
            return _error(422, "receipt rejected; nothing was stored", reasons=exc.reasons)
        return _Json({"receipt_id": receipt["receipt_id"], "lines": len(receipt["lines"]),
                      "recorded": "now" if new else "before"}, status_code=201 if new else 200)

    return app


def serve(store_dir: Path, catalog: Path | None, host: str, port: int, state_dir: Path | None = None) -> None:
    """Load the store and answer on ``host:port`` until stopped (SIGINT/SIGTERM)."""
    import uvicorn

    serving = StoreServing(store_dir, catalog, state_dir)
    model = serving.model_info()
    print(f"storefed serve: store {serving.store_id}, {len(serving.known_members)} members, "
          f"{len(serving.candidates)} items in the assortment, model "
          f"{model['hash'][:12] + '… (run ' + str(model['run_id']) + ', round ' + str(model['round']) + ')' if model else 'none yet (best sellers only: ' + str(serving.model_error) + ')'}"
          f"{'' if not model else ' with the store-local layer' if serving.layer_info() else ' alone (' + str(serving.layer_error) + ')'}; "
          f"http://{host}:{port}/docs", flush=True)
    # The store's data is millions of long-lived Python objects; a full collection walks them
    # all (tens of ms, the p99 at concurrency 16). Freezing moves them out of the collector.
    gc.collect()
    gc.freeze()
    uvicorn.run(create_api(serving), host=host, port=port, log_level="warning", access_log=False)
