"""`cxrkeras serve`: an exported base folder over TensorFlow Serving's REST API, with a page to try it.

Path of a request: Starlette route -> `rest.parse_path` -> the body read
under `--max-body-mb` -> `rest.predict_request` / `rest.classify_request`
(TensorFlow Serving's JSON mapping) -> image headers checked in Python by
the judge training uses (`data.image_problem`: an image declaring
20000x20000 never reaches the graph's decoder) -> DICOM images made the
16-bit PNG the graph decodes (`data.encoded_image`, off the event loop: the
graph reads image formats only) -> the signature's `Batcher`, which gathers
concurrent requests into one model call (as many instances as the last
batch had, waiting at most `--batch-timeout-ms`, at most `--max-batch-size`)
run on one inference thread, off the event loop ->
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
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from cxrkeras import data, monitoring, rest, savedmodel
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
    batch_timeout_ms: float = 10.0
    max_enqueued_batches: int = 16
    max_body_mb: float = 32.0
    max_image_pixels: int = 4096 * 4096
    poll_seconds: float = 1.0
    read_timeout_s: float = 30.0  # a request's headers, then its body, must each arrive within it
    keep_alive_s: float = 5.0  # an idle keep-alive connection closes after it (uvicorn's timeout_keep_alive)
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

    A batch takes every request already queued, then waits for the demand
    seen since the last batch closed (the most instances waiting for an
    answer at once) up to `batch_timeout_ms` after its first request, and
    closes at `max_batch_size` instances. It runs on `executor` (one thread:
    inference never blocks the event loop); requests arriving meanwhile form
    the next batch. When a batch fails on bad input, its requests are rerun
    one by one so only the bad one gets the error.

    Why wait for the demand seen last time rather than a fixed time (issue
    23): clients that wait for their answer come back together, but spread
    over a few milliseconds (the event loop writes their answers one by one,
    each client parses its answer and sends the next request, and the event
    loop reads and checks each body). A fixed 2 ms from the first request
    closed most batches before the last of 4 clients arrived: the latecomers
    waited a whole model call in the queue, then went as a small batch of
    their own, so 4 clients x 1 image ran half-size batches (58% of the
    model's batched rate) at two model calls of latency (p99 50 ms). Waiting
    for as many instances as were waiting at once during the last call puts
    every client in each call, one call of latency; a lone client waits for
    no one (its batch is full at 1), and the timeout (10 ms: well over the
    spread of clients coming back, well under a model call) only bounds the
    wait of the one round after clients go away.
    """

    def __init__(self, run, settings, executor, on_batch=None):
        self.run = run  # {input: array [n, ...]} -> {output: array [n, ...]}, blocking
        self.settings = settings
        self.executor = executor
        self.on_batch = on_batch  # called with (instances, seconds) after each model call
        self.queue = asyncio.Queue()
        self.pending = 0  # instances submitted and not yet answered
        self.peak = 0  # the most instances pending at once since the last batch closed: a batch waits for so many
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
        self.peak = max(self.peak, self.pending)
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
            limit = self.settings.max_batch_size
            deadline = loop.time() + self.settings.batch_timeout_ms / 1000
            while size < limit:
                task = await self._next(deadline if size < self.peak else None)
                if task is None:
                    break
                if task is CLOSE or size + task[1] > limit:
                    carry = task
                    break
                tasks.append(task)
                size += task[1]
            self.peak = self.pending  # this batch's and those queued behind it, until more come
            await self._execute([t for t in tasks if not t[2].done()])

    async def _next(self, deadline):
        """The next queued task; None when none is queued and `deadline` (event-loop time, or None: now) passed."""
        try:
            return self.queue.get_nowait()
        except asyncio.QueueEmpty:
            pass
        if deadline is None:
            return None
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
        loop = asyncio.get_running_loop()
        started = loop.time()
        try:
            outputs = await loop.run_in_executor(self.executor, self.run, batch)
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
        if self.on_batch:
            self.on_batch(len(next(iter(batch.values()))), loop.time() - started)
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

    def __init__(self, number, path, settings, executor, on_batch=None):
        self.number, self.path, self.settings, self.executor = number, path, settings, executor
        self.on_batch = on_batch  # called with (signature name, instances, seconds) after each model call
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
            on_batch = (lambda size, seconds: self.on_batch(name, size, seconds)) if self.on_batch else None
            self.batchers[name] = Batcher(lambda batch: self.call(name, batch), self.settings, self.executor, on_batch)
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


def signature_label(version, body):
    """The signature a request body names ("serving_default" when none) if `version` has it, else "" (a label)."""
    name = body.get("signature_name") if isinstance(body, dict) else None
    name = (name or savedmodel.DEFAULT_SIGNATURE) if isinstance(name, (str, type(None))) else ""
    return name if name in version.signature_defs else ""


