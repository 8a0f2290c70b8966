"""`cxrkeras serve`: an exported base folder over TensorFlow Serving's REST API, with a page to try it.

Path of a request: Starlette route -> `rest.parse_path` -> the body read
under `--max-body-mb` -> `rest.predict_request` / `rest.classify_request`
(TensorFlow Serving's JSON mapping) -> image headers checked in Python by
the judge training uses (`data.image_problem`: an image declaring
20000x20000 never reaches the graph's decoder) -> DICOM images made the
16-bit PNG the graph decodes (`data.encoded_image`, off the event loop: the
graph reads image formats only) -> the signature's `Batcher`, which gathers
concurrent requests into one model call (up to `--max-batch-size` instances
or `--batch-timeout-ms`) run on one inference thread, off the event loop ->
`rest.predict_response`.

`ModelServer` loads every numeric version under the base folder (after
`savedmodel.check_ops` unless trusted), warms each up, serves the highest by
default and polls the folder for new versions (export writes a staging
folder, `.export-N-PID`, then renames it to `N`: only numeric names count).
It imports TensorFlow, never Keras or our model builders.
"""

import asyncio
import contextlib
import dataclasses
import io
import json
import logging
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from cxrkeras import data, rest, savedmodel
from cxrkeras.rest import ApiError, invalid

log = logging.getLogger("cxrkeras.serving")

STATIC_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "static")
CLOSE = object()  # queued by Batcher.close
IMAGE_INPUT = "images"  # our exports' encoded-image input
EXAMPLE_IMAGE_FEATURE = "image"  # the tf.Example feature our classify signature decodes


@dataclasses.dataclass
class Settings:
    """The server's limits and behaviour (the `cxrkeras serve` options)."""

    max_batch_size: int = 64
    batch_timeout_ms: float = 2.0
    max_enqueued_batches: int = 16
    max_body_mb: float = 32.0
    max_image_pixels: int = 4096 * 4096
    poll_seconds: float = 1.0
    trust_model: bool = False
    cors: bool = False


# ---------------------------------------------------------------- images


def image_problem(contents, max_pixels):
    """(format, None) when `contents` has a header our export's graph reads within `max_pixels`, else (format, why).

    `data.image_problem`, the judge of every file training reads, on the
    header only: so a PNG declaring 20000x20000 is refused before anything
    allocates it; data broken further on (a truncated JPEG) is left to the
    graph's decoder (the same `decode_pixels`), whose error then names that image.
    """
    return data.image_problem(io.BytesIO(contents), max_pixels, limit_option="--max-image-pixels", decode=False)


def converted(contents):
    """`contents` as the graph reads it: a DICOM made a 16-bit PNG (blocking), other images as they are."""
    try:
        return data.encoded_image(contents)
    except data.dicom.DicomError as e:
        raise invalid(str(e)) from None


def api_error(error):
    """An exception from a model call as the error TensorFlow Serving would answer."""
    import tensorflow as tf

    if isinstance(error, ApiError):
        return error
    if isinstance(error, tf.errors.InvalidArgumentError):
        return invalid(savedmodel.error_message(error))
    if isinstance(error, tf.errors.ResourceExhaustedError):
        return ApiError(429, savedmodel.error_message(error))
    log.error("model call failed", exc_info=error)
    return ApiError(500, f"{type(error).__name__}: {savedmodel.error_message(error)}")


# ---------------------------------------------------------------- batching


