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

A browser cannot send a bearer header, so the store's pages — ``/privacy`` (what the store
spent and sent, :mod:`client.serving.privacy_page`) and the API docs ``/docs`` / ``/redoc``
with their assets — also open with a session cookie, which ``/signin`` sets for the same key
(a form; the key compared in constant time, a wrong one answered after a pause). The
cookie is HttpOnly and SameSite=Strict, stands for a random session (the key never goes
into it) and lasts :data:`SESSION_S`; it opens no ``/v1`` path, which keeps the bearer
key. The docs' script and stylesheet are served from the installed ``fastapi-offline``
package: nothing is loaded from elsewhere, so they render on a store's machine without
internet.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import gc
import secrets
import threading
import time
from urllib.parse import parse_qs
from pathlib import Path
from typing import TYPE_CHECKING

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, RedirectResponse, Response

from common.config import ConfigError
from common.data.storefiles import read_store_meta
from common.exchange.address import is_loopback

if TYPE_CHECKING:  # the store's data and model (pandas, torch) load only once the key is checked
    from client.serving.service import StoreServing

K_MAX = 100
AUDIENCE_K_MAX = 1_000  # members in one audience at most ...
AUDIENCE_SHARE_MAX = 0.25  # ... and never more than this share of the store's consenting members
AUDIENCE_ITEMS_MAX = 50_000  # item ids in one campaign audience request (a Type A campaign has 36k)
AUDIENCE_CANDIDATES_MAX = 100_000  # member ids in its optional candidate list
BODY_MAX = 1 << 20  # bytes of a request body (a receipt of 1000 lines is ~100 KB)
KEY_SETTING = "store.json \"serve_api_key_file\" (or \"serve_api_key\"), or --api-key-file FILE"
SESSION_COOKIE = "storefed_session"
SESSION_S = 12 * 3600  # a signed-in browser's session lasts this long
SESSIONS_MAX = 64  # sessions kept at most (the oldest ends first)
SIGNIN_BODY_MAX = 4096  # bytes of the sign-in form
WRONG_KEY_PAUSE_S = 0.5  # a wrong key is answered after this pause (no fast guessing)
DOCS_STATIC = "/static-offline-docs"  # where fastapi-offline's Swagger UI and ReDoc files are served
# What a signed-in browser may open with its cookie (the JSON API keeps the bearer key).
PAGE_PATHS = frozenset(("/", "/privacy", "/privacy/epsilon.svg", "/docs", "/docs/oauth2-redirect", "/redoc",
                        "/openapi.json", "/signout"))
PUBLIC_PATHS = frozenset(("/signin",))
PAGE_HEADERS = {"Content-Security-Policy": "default-src 'none'; img-src 'self' data:; style-src 'unsafe-inline'; "
                                           "form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
                "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer", "Cache-Control": "no-store"}


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


class Sessions:
    """The signed-in browsers: random tokens (what the cookie holds) and when each ends."""

    def __init__(self, lifetime_s: float = SESSION_S, keep: int = SESSIONS_MAX) -> None:
        self.lifetime_s, self.keep = lifetime_s, keep
        self._ends: dict[str, float] = {}
        self._lock = threading.Lock()

    def new(self) -> str:
        """A new session's token."""
        token = secrets.token_urlsafe(32)
        with self._lock:
            now = time.monotonic()
            self._ends = {t: end for t, end in self._ends.items() if end > now}
            while len(self._ends) >= self.keep:
                self._ends.pop(next(iter(self._ends)))
            self._ends[token] = now + self.lifetime_s
        return token

    def valid(self, token: str | None) -> bool:
        """Whether ``token`` is a session that has not ended (compared in constant time)."""
        if not token:
            return False
        now = time.monotonic()
        with self._lock:
            found = [end for t, end in self._ends.items() if hmac.compare_digest(t.encode(), token.encode())]
        return bool(found) and found[0] > now

    def end(self, token: str | None) -> None:
        """End a session (sign-out)."""
        with self._lock:
            self._ends.pop(token or "", None)


def cookie_of(headers: dict, name: str = SESSION_COOKIE) -> str | None:
    """The value of cookie ``name`` in a request's headers (None: not sent)."""
    raw = headers.get(b"cookie", b"").decode("latin-1")
    for part in raw.split(";"):
        key, _, value = part.strip().partition("=")
        if key == name:
            return value
    return None


