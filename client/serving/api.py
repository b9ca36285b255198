"""`storefed serve`: the store's recommendation API over HTTP (FastAPI + uvicorn).

Thin glue over :class:`client.serving.service.StoreServing`. The JSON shapes are the contract of
issue 15 / client/README.md "Serve recommendations at a store". Handlers are ``async def`` and
compute in about a millisecond, so they run on the event loop without a thread hop;
a watcher thread picks up a newly delivered model.

Closed by default: every path (the API, ``/docs``, ``/openapi.json``, any other) answers
401 without the store's bearer key, compared in constant time; `storefed serve` does not
start without a non-empty key unless ``--no-auth`` on a loopback address. A request body
above :data:`BODY_MAX` bytes is answered 413 before it is read (by its Content-Length, or
by counting a chunked body as it arrives).
"""

from __future__ import annotations

import contextlib
import hmac
import ipaddress
import json
import gc
import threading
from pathlib import Path
from typing import TYPE_CHECKING

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response

from common.config import ConfigError
from common.data.storefiles import read_store_meta

if TYPE_CHECKING:  # the store's data and model (pandas, torch) load only once the key is checked
    from client.serving.service import StoreServing

K_MAX = 100
AUDIENCE_K_MAX = 1_000  # members in one audience at most ...
AUDIENCE_SHARE_MAX = 0.25  # ... and never more than this share of the store's consenting members
BODY_MAX = 1 << 20  # bytes of a request body (a receipt of 1000 lines is ~100 KB)
KEY_SETTING = "store.json \"serve_api_key_file\" (or \"serve_api_key\"), or --api-key-file FILE"


def api_key(meta: dict, store_dir: Path, key_file: Path | None = None) -> str | None:
    """The bearer key: ``key_file`` (the --api-key-file flag), else store.json
    ``serve_api_key_file`` (a file holding the key, kept out of store.json; relative to the
    store directory), else ``serve_api_key``. None: no key. A key file that holds nothing but
    whitespace is no key; one that cannot be read, or a key with whitespace or control
    characters inside (it cannot travel in a header), is a ConfigError."""
    where = "--api-key-file"
    if key_file is None and meta.get("serve_api_key_file"):
        key_file = Path(str(meta["serve_api_key_file"])).expanduser()
        key_file = key_file if key_file.is_absolute() else Path(store_dir) / key_file
        where = f"{Path(store_dir) / 'store.json'} \"serve_api_key_file\""
    if key_file is not None:
        try:
            key = Path(key_file).read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{key_file} ({where}): the bearer key file cannot be read "
                              f"({exc.__class__.__name__}); storefed serve does not start without its key") from None
    else:
        where = f"{Path(store_dir) / 'store.json'} \"serve_api_key\""
        key = str(meta.get("serve_api_key") or "").strip()
    if not key:
        return None
    if not key.isprintable() or any(c.isspace() for c in key) or not key.isascii():
        raise ConfigError(f"the bearer key of {where} holds whitespace, control or non-ASCII characters; "
                          "use printable ASCII without spaces (e.g. 'openssl rand -hex 32')")
    return key


def is_loopback(host: str) -> bool:
    """Whether ``host`` binds to this machine only (127.0.0.0/8, ::1, localhost)."""
    if host.strip().lower() in ("localhost", "localhost."):
        return True
    try:
        return ipaddress.ip_address(host.strip().strip("[]")).is_loopback
    except ValueError:
        return False


def check_access(meta: dict, store_dir: Path, host: str, key_file: Path | None, no_auth: bool) -> str | None:
    """The key to require (None: ``--no-auth``), or ConfigError (exit 2) naming the setting."""
    key = api_key(meta, store_dir, key_file)
    if no_auth:
        if key is not None:
            raise ConfigError("--no-auth and a bearer key are both given; drop one (the key is set by "
                              f"{KEY_SETTING})")
        if not is_loopback(host):
            raise ConfigError(f"--no-auth answers without a key, so it binds only to loopback; --host {host} is not "
                              "(use --host 127.0.0.1, or set a key: " + KEY_SETTING + ")")
        return None
    if key is None:
        raise ConfigError(f"no bearer key for store {meta.get('store_id')}: storefed serve answers only with a "
                          f"non-empty key; set {KEY_SETTING} (a file holding a random key, e.g. 'openssl rand "
                          "-hex 32', readable by storefed only), or --no-auth for a loopback-only trial")
    return key


class _Json(Response):
    media_type = "application/json"

    def render(self, content) -> bytes:
        return json.dumps(content, separators=(",", ":"), allow_nan=False).encode()


def _error(status: int, message: str, **extra) -> _Json:
    return _Json({"error": message, **extra}, status_code=status)


def _plain(status: int, message: str, **extra) -> tuple[dict, bytes]:
    body = json.dumps({"error": message, **extra}, separators=(",", ":")).encode()
    return {"type": "http.response.start", "status": status,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]}, body