class Batcher:
    """Gathers concurrent calls of one signature into one model call, as TensorFlow Serving's batching does.

    A batch closes at `max_batch_size` instances or `batch_timeout_ms` after
    its first request, and runs on `executor` (one thread: inference never
    blocks the event loop); requests arriving meanwhile form the next batch.
    When a batch fails on bad input, its requests are rerun one by one so
    only the bad one gets the error.
    """

    def __init__(self, run, settings, executor):
        self.run = run  # {input: array [n, ...]} -> {output: array [n, ...]}, blocking
        self.settings = settings
        self.executor = executor
        self.queue = asyncio.Queue()
        self.pending = 0
        self.worker = None
        self.closed = False

    async def submit(self, inputs):
        if self.closed:
            raise ApiError(503, "This version was unloaded; send the request again.")
        size = len(next(iter(inputs.values())))
        limit = self.settings.max_batch_size * self.settings.max_enqueued_batches
        if self.pending + size > limit:
            raise ApiError(
                429,
                f"The batch scheduling queue to which this task was submitted is full "
                f"({self.pending} instances waiting; --max-enqueued-batches): retry later.",
            )
        if self.worker is None:
            self.worker = asyncio.create_task(self._work())
        future = asyncio.get_running_loop().create_future()
        self.pending += size
        self.queue.put_nowait((inputs, size, future))
        try:
            return await future
        finally:
            self.pending -= size

    async def _work(self):
        loop = asyncio.get_running_loop()
        carry = None
        while True:
            first = carry or await self.queue.get()
            if first is CLOSE:
                return
            tasks, size, carry = [first], first[1], None
            deadline = loop.time() + self.settings.batch_timeout_ms / 1000
            while size < self.settings.max_batch_size:
                task = await self._next(deadline)
                if task is None:
                    break
                if task is CLOSE or size + task[1] > self.settings.max_batch_size:
                    carry = task
                    break
                tasks.append(task)
                size += task[1]
            await self._execute([t for t in tasks if not t[2].done()])

    async def _next(self, deadline):
        """The next queued task, or None once `deadline` (event-loop time) has passed."""
        try:
            return self.queue.get_nowait()
        except asyncio.QueueEmpty:
            pass
        remaining = deadline - asyncio.get_running_loop().time()
        if remaining <= 0:
            return None
        try:
            return await asyncio.wait_for(self.queue.get(), remaining)
        except asyncio.TimeoutError:
            return None

    async def _execute(self, tasks):
        if not tasks:
            return
        try:
            batch = {k: np.concatenate([t[0][k] for t in tasks]) for k in tasks[0][0]}
        except ValueError:  # shapes that don't stack: one call each
            for task in tasks:
                await self._execute([task])
            return
        try:
            outputs = await asyncio.get_running_loop().run_in_executor(self.executor, self.run, batch)
        except Exception as e:
            error = api_error(e)
            if len(tasks) > 1 and error.status == 400:
                for task in tasks:
                    await self._execute([task])
                return
            for _, _, future in tasks:
                if not future.done():
                    future.set_exception(error)
            return
        start = 0
        for inputs, size, future in tasks:
            if not future.done():
                future.set_result({k: v[start : start + size] for k, v in outputs.items()})
            start += size

    def close(self):
        """Answer what is queued, then stop; later calls get 503."""
        self.closed = True
        self.queue.put_nowait(CLOSE)


# ---------------------------------------------------------------- one version