class _Guard:
    """Pure ASGI middleware in front of everything: the bearer key on every path (or, on the
    store's pages only, a signed-in session's cookie), and the body limit by Content-Length
    (no byte of the body is read before either check)."""

    def __init__(self, app, expected: bytes | None, body_max: int, sessions: Sessions | None = None,
                 signin_page=None) -> None:
        self.app, self.expected, self.body_max = app, expected, body_max
        self.sessions, self.signin_page = sessions, signin_page

    def _admitted(self, path: str, headers: dict) -> bool:
        if self.expected is None or hmac.compare_digest(headers.get(b"authorization", b""), self.expected):
            return True
        if path in PUBLIC_PATHS:
            return True
        if self.sessions is not None and (path in PAGE_PATHS or path.startswith(DOCS_STATIC + "/")):
            return self.sessions.valid(cookie_of(headers))
        return False

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        refusal = None
        headers = dict(scope.get("headers") or ())
        if not self._admitted(scope.get("path", ""), headers):
            path = scope.get("path", "")
            if self.signin_page is not None and scope.get("method") == "GET" and \
                    b"text/html" in headers.get(b"accept", b"") and (path in PAGE_PATHS or path.startswith(DOCS_STATIC)):
                # A browser: the sign-in form instead of the data (still 401).
                body = self.signin_page("").encode()
                await send({"type": "http.response.start", "status": 401, "headers": [
                    (b"content-type", b"text/html; charset=utf-8"), (b"content-length", str(len(body)).encode()),
                    *((k.lower().encode(), v.encode()) for k, v in PAGE_HEADERS.items())]})
                await send({"type": "http.response.body", "body": body})
                return
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


class _Timed:
    """Pure ASGI middleware: how long each ``/v1`` request takes, from its arrival to the
    end of its answer, into ``latency`` (the privacy page's percentiles)."""

    def __init__(self, app, latency) -> None:
        self.app, self.latency = app, latency

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or not scope.get("path", "").startswith("/v1/"):
            return await self.app(scope, receive, send)
        started = time.perf_counter()

        async def timed_send(message):
            await send(message)
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                self.latency.add(time.perf_counter() - started)

        return await self.app(scope, receive, timed_send)


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


async def _json_body(request: Request, limit: int) -> tuple[object, _Json | None]:
    """(the parsed JSON body, None), or (None, the 413 / 422 answer when it is too large or not JSON)."""
    try:
        return json.loads(await _read_body(request, limit)), None
    except _TooLarge:
        return None, _error(413, f"the request body is larger than {limit} bytes")
    except ValueError:
        return None, _error(422, "the body is not JSON")