class _Guard:
    """Pure ASGI middleware in front of everything: the bearer key on every path, and the
    body limit by Content-Length (no byte of the body is read before either check)."""

    def __init__(self, app, expected: bytes | None, body_max: int) -> None:
        self.app, self.expected, self.body_max = app, expected, body_max

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        refusal = None
        headers = dict(scope.get("headers") or ())
        if self.expected is not None and not hmac.compare_digest(headers.get(b"authorization", b""), self.expected):
            refusal = _plain(401, "missing or wrong bearer key (Authorization: Bearer <key>)")
        else:
            length = headers.get(b"content-length")
            try:
                too_long = length is not None and int(length) > self.body_max
            except ValueError:
                refusal = _plain(400, "Content-Length is not a number")
                too_long = False
            if too_long:
                refusal = _plain(413, f"the request body is larger than {self.body_max} bytes")
        if refusal is None:
            return await self.app(scope, receive, send)
        start, body = refusal
        if refusal[0]["status"] == 401:
            start["headers"].append((b"www-authenticate", b"Bearer"))
        start["headers"].append((b"connection", b"close"))  # the unread body is not drained: end the connection
        await send(start)
        await send({"type": "http.response.body", "body": body})


class _TooLarge(Exception):
    pass


async def _read_body(request: Request, limit: int) -> bytes:
    """The body, counted as it streams in (a chunked body has no Content-Length)."""
    parts, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise _TooLarge
        parts.append(chunk)
    return b"".join(parts)


def audience_limit(serving: StoreServing) -> int:
    """The most members one audience lists at this store: min(AUDIENCE_K_MAX, a quarter of
    its consenting members), at least 1. A caller never pages through the whole store."""
    return max(1, min(AUDIENCE_K_MAX, int(len(serving.member_ids) * AUDIENCE_SHARE_MAX)))


def create_api(serving: StoreServing, *, watch_s: float = 1.0, key: str | None = None, open_api: bool = False,
               body_max: int = BODY_MAX) -> FastAPI:
    """The ASGI app; ``watch_s``: how often the watcher looks for a new model (0: never).

    ``key``: the bearer key every request must carry; without one the app is open only when
    ``open_api`` says so (``--no-auth``), else this refuses to build it."""
    from client.serving.service import ReceiptRejected

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
    if not key and not open_api:
        raise ConfigError(f"no bearer key for store {serving.store_id}: set {KEY_SETTING}")
    expected = f"Bearer {key}".encode() if key else None
    app.add_middleware(_Guard, expected=expected, body_max=body_max)

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
        limit = audience_limit(serving)
        members = serving.audience(item_id, min(k, limit))
        if members is None:
            return _error(404, f"unknown item '{item_id}': not in the catalog")
        return _Json({"item_id": item_id, "members": members, "limit": limit})

    @app.post("/v1/receipts", status_code=201)
    async def receipts(request: Request):
        try:
            body = json.loads(await _read_body(request, body_max))
        except _TooLarge:
            return _error(413, f"the request body is larger than {body_max} bytes")
        except ValueError:
            return _error(422, "the body is not JSON")
        try:
            receipt, new = serving.take_receipt(body)
        except ReceiptRejected as exc:
            return _error(exc.status, "receipt rejected; nothing was stored", reasons=exc.reasons)
        return _Json({"receipt_id": receipt["receipt_id"], "lines": len(receipt["lines"]),
                      "recorded": "now" if new else "before"}, status_code=201 if new else 200)

    return app


def serve(store_dir: Path, catalog: Path | None, host: str, port: int, state_dir: Path | None = None, *,
          key_file: Path | None = None, no_auth: bool = False) -> None:
    """Load the store and answer on ``host:port`` until stopped (SIGINT/SIGTERM).

    ConfigError before anything is loaded when there is no key (and no ``no_auth`` on a
    loopback ``host``)."""
    import uvicorn

    key = check_access(read_store_meta(store_dir), Path(store_dir), host, key_file, no_auth)
    from client.serving.service import StoreServing

    serving = StoreServing(store_dir, catalog, state_dir)
    model = serving.model_info()
    print(f"storefed serve: store {serving.store_id}, {len(serving.known_members)} members, "
          f"{len(serving.candidates)} items in the assortment, model "
          f"{model['hash'][:12] + '… (run ' + str(model['run_id']) + ', round ' + str(model['round']) + ')' if model else 'none yet (best sellers only: ' + str(serving.model_error) + ')'}"
          f"{'' if not model else ' with the store-local layer' if serving.layer_info() else ' alone (' + str(serving.layer_error) + ')'}; "
          f"http://{host}:{port}/docs; "
          f"{'OPEN, no key (--no-auth, loopback only)' if key is None else 'bearer key required on every path'}"
          f"{'; receipts refused: ' + serving.journal_error if serving.journal_error else ''}", flush=True)
    for warning in serving.journal_warnings:
        print(f"storefed serve: warning: {warning}", flush=True)
    # The store's data is millions of long-lived Python objects; a full collection walks them
    # all (tens of ms, the p99 at concurrency 16). Freezing moves them out of the collector.
    gc.collect()
    gc.freeze()
    uvicorn.run(create_api(serving, key=key, open_api=key is None), host=host, port=port, log_level="warning",
                access_log=False)