class Version:
    """One loaded version: its SavedModel, signatures, cxrkeras metadata and batchers."""

    def __init__(self, number, path, settings, executor):
        self.number, self.path, self.settings, self.executor = number, path, settings, executor
        self.proto = savedmodel.read_proto(path)
        self.signature_defs = savedmodel.signature_defs(self.proto)
        self.metadata = savedmodel.read_metadata(path)
        self.module = savedmodel.load(path, trust=settings.trust_model)
        self.functions = dict(self.module.signatures)
        self.batchers = {}

    def signature(self, name):
        """The SignatureDef called `name` ("" = serving_default), or TensorFlow Serving's 400."""
        name = name or savedmodel.DEFAULT_SIGNATURE
        if name not in self.signature_defs:
            raise invalid(f'Serving signature name: "{name}" not found in signature def')
        return self.signature_defs[name]

    def input_dtypes(self, name):
        from tensorflow.core.framework import types_pb2

        return {k: types_pb2.DataType.Name(v.dtype) for k, v in self.signature(name).inputs.items()}

    def call(self, name, inputs):
        """Run signature `name` on numpy inputs (blocking); numpy outputs."""
        import tensorflow as tf

        function = self.functions[name]
        tensors = {k: tf.constant(v, dtype=function.structured_input_signature[1][k].dtype) for k, v in inputs.items()}
        return {k: v.numpy() for k, v in function(**tensors).items()}

    def check_inputs(self, name, inputs):
        """400 for inputs the signature can't take: shapes, too many instances, image headers (our exports).

        Returns whether an image is a DICOM (`with_dicom_converted` then makes it one the graph reads).
        """
        name = name or savedmodel.DEFAULT_SIGNATURE
        if name not in self.functions:
            raise invalid(f'Signature "{name}" has no function to run (it is the init op).')
        specs = self.functions[name].structured_input_signature[1]
        for key, array in inputs.items():
            if not specs[key].shape.is_compatible_with(array.shape):
                raise invalid(
                    f"Input {key!r} has shape {list(array.shape)}, not compatible with the signature's "
                    f"{specs[key].shape.as_list()}"
                )
        sizes = {len(a) if a.ndim else None for a in inputs.values()}
        count = max((s for s in sizes if s is not None), default=1)
        if count > self.settings.max_batch_size:
            raise too_many(count, self.settings.max_batch_size)
        if self.metadata is None:
            return False
        kinds = set()
        for i, contents in enumerate(self._encoded_images(name, inputs)):
            if contents is None:
                continue
            kind, problem = image_problem(contents, self.settings.max_image_pixels)
            if problem:
                raise invalid(f"Instance {i}: {problem}")
            kinds.add(kind)
        return data.DICOM in kinds

    def _encoded_images(self, name, inputs):
        """The encoded image of each instance: the `images` input, or the `image` feature of serialized tf.Examples."""
        if name == "classify" and "inputs" in inputs:
            from tensorflow.core.example import example_pb2

            for serialized in inputs["inputs"].reshape(-1):
                try:
                    values = example_pb2.Example.FromString(serialized).features.feature[EXAMPLE_IMAGE_FEATURE]
                except Exception as e:  # protobuf's DecodeError
                    raise invalid(f"Not a serialized tf.Example: {e}") from None
                yield values.bytes_list.value[0] if values.bytes_list.value else None
        elif IMAGE_INPUT in inputs and inputs[IMAGE_INPUT].dtype == object:
            yield from inputs[IMAGE_INPUT].reshape(-1)

    def with_dicom_converted(self, name, inputs):
        """`inputs` with each DICOM image (in `images`, or in a tf.Example's `image`) made a PNG; blocking."""
        from tensorflow.core.example import example_pb2

        key = "inputs" if name == "classify" and "inputs" in inputs else IMAGE_INPUT
        items = inputs[key].copy()
        flat = items.reshape(-1)
        for i, item in enumerate(flat):
            try:
                if key == IMAGE_INPUT:
                    flat[i] = converted(item)
                    continue
                example = example_pb2.Example.FromString(item)
                values = example.features.feature[EXAMPLE_IMAGE_FEATURE].bytes_list.value
                if values:
                    values[0] = converted(values[0])
                flat[i] = example.SerializeToString()
            except ApiError as e:
                raise invalid(f"Instance {i}: {e.message}") from None
        return {**inputs, key: items}

    async def run(self, name, inputs):
        """Check, then call signature `name` through its batcher."""
        name = name or savedmodel.DEFAULT_SIGNATURE
        if self.check_inputs(name, inputs):
            inputs = await asyncio.to_thread(self.with_dicom_converted, name, inputs)
        if name not in self.batchers:
            self.batchers[name] = Batcher(lambda batch: self.call(name, batch), self.settings, self.executor)
        if any(a.ndim == 0 for a in inputs.values()):  # no batch axis: a call of its own
            return await asyncio.get_running_loop().run_in_executor(self.executor, self.call, name, inputs)
        return await self.batchers[name].submit(inputs)

    def warm_up(self):
        """One call of each image signature of our export (blocking), so the first request isn't slow."""
        from tensorflow.core.example import example_pb2
        from tensorflow.core.framework import types_pb2

        if self.metadata is None:
            return
        image = savedmodel.probe_image(int(self.metadata.get("image_size", 150)))
        for name in self.functions:
            inputs = self.signature(name).inputs
            if list(inputs) == [IMAGE_INPUT] and inputs[IMAGE_INPUT].dtype == types_pb2.DT_STRING:
                self.call(name, {IMAGE_INPUT: object_array([image])})
            elif name == "classify":
                example = example_pb2.Example()
                example.features.feature[EXAMPLE_IMAGE_FEATURE].bytes_list.value.append(image)
                self.call(name, {"inputs": object_array([example.SerializeToString()])})

    def close(self):
        for batcher in self.batchers.values():
            batcher.close()