def _audience_request_problem(body: object) -> str | None:
    """Why a POST /v1/audiences body cannot be answered (None: it can)."""
    if not isinstance(body, dict):
        return "the body must be a JSON object with items, objective and k"
    extra = set(body) - {"items", "objective", "k", "candidates"}
    if extra:
        return f"unknown field(s): {', '.join(sorted(map(str, extra)))}; allowed: items, objective, k, candidates"
    items = body.get("items")
    if not isinstance(items, list) or not items or not all(isinstance(i, str) and 0 < len(i) <= 64 for i in items):
        return "items must be a non-empty list of item ids (strings of 1 to 64 characters)"
    if len(items) > AUDIENCE_ITEMS_MAX:
        return f"items: at most {AUDIENCE_ITEMS_MAX} item ids, got {len(items)}"
    if body.get("objective") not in ("buy", "redeem"):
        return f"objective must be 'buy' or 'redeem', got {body.get('objective')!r}"
    k = body.get("k", 100)
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= AUDIENCE_K_MAX:
        return f"k must be a whole number between 1 and {AUDIENCE_K_MAX}, got {k!r}"
    cands = body.get("candidates")
    if cands is not None and (not isinstance(cands, list) or len(cands) > AUDIENCE_CANDIDATES_MAX
                              or not all(isinstance(m, str) and 0 < len(m) <= 64 for m in cands)):
        return (f"candidates must be a list of at most {AUDIENCE_CANDIDATES_MAX} member ids (strings of 1 to 64 "
                "characters), or left out")
    return None


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

    from fastapi_offline import FastAPIOffline

    from client.serving import privacy_page as pages

    latency = pages.Latency()
    view = pages.PrivacyView(serving.paths.store_dir, serving.state_dir)

    def warm() -> None:
        """The privacy page's first numbers (the accountant and matplotlib load slowly)."""
        try:
            view.ledger()
            from common.view import charts

            charts.warm()
        except Exception:  # the page itself says what is wrong with the ledger
            pass

    @contextlib.asynccontextmanager
    async def lifespan_with_pages(_app):
        threading.Thread(target=warm, name="privacy-page-warmup", daemon=True).start()
        async with lifespan(_app):
            yield

    # FastAPIOffline: FastAPI with /docs and /redoc served from the package's own copies of
    # Swagger UI and ReDoc (no CDN), mounted at DOCS_STATIC.
    app = FastAPIOffline(title=f"storefed serve — store {serving.store_id}", lifespan=lifespan_with_pages,
                         static_url=DOCS_STATIC,
                         description="Recommendations, audiences and receipts at the store. Nothing here leaves it. "
                                     "The store's privacy page is at /privacy (sign in at /signin with the store's key).")
    if not key and not open_api:
        raise ConfigError(f"no bearer key for store {serving.store_id}: set {KEY_SETTING}")
    expected = f"Bearer {key}".encode() if key else None
    sessions = Sessions()
    app.add_middleware(_Timed, latency=latency)
    app.add_middleware(_Guard, expected=expected, body_max=body_max, sessions=sessions,
                       signin_page=lambda message: pages.signin_page(serving.store_id, message))

    def _page(text: str, status: int = 200) -> HTMLResponse:
        return HTMLResponse(text, status_code=status, headers=PAGE_HEADERS)

    @app.get("/signin", include_in_schema=False)
    async def signin_form(request: Request):
        if key is None:
            return RedirectResponse("/privacy", status_code=303)
        return _page(pages.signin_page(serving.store_id))

    @app.post("/signin", include_in_schema=False)
    async def signin(request: Request):
        if key is None:
            return RedirectResponse("/privacy", status_code=303)
        try:
            form = parse_qs((await _read_body(request, SIGNIN_BODY_MAX)).decode("utf-8", "replace"),
                            max_num_fields=4)
        except (_TooLarge, ValueError):
            form = {}
        given = (form.get("key") or [""])[0].strip()
        if not hmac.compare_digest(given.encode(), key.encode()):
            await asyncio.sleep(WRONG_KEY_PAUSE_S)
            return _page(pages.signin_page(serving.store_id, "That is not this store's key; nothing is shown "
                                           "without it."), 401)
        answer = RedirectResponse("/privacy", status_code=303, headers=PAGE_HEADERS)
        answer.set_cookie(SESSION_COOKIE, sessions.new(), max_age=SESSION_S, path="/", httponly=True,
                          samesite="strict", secure=request.url.scheme == "https")
        return answer

    @app.post("/signout", include_in_schema=False)
    async def signout(request: Request):
        sessions.end(cookie_of(dict(request.scope.get("headers") or ())))
        answer = RedirectResponse("/signin", status_code=303, headers=PAGE_HEADERS)
        answer.delete_cookie(SESSION_COOKIE, path="/", httponly=True, samesite="strict")
        return answer

    @app.get("/", include_in_schema=False)
    async def home():
        return RedirectResponse("/privacy", status_code=303)

    @app.get("/privacy", include_in_schema=False)
    async def privacy():
        data = await asyncio.to_thread(pages.page_data, serving, view, latency)
        return _page(pages.privacy_page(data))

    drawn: dict = {}

    def chart() -> str:
        ledger = view.ledger()
        if drawn.get("stamp") != ledger["stamp"]:  # drawn again only when the ledger changed
            drawn.update(stamp=ledger["stamp"], svg=pages.epsilon_chart({"ledger": ledger, "store_id": serving.store_id}))
        return drawn["svg"]

    @app.get("/privacy/epsilon.svg", include_in_schema=False)
    async def privacy_chart():
        return Response(await asyncio.to_thread(chart), media_type="image/svg+xml", headers=PAGE_HEADERS)

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

    @app.post("/v1/audiences")
    async def campaign_audience(request: Request):
        # Member ids and scores leave the store in this answer: not DP (README "What leaves a
        # store"). It needs an operator-signed request, which is not enforced yet: the store's
        # bearer key is all that guards it today (DESIGN §5.4).
        body, refused = await _json_body(request, body_max)
        if refused is not None:
            return refused
        problem = _audience_request_problem(body)
        if problem:
            return _error(422, problem)
        limit = audience_limit(serving)
        k = min(int(body.get("k", 100)), limit)
        try:
            answer = await asyncio.to_thread(serving.campaign_audience, [str(i) for i in body["items"]],
                                             body["objective"], k, body.get("candidates"))
        except ValueError as exc:
            return _error(422, str(exc))
        if answer is None:
            return _error(503, f"store {serving.store_id} holds no model yet: no audience can be scored")
        unknown = answer.pop("unknown_items")
        return _Json({"objective": body["objective"], **answer, "limit": limit,
                      "unknown_items": len(unknown), "unknown_items_first": unknown[:20],
                      "model": serving.model_info(), "local_layer": serving.layer_info() is not None})

    @app.post("/v1/receipts", status_code=201)
    async def receipts(request: Request):
        body, refused = await _json_body(request, body_max)
        if refused is not None:
            return refused
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
          f"http://{host}:{port}/docs, privacy page http://{host}:{port}/privacy; "
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
