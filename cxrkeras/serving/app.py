"""HTTP: the Starlette app of `cxrkeras serve` (TensorFlow Serving's REST API, health, metrics, the page) and uvicorn.

A request's path is parsed by `protocol.parse_path`; its body is read under
`--max-body-mb` within `--read-timeout-s`, then answered by the
`servable.ModelServer` in `app.state`.
"""

import asyncio
import contextlib
import json
import logging
import os
import time

from cxrkeras import images
from cxrkeras.serving.monitoring import CONTENT_TYPE, PATH
from cxrkeras.serving.protocol import ApiError, invalid, parse_path
from cxrkeras.serving.servable import ModelServer, converted, image_problem
from cxrkeras.serving.settings import HOST, PORT, Settings

log = logging.getLogger("cxrkeras.serving")

STATIC_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "static")


# ---------------------------------------------------------------- HTTP


def json_response(obj, status=200):
    from starlette.responses import Response

    return Response(json.dumps(obj, allow_nan=True), status_code=status, media_type="application/json")


async def read_body(request, settings):
    """The request's body: 413 past --max-body-mb, 408 past --read-timeout-s, 499 when the client went away."""
    from starlette.requests import ClientDisconnect

    try:
        async with asyncio.timeout(settings.read_timeout_s):
            return await _read_body(request, settings.max_body_mb)
    except TimeoutError:
        raise ApiError(408, f"The request body did not arrive within {settings.read_timeout_s:g} s (--read-timeout-s).")
    except ClientDisconnect:  # one line, not a traceback: nobody is left to answer
        log.info(
            "client %s went away before sending its whole body (%s %s)",
            _client(request), request.method, request.url.path,
        )
        raise ApiError(499, "Client closed the request.") from None


def _client(request):
    return "%s:%d" % tuple(request.client) if request.client else "?"


async def _read_body(request, max_mb):
    limit = int(max_mb * 2**20)
    too_large = ApiError(413, f"Request body over {max_mb:g} MB (--max-body-mb); send fewer or smaller images.")
    # A body a little over the limit is read and dropped, so that a client which sends it whole
    # hears the 413 instead of a reset connection; a far larger one is refused before reading.
    drain = 4 * limit
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > drain:
        raise too_large
    chunks, total = [], 0
    async for chunk in request.stream():
        total += len(chunk)
        if total > drain:
            raise too_large
        if total <= limit:
            chunks.append(chunk)
    if total > limit:
        raise too_large
    return b"".join(chunks)


async def read_json(request, settings):
    """The request's JSON body: `read_body`'s errors, TensorFlow Serving's parse errors otherwise."""
    body = await read_body(request, settings)
    if not body.strip():
        raise invalid("JSON Parse error: The document is empty")
    try:
        if len(body) > 2**18:  # a big body parses off the event loop
            return await asyncio.to_thread(json.loads, body)
        return json.loads(body)
    except (ValueError, UnicodeDecodeError) as e:
        raise invalid(f"JSON Parse error: {e}") from None
    except RecursionError:
        raise too_deep() from None


def too_deep():
    return invalid("JSON Parse error: nested too deep (arrays or objects in each other about 1,000 levels or more)")


def create_app(base, name, settings=None, checked=None):
    """The Starlette app serving model `name` from `base` (a folder of numbered versions).

    `checked`: what `served_versions(base)` returned, so no version's graph is read again.
    """
    from starlette.applications import Starlette
    from starlette.middleware import Middleware
    from starlette.middleware.cors import CORSMiddleware

    settings = settings or Settings()
    server = ModelServer(base, name, settings, checked)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        poller = asyncio.create_task(server.poll_forever())
        yield
        poller.cancel()
        server.close()

    middleware = []
    if settings.cors:  # TensorFlow Serving's CORS headers
        middleware.append(
            Middleware(
                CORSMiddleware, allow_origins=["*"], allow_methods=["GET", "POST"], allow_headers=["Content-Type"]
            )
        )
    app = Starlette(
        routes=routes(),
        middleware=middleware,
        lifespan=lifespan,
        exception_handlers={404: http_error, 405: http_error},
    )
    app.state.server, app.state.settings = server, settings
    return app


def routes():
    """TensorFlow Serving's API, health, metrics and the page; each handler finds its server in `app.state`."""
    from starlette.routing import Mount, Route
    from starlette.staticfiles import StaticFiles

    return [
        Route("/", page),
        Route("/ui/model.json", page_model),
        Route("/ui/image", page_image, methods=["POST"]),
        Mount("/ui", StaticFiles(directory=STATIC_DIR), name="ui"),
        Route("/v2/health/live", live),
        Route("/v2/health/ready", ready),
        Route(PATH, metrics),
        Route("/v1/{path:path}", v1, methods=["GET", "HEAD", "POST"]),
    ]