def object_array(items):
    """A 1-D numpy object array of bytes (a string tensor)."""
    array = np.empty(len(items), dtype=object)
    array[:] = items
    return array


def too_many(count, limit):
    return invalid(
        f"Task size {count} is larger than maximum input batch size {limit}: "
        f"send at most {limit} instances per request (--max-batch-size)."
    )


# ---------------------------------------------------------------- the model's versions


class ModelServer:
    """Every version of one model under a base folder: loading, polling, status, metadata, predict, classify."""

    def __init__(self, base, name, settings):
        self.base, self.name, self.settings = os.fspath(base), name, settings
        self.versions = {}  # number -> Version, loaded and warmed up
        self.failed = {}  # number -> why it didn't load
        self.loading = set()
        self.ready = False
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="inference")

    # ---- loading

    async def sync(self):
        """Load new version folders, drop removed ones; ready once a version serves."""
        found = set(savedmodel.saved_versions(self.base))
        for number in sorted(set(self.versions) - found):
            log.info("version %d of %s removed: unloaded", number, self.name)
            self.versions.pop(number).close()
        for number in sorted(found - set(self.versions) - set(self.failed), reverse=True):
            await self.load(number)
        self.ready = bool(self.versions)

    async def load(self, number):
        path = os.path.join(self.base, str(number))
        self.loading.add(number)
        try:
            version = await asyncio.to_thread(Version, number, path, self.settings, self.executor)
            await asyncio.to_thread(version.warm_up)
        except Exception as e:  # a refused or broken version: reported in the status, the others still serve
            self.failed[number] = str(e)
            log.error("version %d of %s not loaded: %s", number, self.name, e)
            return
        finally:
            self.loading.discard(number)
        self.versions[number] = version
        log.info("serving version %d of %s from %s", number, self.name, path)

    async def poll_forever(self):
        while True:
            try:
                await self.sync()
            except Exception:  # a folder that vanished mid-scan: try again next time
                log.exception("polling %s failed", self.base)
            await asyncio.sleep(self.settings.poll_seconds)

    def close(self):
        for version in self.versions.values():
            version.close()
        self.executor.shutdown(wait=False)

    # ---- answers

    def version(self, name, number):
        """The Version a request addresses (highest by default), or TensorFlow Serving's 404 (503 while loading)."""
        missing = rest.not_found(f"Servable not found for request: {rest.servable(name, number)}")
        if name != self.name:
            raise missing
        if not self.ready:
            raise ApiError(503, f"Model {name} is not ready yet: its versions are loading and warming up.")
        if number is None:
            return self.versions[max(self.versions)]
        if number in self.loading:
            raise ApiError(503, f"Version {number} of model {name} is loading.")
        if number not in self.versions:
            raise missing
        return self.versions[number]

    def status(self, name, number):
        """TensorFlow Serving's model status: every version (highest first), or the one asked for."""
        states = {v: ("AVAILABLE", "OK", "") for v in self.versions}
        states.update({v: ("LOADING", "OK", "") for v in self.loading})
        states.update({v: ("END", "FAILED_PRECONDITION", why) for v, why in self.failed.items()})
        if name != self.name or not states:
            raise rest.not_found(f"Could not find any versions of model {name}")
        if number is not None and number not in states:
            raise rest.not_found(f"Could not find version {number} of model {name}")
        shown = [number] if number is not None else sorted(states, reverse=True)
        return {
            "model_version_status": [
                {
                    "version": str(v),
                    "state": states[v][0],
                    "status": {"error_code": states[v][1], "error_message": states[v][2]},
                }
                for v in shown
            ]
        }

    def metadata(self, name, number):
        version = self.version(name, number)
        return savedmodel.metadata_json(version.proto, name, version.number)

    async def predict(self, name, number, body):
        version = self.version(name, number)
        instances = body.get("instances") if isinstance(body, dict) else None
        if isinstance(instances, list) and len(instances) > self.settings.max_batch_size:
            raise too_many(len(instances), self.settings.max_batch_size)
        signature, inputs, form = rest.predict_request(body, version.input_dtypes)
        outputs = await version.run(signature, inputs)
        return rest.predict_response(outputs, form)

    async def classify(self, name, number, body):
        version = self.version(name, number)
        signature, examples = rest.classify_request(body)
        input_name = rest.check_classify_signature(version.signature(signature))
        if len(examples) > self.settings.max_batch_size:
            raise too_many(len(examples), self.settings.max_batch_size)
        inputs = {input_name: object_array(examples)}
        outputs = await version.run(signature, inputs)
        return rest.classify_response(outputs)

    def page_model(self):
        """What the page shows: name, served version, class names, thresholds, limits."""
        version = self.versions[max(self.versions)] if self.ready else None
        metadata = (version.metadata or {}) if version else {}
        return {
            "name": self.name,
            "ready": self.ready,
            "version": version.number if version else None,
            "versions": sorted(self.versions),
            "kind": metadata.get("kind"),
            "class_names": metadata.get("class_names"),
            "thresholds": metadata.get("thresholds"),
            "image_size": metadata.get("image_size"),
            "adapted": metadata.get("adapted"),
            "calibrated": metadata.get("calibrated"),
            "explain": bool(version and "explain" in version.functions),
            "max_batch_size": self.settings.max_batch_size,
            "max_body_bytes": int(self.settings.max_body_mb * 2**20),
        }