def folder_state(path):
    """(relative path, size, modification time) of every file under `path`, sorted: changes when a copy goes on."""
    files = []
    for root, _, names in os.walk(path):
        for name in names:
            try:
                stat = os.stat(os.path.join(root, name))
            except OSError:  # gone meanwhile
                continue
            files.append((os.path.relpath(os.path.join(root, name), path), stat.st_size, stat.st_mtime_ns))
    return sorted(files)


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
        self.failed = {}  # number -> (its folder's files when it failed, why it didn't load)
        self.loading = set()
        self.ready = False  # a version serves
        self.stopping = False  # SIGTERM came: answering the requests in flight, then exiting
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="inference")
        self.metrics = monitoring.Metrics(self)

    # ---- loading

    async def sync(self):
        """Load new version folders, drop removed ones; ready once a version serves.

        A version that failed to load is tried again once its folder changes
        (a copy that was not finished, fixed files) and forgotten once it goes.
        """
        found = set(savedmodel.saved_versions(self.base))
        for number in sorted(set(self.versions) - found):
            log.info("version %d of %s removed: unloaded", number, self.name)
            self.versions.pop(number).close()
        for number in sorted(set(self.failed)):
            if number not in found:
                del self.failed[number]
            elif folder_state(self._path(number)) != self.failed[number][0]:
                log.info("version %d of %s changed since it failed: loading it again", number, self.name)
                del self.failed[number]
        for number in sorted(found - set(self.versions) - set(self.failed), reverse=True):
            await self.load(number)
        self.ready = bool(self.versions)

    def _path(self, number):
        return os.path.join(self.base, str(number))

    async def load(self, number):
        path = self._path(number)
        self.loading.add(number)
        try:
            state = await asyncio.to_thread(folder_state, path)
            on_batch = lambda signature, size, seconds: self.metrics.batch(  # noqa: E731
                self.name, str(number), signature, size, seconds
            )
            version = await asyncio.to_thread(Version, number, path, self.settings, self.executor, on_batch)
            await asyncio.to_thread(version.warm_up)
        except Exception as e:  # a refused or broken version: reported in the status, the others still serve
            self.failed[number] = (state, str(e))
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

    def readiness(self):
        """None when ready to take requests, else why not (the 503 of /v2/health/ready)."""
        if self.stopping:
            return f"Model {self.name} is shutting down."
        if not self.ready:
            return f"Model {self.name} is loading and warming up."
        return None

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

    def states(self):
        """{version: (state, error code, message)} of every version loaded, loading or failed."""
        states = {v: ("AVAILABLE", "OK", "") for v in self.versions}
        states.update({v: ("LOADING", "OK", "") for v in self.loading})
        states.update({v: ("END", "FAILED_PRECONDITION", why) for v, (_, why) in self.failed.items()})
        return states

    def status(self, name, number):
        """TensorFlow Serving's model status: every version (highest first), or the one asked for."""
        states = self.states()
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

    async def predict(self, name, number, body, labels):
        """TensorFlow Serving's :predict; `labels` gets the version and signature answering (for metrics)."""
        version = self.version(name, number)
        labels["version"], labels["signature"] = str(version.number), signature_label(version, body)
        instances = body.get("instances") if isinstance(body, dict) else None
        if isinstance(instances, list) and len(instances) > self.settings.max_batch_size:
            raise too_many(len(instances), self.settings.max_batch_size)
        signature, inputs, form = rest.predict_request(body, version.input_dtypes)
        outputs = await version.run(signature, inputs)
        return rest.predict_response(outputs, form)

    async def classify(self, name, number, body, labels):
        """TensorFlow Serving's :classify; `labels` as in `predict`."""
        version = self.version(name, number)
        labels["version"], labels["signature"] = str(version.number), signature_label(version, body)
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
        started = time.perf_counter()
        labels, api, status, name = {"version": "", "signature": ""}, "", 200, None
        try:
            route = rest.parse_path(request.method, request.url.path)
            name, number = route["name"], route["version"]
            api = route["verb"] or ("metadata" if route["metadata"] else "status")
            if route["verb"] is None:
                answer = server.metadata(name, number) if route["metadata"] else server.status(name, number)
            elif route["verb"] == "regress":
                raise ApiError(501, "This model has no regression signature: use :predict or :classify.")
            else:
                server.version(name, number)  # 404/503 before reading the body
                body = await read_json(request, settings)
                handler = server.predict if route["verb"] == "predict" else server.classify
                try:
                    answer = await handler(name, number, body, labels)
                except RecursionError:  # JSON nested nearly as deep as the parser goes, met again in our code
                    raise too_deep() from None
            response = json_response(answer)
        except ApiError as e:
            status, response = e.status, json_response({"error": e.message}, e.status)
        except Exception as e:  # a bug of ours: still TensorFlow Serving's JSON, and counted
            log.exception("%s %s failed", request.method, request.url.path)
            status, response = 500, json_response({"error": f"Internal error: {type(e).__name__}: {e}"}, 500)
        model = server.name if name == server.name else ""
        seconds = time.perf_counter() - started
        server.metrics.request(model, labels["version"], labels["signature"], api, status, seconds)
        return response

    async def live(request):
        return json_response({"live": True})

    async def ready(request):
        why = server.readiness()
        return json_response({"ready": True} if why is None else {"error": why}, 200 if why is None else 503)

    async def metrics(request):
        from starlette.responses import Response

        return Response(server.metrics.text(), media_type=monitoring.CONTENT_TYPE)

    async def page(request):
        return FileResponse(os.path.join(STATIC_DIR, "index.html"))

    async def page_model(request):
        return json_response(server.page_model())

    async def page_image(request):
        """An uploaded file as a PNG the browser can draw: a DICOM as the model sees it (the page's background)."""
        from starlette.responses import Response

        try:
            contents = await read_body(request, settings)
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
        Route(monitoring.PATH, metrics),
        Route("/v1/{path:path}", v1, methods=["GET", "HEAD", "POST"]),
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
    app.state.server, app.state.settings = server, settings
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