async def v1(request):
    """TensorFlow Serving's REST API: its answers and errors as JSON, each request counted in the metrics."""
    server, settings = request.app.state.server, request.app.state.settings
    started = time.perf_counter()
    labels, api, status, name = {"version": "", "signature": ""}, "", 200, None
    try:
        route = parse_path(request.method, request.url.path)
        name = route["name"]
        api = route["verb"] or ("metadata" if route["metadata"] else "status")
        response = json_response(await v1_answer(server, settings, request, route, labels))
    except ApiError as e:
        status, response = e.status, json_response({"error": e.message}, e.status)
    except Exception as e:  # a bug of ours: still TensorFlow Serving's JSON, and counted
        log.exception("%s %s failed", request.method, request.url.path)
        status, response = 500, json_response({"error": f"Internal error: {type(e).__name__}: {e}"}, 500)
    model = server.name if name == server.name else ""
    seconds = time.perf_counter() - started
    server.metrics.request(model, labels["version"], labels["signature"], api, status, seconds)
    return response


async def v1_answer(server, settings, request, route, labels):
    """The answer to a routed /v1 request (`labels` gets the version and signature that answered)."""
    name, number = route["name"], route["version"]
    if route["verb"] is None:
        return server.metadata(name, number) if route["metadata"] else server.status(name, number)
    if route["verb"] == "regress":
        raise ApiError(501, "This model has no regression signature: use :predict or :classify.")
    server.version(name, number)  # 404/503 before reading the body
    body = await read_json(request, settings)
    handler = server.predict if route["verb"] == "predict" else server.classify
    try:
        return await handler(name, number, body, labels)
    except RecursionError:  # JSON nested nearly as deep as the parser goes, met again in our code
        raise too_deep() from None


async def live(request):
    return json_response({"live": True})


async def ready(request):
    why = request.app.state.server.readiness()
    return json_response({"ready": True} if why is None else {"error": why}, 200 if why is None else 503)


async def metrics(request):
    from starlette.responses import Response

    return Response(request.app.state.server.metrics.text(), media_type=CONTENT_TYPE)


async def page(request):
    from starlette.responses import FileResponse

    return FileResponse(os.path.join(STATIC_DIR, "index.html"))


async def page_model(request):
    return json_response(request.app.state.server.page_model())


async def page_image(request):
    """An uploaded file as a PNG the browser can draw: a DICOM as the model sees it (the page's background)."""
    from starlette.responses import Response

    settings = request.app.state.settings
    try:
        contents = await read_body(request, settings)
        kind, problem = image_problem(contents, settings.max_image_pixels)
        if problem:
            raise invalid(problem)
        if kind == images.DICOM:
            contents = await asyncio.to_thread(converted, contents)
    except ApiError as e:
        return json_response({"error": e.message}, e.status)
    return Response(contents, media_type="image/png" if kind == images.DICOM else f"image/{kind.lower()}")


async def http_error(request, exc):
    return json_response({"error": f"{exc.detail}: {request.method} {request.url.path}"}, exc.status_code)


def run(app, host=HOST, port=PORT):
    """Serve `app` until SIGTERM or Ctrl-C, which answer the requests in flight first; False if it couldn't bind."""
    import signal

    # uvicorn re-raises the SIGTERM it handled once it has stopped: a handler of ours makes that a normal return.
    signal.signal(signal.SIGTERM, lambda signum, frame: None)
    try:
        uvicorn_server(app, host, port).run()
    except SystemExit:  # uvicorn exits 3 when it can't bind, after logging why
        return False
    return True


def uvicorn_server(app, host=HOST, port=PORT, log_level="info"):
    """A uvicorn.Server for `app` (call .run(); it stops on SIGTERM/SIGINT after answering requests in flight).

    Slow and idle connections are closed: uvicorn's keep-alive timeout after
    an answer (`Settings.keep_alive_s`, 5 s), and ours (`ReadTimeout`) when a connection's next
    request headers haven't all come within --read-timeout-s; the body has
    as long again (`read_body`). Readiness turns false at the signal.
    """
    import uvicorn
    from uvicorn.protocols.http.auto import AutoHTTPProtocol

    settings, model_server = app.state.settings, app.state.server

    class ReadTimeout(AutoHTTPProtocol):
        """uvicorn's HTTP protocol, closing a connection whose request headers haven't come within the read timeout."""

        timer = None

        def connection_made(self, transport):
            super().connection_made(transport)
            self._await_request()

        def on_response_complete(self):
            super().on_response_complete()
            self._await_request()

        def connection_lost(self, exc):
            super().connection_lost(exc)
            if self.timer:
                self.timer.cancel()

        def _await_request(self):
            cycle = self.cycle  # a request whose headers are complete starts a new cycle

            def expire():
                if self.cycle is cycle and not self.transport.is_closing():
                    log.info("closed %s: no complete request within %g s", self.client, settings.read_timeout_s)
                    self.transport.close()

            if self.timer:
                self.timer.cancel()
            self.timer = self.loop.call_later(settings.read_timeout_s, expire)

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame):
            model_server.stopping = True
            super().handle_exit(sig, frame)

    if not log.handlers:  # our lines (versions loaded, refused) beside uvicorn's
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s:     %(message)s"))
        log.addHandler(handler)
    log.setLevel(log_level.upper())
    config = uvicorn.Config(
        app, host=host, port=port, log_level=log_level, access_log=False, lifespan="on", http=ReadTimeout,
        timeout_keep_alive=settings.keep_alive_s,
    )
    return Server(config)