# ---------------------------------------------------------------- HTTP


def json_response(obj, status=200):
    from starlette.responses import Response

    return Response(json.dumps(obj, allow_nan=True), status_code=status, media_type="application/json")


async def read_body(request, max_mb):
    """The request's body: 413 past `max_mb`."""
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


async def read_json(request, max_mb):
    """The request's JSON body: 413 past `max_mb`, TensorFlow Serving's parse errors otherwise."""
    body = await read_body(request, max_mb)
    if not body.strip():
        raise invalid("JSON Parse error: The document is empty")
    try:
        if len(body) > 2**18:  # a big body parses off the event loop
            return await asyncio.to_thread(json.loads, body)
        return json.loads(body)
    except (ValueError, UnicodeDecodeError) as e:
        raise invalid(f"JSON Parse error: {e}") from None


def create_app(base, name, settings=None):
    """The Starlette app serving model `name` from `base` (a folder of numbered versions)."""
    from starlette.applications import Starlette
    from starlette.middleware import Middleware
    from starlette.middleware.cors import CORSMiddleware
    from starlette.responses import FileResponse
    from starlette.routing import Mount, Route
    from starlette.staticfiles import StaticFiles

    settings = settings or Settings()
    server = ModelServer(base, name, settings)

    async def v1(request):
        try:
            route = rest.parse_path(request.method, request.url.path)
            name, number = route["name"], route["version"]
            if request.method == "GET":
                answer = server.metadata(name, number) if route["metadata"] else server.status(name, number)
            elif route["verb"] == "regress":
                raise ApiError(501, "This model has no regression signature: use :predict or :classify.")
            else:
                server.version(name, number)  # 404/503 before reading the body
                body = await read_json(request, settings.max_body_mb)
                handler = server.predict if route["verb"] == "predict" else server.classify
                answer = await handler(name, number, body)
        except ApiError as e:
            return json_response({"error": e.message}, e.status)
        return json_response(answer)

    async def live(request):
        return json_response({"live": True})

    async def ready(request):
        if server.ready:
            return json_response({"ready": True})
        return json_response({"error": f"Model {server.name} is loading and warming up."}, 503)

    async def page(request):
        return FileResponse(os.path.join(STATIC_DIR, "index.html"))

    async def page_model(request):
        return json_response(server.page_model())

    async def page_image(request):
        """An uploaded file as a PNG the browser can draw: a DICOM as the model sees it (the page's background)."""
        from starlette.responses import Response

        try:
            contents = await read_body(request, settings.max_body_mb)
            kind, problem = image_problem(contents, settings.max_image_pixels)
            if problem:
                raise invalid(problem)
            if kind == data.DICOM:
                contents = await asyncio.to_thread(converted, contents)
        except ApiError as e:
            return json_response({"error": e.message}, e.status)
        return Response(contents, media_type="image/png" if kind == data.DICOM else f"image/{kind.lower()}")

    async def http_error(request, exc):
        return json_response({"error": f"{exc.detail}: {request.method} {request.url.path}"}, exc.status_code)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        poller = asyncio.create_task(server.poll_forever())
        yield
        poller.cancel()
        server.close()

    routes = [
        Route("/", page),
        Route("/ui/model.json", page_model),
        Route("/ui/image", page_image, methods=["POST"]),
        Mount("/ui", StaticFiles(directory=STATIC_DIR), name="ui"),
        Route("/v2/health/live", live),
        Route("/v2/health/ready", ready),
        Route("/v1/{path:path}", v1, methods=["GET", "POST"]),
    ]
    middleware = []
    if settings.cors:  # TensorFlow Serving's CORS headers
        middleware.append(
            Middleware(
                CORSMiddleware, allow_origins=["*"], allow_methods=["GET", "POST"], allow_headers=["Content-Type"]
            )
        )
    app = Starlette(
        routes=routes,
        middleware=middleware,
        lifespan=lifespan,
        exception_handlers={404: http_error, 405: http_error},
    )
    app.state.server = server
    return app


def served_versions(base, trust=False):
    """The numbered SavedModel versions under `base`, each through `savedmodel.check_ops` unless `trust`.

    Raises SavedModelError when `base` is a version folder itself, holds no
    version, or a version uses ops outside the allow-list.
    """
    base = os.fspath(base)
    if savedmodel.is_saved_model(base):
        raise savedmodel.SavedModelError(f"{base}: a SavedModel version folder; pass its parent, the base folder.")
    found = savedmodel.saved_versions(base)
    if not found:
        raise savedmodel.SavedModelError(
            f"{base}: no numbered SavedModel versions (1/, 2/, ...); write one with `cxrkeras export MODEL --out {base}`."
        )
    for version in found if not trust else []:
        savedmodel.check_ops(os.path.join(base, str(version)))
    return found


def run(app, host="127.0.0.1", port=8501):
    """Serve `app` until SIGTERM or Ctrl-C, which answer the requests in flight first; False if it couldn't bind."""
    import signal

    # uvicorn re-raises the SIGTERM it handled once it has stopped: a handler of ours makes that a normal return.
    signal.signal(signal.SIGTERM, lambda signum, frame: None)
    try:
        uvicorn_server(app, host, port).run()
    except SystemExit:  # uvicorn exits 3 when it can't bind, after logging why
        return False
    return True


def uvicorn_server(app, host="127.0.0.1", port=8501, log_level="info"):
    """A uvicorn.Server for `app` (call .run(); it stops on SIGTERM/SIGINT after answering requests in flight)."""
    import uvicorn

    if not log.handlers:  # our lines (versions loaded, refused) beside uvicorn's
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s:     %(message)s"))
        log.addHandler(handler)
    log.setLevel(log_level.upper())
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, access_log=False, lifespan="on")
    return uvicorn.Server(config)
