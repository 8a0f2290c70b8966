"""`cxrkeras serve`: TensorFlow Serving's REST API on a free loopback port, with real JPEG/PNG bytes.

One server (in a thread) for the module over a copy of the session's tiny
exported cascade; answers are checked against the SavedModel's own outputs.
A second one runs as `cxrkeras serve` in a subprocess for SIGTERM.
"""

import asyncio
import base64
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import zlib
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image
from images import dicom_of, write_dicom
from serving_helpers import http, start, wait_for
from tiny_models import write_crafted_savedmodel

from cxrkeras import serving
from cxrkeras.cli import main
from cxrkeras.serving import batching, protocol
from cxrkeras.serving.protocol import ApiError
from cxrkeras.synth import synth_image

NAME = "cxr"
SETTINGS = dict(max_batch_size=8, batch_timeout_ms=20, max_body_mb=1, poll_seconds=0.2, read_timeout_s=1)


# ---------------------------------------------------------------- helpers


def encode(array, fmt, size=None):
    picture = Image.fromarray(array, "L")
    if size:
        picture = picture.resize(size)
    buffer = io.BytesIO()
    picture.save(buffer, fmt)
    return buffer.getvalue()


def b64(contents):
    return {"b64": base64.b64encode(contents).decode()}


def png_chunk(kind, data, length=None):
    length = len(data) if length is None else length
    return length.to_bytes(4, "big") + kind + data + zlib.crc32(kind + data).to_bytes(4, "big")


def huge_png():
    """200 bytes of a PNG declaring 20000x20000 pixels: a valid header, then an IDAT chunk cut short."""
    header = png_chunk(b"IHDR", (20000).to_bytes(4, "big") * 2 + bytes([8, 0, 0, 0, 0]))
    png = b"\x89PNG\r\n\x1a\n" + header + png_chunk(b"IDAT", zlib.compress(bytes(5000)), length=100000)
    return png[:200]


@pytest.fixture(scope="module")
def images():
    rng = np.random.default_rng(1)
    gray = [synth_image(label, rng) for label in ("normal", "non-covid", "covid", "covid")]
    return [
        encode(gray[0], "JPEG"),
        encode(gray[1], "PNG", (220, 180)),
        encode(gray[2], "JPEG", (300, 300)),
        encode(gray[3], "PNG"),
    ]


@pytest.fixture(scope="module")
def served(exported_cascade, tmp_path_factory):
    """{"url", "base", "app", "saved"}: the server over a copy of the tiny export, and that SavedModel loaded here."""
    import tensorflow as tf

    base = tmp_path_factory.mktemp("serve") / "cascade"
    shutil.copytree(exported_cascade["base"], base)
    app = serving.create_app(base, NAME, serving.Settings(**SETTINGS))
    url, server, thread = start(app)
    wait_for(lambda: http(url, "/v2/health/ready")[0] == 200)
    yield {"url": url, "base": base, "app": app, "server": server, "saved": tf.saved_model.load(str(base / "1"))}
    server.should_exit = True
    thread.join(30)


def own(served, signature, contents):
    """The SavedModel's own answer, called here."""
    import tensorflow as tf

    function = served["saved"].signatures[signature]
    return {k: v.numpy() for k, v in function(images=tf.constant(contents)).items()}


# ---------------------------------------------------------------- answers


def test_status_metadata_and_health(served):
    url = served["url"]
    status, answer, headers = http(url, f"/v1/models/{NAME}")
    expected = {"version": "1", "state": "AVAILABLE", "status": {"error_code": "OK", "error_message": ""}}
    assert status == 200 and answer == {"model_version_status": [expected]}
    assert headers["Content-Type"] == "application/json" and "Access-Control-Allow-Origin" not in headers
    assert http(url, f"/v1/models/{NAME}/versions/1")[1] == answer
    status, answer, _ = http(url, f"/v1/models/{NAME}/metadata")
    assert status == 200 and answer["model_spec"] == {"name": NAME, "signature_name": "", "version": "1"}
    signatures = answer["metadata"]["signature_def"]["signature_def"]
    assert set(signatures) == {"serving_default", "predict_images", "explain", "classify", "__saved_model_init_op"}
    default = signatures["serving_default"]
    assert default["method_name"] == "tensorflow/serving/predict"
    assert default["inputs"]["images"]["dtype"] == "DT_STRING"
    assert default["inputs"]["images"]["tensor_shape"] == {"dim": [{"size": "-1", "name": ""}], "unknown_rank": False}
    assert default["outputs"]["probabilities"]["tensor_shape"]["dim"] == [
        {"size": "-1", "name": ""},
        {"size": "3", "name": ""},
    ]
    assert {k: v["dtype"] for k, v in default["outputs"].items()} == {
        "probabilities": "DT_FLOAT",
        "class_id": "DT_INT64",
        "class_name": "DT_STRING",
    }
    assert http(url, "/v2/health/live")[:2] == (200, {"live": True})
    assert http(url, "/v2/health/ready")[:2] == (200, {"ready": True})


def test_predict_row_and_columnar_forms_equal_the_savedmodel(served, images):
    url, expected = served["url"], own(served, "serving_default", images)
    status, answer, _ = http(url, f"/v1/models/{NAME}:predict", {"instances": [b64(c) for c in images]})
    assert status == 200 and len(answer["predictions"]) == len(images)
    for i, row in enumerate(answer["predictions"]):
        assert set(row) == {"probabilities", "class_id", "class_name"}
        np.testing.assert_allclose(row["probabilities"], expected["probabilities"][i], atol=1e-6)
        assert row["class_id"] == expected["class_id"][i] and row["class_name"] == expected["class_name"][i].decode()
    assert np.ptp([r["probabilities"][2] for r in answer["predictions"]]) > 1e-4  # the images get different answers
    # named instances, a version in the path, the columnar form (named and plain)
    named = {"signature_name": "serving_default", "instances": [{"images": b64(c)} for c in images]}
    assert http(url, f"/v1/models/{NAME}/versions/1:predict", named)[1] == answer
    status, columnar, _ = http(url, f"/v1/models/{NAME}:predict", {"inputs": {"images": [b64(c) for c in images]}})
    assert status == 200 and set(columnar["outputs"]) == {"probabilities", "class_id", "class_name"}
    np.testing.assert_allclose(columnar["outputs"]["probabilities"], expected["probabilities"], atol=1e-6)
    assert http(url, f"/v1/models/{NAME}:predict", {"inputs": [b64(c) for c in images]})[1] == columnar


def test_float_images_and_explain(served, images):
    import tensorflow as tf

    url = served["url"]
    arrays = [tf.io.decode_image(c, channels=1, dtype=tf.float32).numpy() for c in images[:1]]
    arrays = [tf.image.resize(a, (150, 150)).numpy() for a in arrays]
    status, answer, _ = http(url, f"/v1/models/{NAME}:predict", {"signature_name": "predict_images", "instances": [a.tolist() for a in arrays]})
    expected = served["saved"].signatures["predict_images"](images=tf.constant(np.stack(arrays)))
    assert status == 200
    np.testing.assert_allclose(answer["predictions"][0]["probabilities"], expected["probabilities"][0], atol=1e-6)
    status, answer, _ = http(url, f"/v1/models/{NAME}:predict", {"signature_name": "explain", "instances": [b64(images[2])]})
    row, expected = answer["predictions"][0], own(served, "explain", images[2:3])
    assert status == 200 and np.shape(row["heatmap"]) == (150, 150)
    np.testing.assert_allclose(row["heatmap"], expected["heatmap"][0], atol=1e-6)
    assert row["explained_by"] == expected["explained_by"][0].decode()


def test_classify(served, images):
    url = served["url"]
    body = {"signature_name": "classify", "examples": [{"image": b64(c)} for c in images[:2]]}
    status, answer, _ = http(url, f"/v1/models/{NAME}:classify", body)
    probabilities = own(served, "serving_default", images[:2])["probabilities"]
    assert status == 200 and [[label for label, _ in row] for row in answer["results"]] == [["normal", "non-covid", "covid"]] * 2
    np.testing.assert_allclose([[score for _, score in row] for row in answer["results"]], probabilities, atol=1e-6)
    # as TensorFlow Serving: serving_default (three outputs, input `images`) is no classification signature
    status, answer, _ = http(url, f"/v1/models/{NAME}:classify", {"examples": [{"image": b64(images[0])}]})
    assert (status, answer) == (400, {"error": "Expected one or two output Tensors, found 3"})


def test_a_dicom_image_is_converted_by_the_server(served, images):
    import urllib.request

    url, png = served["url"], images[3]
    gray = np.asarray(Image.open(io.BytesIO(png)))
    m1, m2, frames = io.BytesIO(), io.BytesIO(), io.BytesIO()
    dicom_of(gray, m1, "MONOCHROME1")
    dicom_of(gray, m2, "MONOCHROME2")
    write_dicom(frames, np.zeros((2, 4, 4), "uint16"))
    expected = own(served, "serving_default", [png])["probabilities"][0]
    status, answer, _ = http(url, f"/v1/models/{NAME}:predict", {"instances": [b64(m1.getvalue()), b64(m2.getvalue())]})
    assert status == 200
    for row in answer["predictions"]:
        np.testing.assert_allclose(row["probabilities"], expected, atol=1e-4)
    body = {"signature_name": "classify", "examples": [{"image": b64(m1.getvalue())}]}
    status, answer, _ = http(url, f"/v1/models/{NAME}:classify", body)
    assert status == 200
    np.testing.assert_allclose([score for _, score in answer["results"][0]], expected, atol=1e-4)
    status, answer, _ = http(url, f"/v1/models/{NAME}:predict", {"instances": [b64(png), b64(frames.getvalue())]})
    assert status == 400 and answer["error"].startswith("Instance 1: multi-frame DICOM (2 frames)")
    with urllib.request.urlopen(urllib.request.Request(url + "/ui/image", data=m1.getvalue()), timeout=60) as shown:
        assert shown.headers["content-type"] == "image/png"
        np.testing.assert_allclose(np.asarray(Image.open(io.BytesIO(shown.read()))) / 65535, gray / 255, atol=1e-4)


# ---------------------------------------------------------------- bad requests


def nested(depth, inner="1", opening="[", closing="]"):
    return opening * depth + inner + closing * depth


def bad_requests(images):
    """(name, path, body or raw bytes, status, part of the message) for each bad request of issues 9 and 23."""
    good = b64(images[0])
    jpeg = images[2]
    url_safe = next(c for c in images if set(base64.b64encode(c)) & set(b"+/"))
    predict, classify = f"/v1/models/{NAME}:predict", f"/v1/models/{NAME}:classify"
    floats = np.full((150, 150, 1), 0.5).tolist()
    nan_image = json.dumps({"signature_name": "predict_images", "instances": [floats]}).replace("0.5", "NaN", 1)
    deep = [  # JSON nested 980 to 5,000 levels (the parser's limit is near 1,000), 65 to 950 in predict_images
        (f"JSON {depth} deep ({where})", path, body.encode(), 400, message)
        for depth, message in ((980, "nested"), (5000, "nested too deep"))
        for where, path, body in (
            ("instances", predict, f'{{"instances": {nested(depth)}}}'),
            ("objects", predict, f'{{"instances": [{nested(depth, "1", chr(123) + chr(34) + "b64" + chr(34) + ":", chr(125))}]}}'),
            ("examples", classify, f'{{"examples": [{{"image": {nested(depth)}}}]}}'),
            ("context", classify, f'{{"context": {nested(depth, "1", chr(123) + chr(34) + "a" + chr(34) + ":", chr(125))}, "examples": []}}'),
        )
    ] + [
        (f"predict_images {depth} deep", predict, {"signature_name": "predict_images", "inputs": json.loads(nested(depth, "0.5"))}, 400, f"nested {depth} deep")
        for depth in (65, 950)
    ]
    return deep + [
        ("empty inputs", predict, {"inputs": []}, 400, "No values in 'inputs'"),
        ("empty named inputs", predict, {"inputs": {"images": []}}, 400, "No values in 'inputs'"),
        ("empty float inputs", predict, {"signature_name": "predict_images", "inputs": []}, 400, "No values in 'inputs'"),
        ("NaN pixel", predict, nan_image.encode(), 400, "NaN or infinite"),
        ("1e999 pixel", predict, nan_image.replace("NaN", "1e999").encode(), 400, "NaN or infinite"),
        ("1e39 pixel (inf as float32)", predict, nan_image.replace("NaN", "1e39").encode(), 400, "NaN or infinite as float32"),
        ("Infinity in columns", predict, b'{"signature_name": "predict_images", "inputs": [[[[Infinity]]]]}', 400, "NaN or infinite"),
        ("NaN feature", classify, b'{"signature_name": "classify", "examples": [{"x": NaN}]}', 400, "NaN or infinite"),
        ("malformed JSON", predict, b'{"instances": [', 400, "JSON Parse error"),
        ("empty body", predict, b"", 400, "The document is empty"),
        ("missing key", predict, {"signature_name": "serving_default"}, 400, "Missing 'inputs' or 'instances' key"),
        ("extra key", predict, {"instances": [{"images": good, "extra": 1}]}, 400, "does not have named input: extra"),
        ("both forms", predict, {"instances": [good], "inputs": [good]}, 400, "expecting only one of 'inputs' or 'instances'"),
        ("bad base64", predict, {"instances": [{"b64": "***"}]}, 400, "Unable to base64 decode"),
        ("URL-safe base64", predict, {"instances": [{"b64": base64.urlsafe_b64encode(url_safe).decode()}]}, 400, "URL-safe base64"),
        ("not an image", predict, {"instances": [b64(b"just some bytes")]}, 400, "not an image"),
        ("truncated JPEG", predict, {"instances": [b64(jpeg[: len(jpeg) // 2])]}, 400, "Invalid JPEG data"),
        ("20000x20000 PNG", predict, {"instances": [b64(huge_png())]}, 400, "PNG declares 20000x20000 = 400,000,000 pixels, over the limit of 16,777,216 (raise it with --max-image-pixels)"),
        ("unknown model", "/v1/models/nope:predict", {"instances": [good]}, 404, "Servable not found for request: Latest(nope)"),
        ("unknown version", f"/v1/models/{NAME}/versions/99:predict", {"instances": [good]}, 404, f"Specific({NAME}, 99)"),
        ("unknown signature", predict, {"signature_name": "nope", "instances": [good]}, 400, 'signature name: "nope" not found'),
        ("body too large", predict, b" " * (SETTINGS["max_body_mb"] * 2**20 + 10), 413, "over 1 MB (--max-body-mb)"),
        ("float for bytes", predict, {"instances": [1.5]}, 400, "JSON Value: 1.5 Type: Number is not of expected type: string"),
        ("10,000 instances", predict, {"instances": [{"b64": "AAAA"}] * 10000}, 400, "Task size 10000 is larger than maximum input batch size 8"),
        ("a version label", f"/v1/models/{NAME}/labels/stable:predict", {"instances": [good]}, 400, "Unrecognized servable version label: stable"),
        ("malformed path", f"/v1/models/{NAME}/version/1:predict", {"instances": [good]}, 400, "Malformed request: POST"),
        ("the init op", predict, {"signature_name": "__saved_model_init_op", "instances": [good]}, 400, "Failed to get input map"),
    ]


def test_each_bad_request_gets_a_clear_4xx_and_the_next_is_answered(served, images):
    url, good = served["url"], {"instances": [b64(images[0])]}
    for name, path, body, status, message in bad_requests(images):
        raw = body if isinstance(body, bytes) else None
        got, answer, headers = http(url, path, None if raw is not None else body, raw=raw, method="POST")
        assert (got, name) == (status, name) and message in answer["error"], (name, answer)
        assert headers["Content-Type"] == "application/json" and list(answer) == ["error"], name
        got, answer, _ = http(url, f"/v1/models/{NAME}:predict", good)
        assert got == 200 and len(answer["predictions"]) == 1, name
    assert http(url, "/v1/models/nope")[:2] == (404, {"error": "Could not find any versions of model nope"})
    assert http(url, f"/v1/models/{NAME}/versions/99")[:2] == (404, {"error": f"Could not find version 99 of model {NAME}"})
    assert http(url, "/v1/models")[:2] == (400, {"error": "Missing model name in request."})


def test_head_answers_as_get_without_a_body(served):
    url = served["url"]
    for path in (f"/v1/models/{NAME}", f"/v1/models/{NAME}/metadata", "/v2/health/ready", "/"):
        status, body, headers = http(url, path)
        head_status, head_body, head_headers = http(url, path, method="HEAD")
        assert (head_status, head_body) == (status, "") and head_headers["Content-Length"] == headers["Content-Length"]
    assert http(url, "/v1/models/nope", method="HEAD")[:2] == (404, "")


def raw_request(url, data, wait=None):
    """What a socket gets back after sending `data` (then waiting `wait` seconds and closing): b"" when closed unanswered."""
    import socket

    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as connection:
        connection.sendall(data)
        if wait is not None:
            time.sleep(wait)
            return None
        chunks = []
        while chunk := connection.recv(65536):
            chunks.append(chunk)
        return b"".join(chunks)


def test_idle_and_slow_connections_time_out_and_a_disconnect_is_one_line(served, images, caplog):
    import logging

    url = served["url"]  # read_timeout_s=1
    assert raw_request(url, b"") == b""  # idle: closed
    assert raw_request(url, b"POST /v1/models/cxr:predict HTTP/1.1\r\nHost: x\r\n") == b""  # slow headers
    headers = b"POST /v1/models/cxr:predict HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n"
    answer = raw_request(url, headers + b'{"instances"')  # a slow body
    assert answer.startswith(b"HTTP/1.1 408 ") and b'{"error": "The request body did not arrive within 1 s' in answer
    caplog.set_level(logging.INFO, logger="cxrkeras.serving")
    raw_request(url, headers + b'{"instances"', wait=0.2)  # a client that goes away mid-body
    wait_for(lambda: any("went away" in r.getMessage() for r in caplog.records), seconds=10)
    time.sleep(0.3)
    assert [r.getMessage().split(" went away")[1] for r in caplog.records if "went away" in r.getMessage()] == [
        " before sending its whole body (POST /v1/models/cxr:predict)"
    ]
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]  # no traceback
    assert http(url, f"/v1/models/{NAME}:predict", {"instances": [b64(images[0])]})[0] == 200


def metric_samples(url):
    """{(name, labels as a sorted tuple): value} of the server's Prometheus page, parsed by prometheus_client's parser."""
    from prometheus_client.parser import text_string_to_metric_families

    status, text, headers = http(url, "/monitoring/prometheus/metrics")
    assert status == 200 and headers["Content-Type"].startswith("text/plain; version=")
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def test_prometheus_metrics_count_the_requests_made(served, images):
    url = served["url"]
    before = metric_samples(url)
    predict = {"instances": [b64(images[0]), b64(images[1])]}
    for _ in range(3):
        assert http(url, f"/v1/models/{NAME}:predict", predict)[0] == 200
    assert http(url, f"/v1/models/{NAME}:predict", {"signature_name": "nope", "instances": [b64(images[0])]})[0] == 400
    assert http(url, f"/v1/models/{NAME}:predict", {"instances": [{"b64": "***"}]})[0] == 400
    body = {"signature_name": "classify", "examples": [{"image": b64(images[0])}]}
    assert http(url, f"/v1/models/{NAME}/versions/1:classify", body)[0] == 200
    assert http(url, "/v1/models/nope:predict", predict)[0] == 404
    after = metric_samples(url)

    def added(name, **labels):
        key = (name, tuple(sorted(labels.items())))
        return after.get(key, 0) - before.get(key, 0)

    model = dict(model=NAME, version="1")
    assert added("cxrkeras_requests_total", **model, signature="serving_default", api="predict", code="200") == 3
    assert added("cxrkeras_requests_total", **model, signature="", api="predict", code="400") == 1  # not a signature of ours
    assert added("cxrkeras_requests_total", **model, signature="serving_default", api="predict", code="400") == 1
    assert added("cxrkeras_requests_total", **model, signature="classify", api="classify", code="200") == 1
    assert added("cxrkeras_requests_total", model="", version="", signature="", api="predict", code="404") == 1
    assert added("cxrkeras_request_seconds_count", model=NAME, api="predict") == 5
    assert added("cxrkeras_batch_size_count", **model, signature="serving_default") == 3  # one model call each
    assert added("cxrkeras_batch_size_sum", **model, signature="serving_default") == 6
    assert added("cxrkeras_model_seconds_count", **model, signature="classify") == 1
    assert after[("cxrkeras_queue_instances", (("model", NAME), ("signature", "serving_default"), ("version", "1")))] == 0
    assert after[("cxrkeras_model_versions", (("model", NAME), ("state", "AVAILABLE"), ("version", "1")))] == 1
    assert after[("cxrkeras_ready", (("model", NAME),))] == 1


def test_readiness_is_false_once_sigterm_comes(served):
    url, model_server = served["url"], served["app"].state.server
    assert http(url, "/v2/health/ready")[:2] == (200, {"ready": True})
    unstarted = serving.uvicorn_server(served["app"])  # what `cxrkeras serve` runs; its signal handler
    unstarted.handle_exit(signal.SIGTERM, None)
    try:
        assert unstarted.should_exit and model_server.stopping
        assert http(url, "/v2/health/ready")[:2] == (503, {"error": f"Model {NAME} is shutting down."})
        assert http(url, f"/v1/models/{NAME}")[0] == 200  # requests are still answered meanwhile
    finally:
        model_server.stopping = False


def test_a_bad_image_fails_only_its_own_request_when_batched(served, images):
    url = served["url"]
    truncated = images[2][: len(images[2]) // 2]
    bodies = [{"instances": [b64(truncated if i == 3 else images[i % 4])]} for i in range(8)]
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda b: http(url, f"/v1/models/{NAME}:predict", b)[:2], bodies))
    assert [status for status, _ in answers] == [200, 200, 200, 400, 200, 200, 200, 200]
    assert "Invalid JPEG data" in answers[3][1]["error"]


# ---------------------------------------------------------------- batching, versions, the op check


def test_concurrent_requests_share_a_model_call(served, images):
    url, version = served["url"], served["app"].state.server.versions[1]
    sizes, call = [], version.call

    def recording(name, inputs):
        sizes.append(len(inputs["images"]))
        return call(name, inputs)

    version.call = recording
    try:
        with ThreadPoolExecutor(6) as pool:
            answers = list(pool.map(lambda c: http(url, f"/v1/models/{NAME}:predict", {"instances": [b64(c)]})[1], images * 3))
    finally:
        del version.call
    assert sum(sizes) == 12 and max(sizes) > 1 and max(sizes) <= SETTINGS["max_batch_size"]
    expected = own(served, "serving_default", images)["probabilities"]
    for i, answer in enumerate(answers):
        np.testing.assert_allclose(answer["predictions"][0]["probabilities"], expected[i % 4], atol=1e-5)


def test_a_failing_model_call_is_a_500_and_the_server_goes_on(served, images):
    url, version = served["url"], served["app"].state.server.versions[1]

    def broken(name, inputs):
        raise RuntimeError("out of luck")

    version.call = broken
    try:
        answer = http(url, f"/v1/models/{NAME}:predict", {"instances": [b64(images[0])]})[:2]
    finally:
        del version.call
    assert answer == (500, {"error": "RuntimeError: out of luck"})
    assert http(url, f"/v1/models/{NAME}:predict", {"instances": [b64(images[0])]})[0] == 200


def test_batcher_queue_limit_and_isolation():
    import tensorflow as tf

    settings = serving.Settings(max_batch_size=4, batch_timeout_ms=50, max_enqueued_batches=1)
    calls = []

    def run(batch):
        calls.append(batch["x"].tolist())
        if -1 in batch["x"]:
            raise tf.errors.InvalidArgumentError(None, None, "a bad instance")
        return {"y": batch["x"] * 2}

    async def scenario():
        batcher = batching.Batcher(run, settings, ThreadPoolExecutor(1))
        tasks = [asyncio.create_task(batcher.submit({"x": np.array([v])})) for v in (1, -1, 3)]
        await asyncio.sleep(0)
        with pytest.raises(ApiError) as full:
            await batcher.submit({"x": np.array([5, 6])})  # 3 waiting + 2 > 4 x 1
        batcher.close()  # what is queued is still answered; later calls are not
        with pytest.raises(ApiError) as closed:
            await batcher.submit({"x": np.array([7])})
        return full.value, closed.value, await asyncio.gather(*tasks, return_exceptions=True)

    full, closed, results = asyncio.run(scenario())
    assert full.status == 429 and "queue to which this task was submitted is full" in full.message
    assert closed.status == 503
    assert calls[0] == [1, -1, 3]  # one call for the three, then one each
    assert results[0] == {"y": [2]} and results[2] == {"y": [6]}
    assert isinstance(results[1], ApiError) and (results[1].status, results[1].message) == (400, "a bad instance")


def test_batcher_waits_for_every_client_coming_back():
    settings = serving.Settings(max_batch_size=8, batch_timeout_ms=30_000)  # a wait for the timeout fails the test
    calls = []

    def run(batch):
        calls.append(len(batch["x"]))
        return {"y": batch["x"]}

    async def client(batcher, i, requests):
        """Sends one instance, waits for its answer, then 4*i ms (its own parsing) before the next."""
        for _ in range(requests):
            await batcher.submit({"x": np.array([i])})
            await asyncio.sleep(0.004 * i)

    async def scenario():
        batcher = batching.Batcher(run, settings, ThreadPoolExecutor(1))
        await asyncio.wait_for(client(batcher, 0, 3), 10)  # a lone client waits for no one
        clients = asyncio.gather(*(client(batcher, i, 6) for i in range(4)))  # coming back 0 to 12 ms apart
        await asyncio.wait_for(clients, 20)
        batcher.close()

    asyncio.run(scenario())
    assert calls[:3] == [1, 1, 1] and sum(calls) == 3 + 4 * 6
    assert calls[-4:] == [4, 4, 4, 4]  # every client in each call once the batcher has seen them


def test_new_versions_are_picked_up_and_crafted_ones_refused(served, images):
    url, base = served["url"], served["base"]
    staging = base / ".export-2-1234"
    shutil.copytree(base / "1", staging)  # as export does: a staging folder, then a rename
    time.sleep(3 * SETTINGS["poll_seconds"])
    assert [s["version"] for s in http(url, f"/v1/models/{NAME}")[1]["model_version_status"]] == ["1"]
    os.rename(staging, base / "2")
    wait_for(lambda: http(url, f"/v1/models/{NAME}/versions/2")[0] == 200 and http(url, f"/v1/models/{NAME}/metadata")[1]["model_spec"]["version"] == "2")
    statuses = http(url, f"/v1/models/{NAME}")[1]["model_version_status"]
    assert [(s["version"], s["state"]) for s in statuses] == [("2", "AVAILABLE"), ("1", "AVAILABLE")]
    assert http(url, f"/v1/models/{NAME}/versions/1:predict", {"instances": [b64(images[0])]})[0] == 200

    marker = base.parent / "written"
    write_crafted_savedmodel(base / ".staging-3", marker)
    os.rename(base / ".staging-3", base / "3")
    wait_for(lambda: "END" in str(http(url, f"/v1/models/{NAME}/versions/3")[1]))
    status = http(url, f"/v1/models/{NAME}/versions/3")[1]["model_version_status"][0]["status"]
    assert status["error_code"] == "FAILED_PRECONDITION" and "WriteFile" in status["error_message"]
    assert http(url, f"/v1/models/{NAME}/metadata")[1]["model_spec"]["version"] == "2"  # still the default
    assert http(url, f"/v1/models/{NAME}/versions/3:predict", {"instances": [b64(images[0])]})[0] == 404
    assert not marker.exists()


def test_a_failed_version_is_tried_again_when_its_folder_changes_and_forgotten_when_it_goes(served, images):
    url, base = served["url"], served["base"]
    version = base / "7"
    version.mkdir()
    shutil.copy(base / "1" / "saved_model.pb", version)  # a copy not finished: no variables yet
    wait_for(lambda: "END" in str(http(url, f"/v1/models/{NAME}/versions/7")[1]))
    time.sleep(3 * SETTINGS["poll_seconds"])
    assert http(url, f"/v1/models/{NAME}/versions/7")[1]["model_version_status"][0]["state"] == "END"  # not reloaded in a loop
    for item in os.listdir(base / "1"):
        if item != "saved_model.pb":
            (shutil.copytree if (base / "1" / item).is_dir() else shutil.copy)(base / "1" / item, version / item)
    wait_for(lambda: http(url, f"/v1/models/{NAME}/versions/7:predict", {"instances": [b64(images[0])]})[0] == 200)
    shutil.rmtree(version)
    shutil.rmtree(base / "3", ignore_errors=True)  # the crafted version: failed, then removed
    wait_for(lambda: [s["version"] for s in http(url, f"/v1/models/{NAME}")[1]["model_version_status"]] == ["2", "1"])


def test_each_version_graph_is_read_and_checked_once(exported_cascade, tmp_path, monkeypatch):
    """`served_versions` reads and checks each graph, the server loads from that proto; a new version is read once."""
    from cxrkeras import savedmodel

    base = tmp_path / "base"
    shutil.copytree(exported_cascade["base"], base)
    read, real = [], savedmodel.read_proto
    monkeypatch.setattr(savedmodel, "read_proto", lambda path: read.append(os.path.basename(path)) or real(path))
    found = serving.served_versions(base)
    assert list(found) == [1] and read == ["1"]
    url, server, thread = start(serving.create_app(base, NAME, serving.Settings(poll_seconds=0.2), checked=found))
    try:
        wait_for(lambda: http(url, "/v2/health/ready")[0] == 200)
        shutil.copytree(base / "1", base / ".staging-2")
        os.rename(base / ".staging-2", base / "2")
        wait_for(lambda: [s["state"] for s in http(url, f"/v1/models/{NAME}")[1]["model_version_status"]] == ["AVAILABLE"] * 2)
    finally:
        server.should_exit = True
        thread.join(30)
    assert read == ["1", "2"]


def test_serve_refuses_a_crafted_savedmodel(tmp_path):
    marker = tmp_path / "written"
    write_crafted_savedmodel(tmp_path / "base" / "1", marker)
    result = CliRunner().invoke(main, ["serve", str(tmp_path / "base")])
    assert result.exit_code == 1 and "WriteFile" in result.output and "--trust-model" in result.output
    assert not marker.exists()
    result = CliRunner().invoke(main, ["serve", str(tmp_path / "base" / "1")])
    assert result.exit_code == 1 and "a SavedModel version folder; pass its parent" in result.output
    result = CliRunner().invoke(main, ["serve", str(tmp_path)])
    assert result.exit_code == 1 and "no numbered SavedModel versions" in result.output


# ---------------------------------------------------------------- the page, the client, CORS, imports


def test_page_and_its_model(served):
    url = served["url"]
    status, html, _ = http(url, "/")
    assert status == 200 and '<input id="files"' in html and "multiple" in html and "/ui/app.js" in html
    assert http(url, "/ui/app.js")[0] == 200 and http(url, "/ui/style.css")[0] == 200
    model = http(url, "/ui/model.json")[1]
    assert model["name"] == NAME and model["ready"] and model["explain"]
    assert model["class_names"] == ["normal", "non-covid", "covid"]
    assert model["thresholds"] == {"infected": 0.5, "covid": 0.5} and model["version"] == max(model["versions"])


def test_predict_command_as_a_client(served, images, tmp_path):
    paths = []
    for i, contents in enumerate(images[:3]):
        suffix = "jpg" if contents.startswith(b"\xff\xd8") else "png"
        paths.append(tmp_path / f"image{i}.{suffix}")
        paths[-1].write_bytes(contents)
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(50))
    args = ["predict", "--server", served["url"], NAME, *map(str, paths), str(tmp_path / "broken.png"), "--json"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 1  # the broken file
    answers = json.loads(result.output)
    expected = own(served, "serving_default", images[:3])
    for i, answer in enumerate(answers[:3]):
        assert answer["class_id"] == expected["class_id"][i]
        np.testing.assert_allclose(list(answer["probabilities"].values()), expected["probabilities"][i], atol=1e-6)
        assert list(answer["probabilities"]) == ["normal", "non-covid", "covid"]
    assert set(answers[3]) == {"path", "error"}
    result = CliRunner().invoke(main, ["predict", "--server", served["url"], "nope", str(paths[0])])
    assert result.exit_code == 1 and "HTTP 404: Could not find any versions of model nope" in result.output


def test_cors_only_when_asked(tmp_path):
    url, server, thread = start(serving.create_app(tmp_path, NAME, serving.Settings(cors=True)))
    try:
        status, _, headers = http(url, "/v2/health/live", headers={"Origin": "http://example.org"})
        assert status == 200 and headers["Access-Control-Allow-Origin"] == "*"
        assert http(url, "/v2/health/ready")[0] == 503  # nothing to serve yet
        assert http(url, f"/v1/models/{NAME}:predict", {"instances": []})[0] == 503
    finally:
        server.should_exit = True
        thread.join(10)
    host = next(p for p in main.commands["serve"].params if p.name == "host")
    assert host.default == "127.0.0.1"


def test_serving_needs_no_keras():
    code = (
        "import sys, cxrkeras.serving, cxrkeras.predict, cxrkeras.savedmodel; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'keras' or m.startswith('cxrkeras.models') "
        "or m == 'cxrkeras.data'))"  # serving reads images through cxrkeras.images, never training's data.py
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"


# ---------------------------------------------------------------- SIGTERM


def test_sigterm_answers_the_request_in_flight(exported_cascade, images):
    command = [sys.executable, "-m", "cxrkeras.cli", "serve", str(exported_cascade["base"]), "--port", "0"]
    # a free port chosen here, as uvicorn can't report port 0 from a subprocess
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    command[-1] = str(port)
    command += ["--batch-timeout-ms", "1500"]  # after a batch of 2, one image waits 1.5 s for a second: in flight at SIGTERM
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: process.poll() is None and _ready(url), seconds=120)
        assert http(url, f"/v1/models/{NAME}:predict", {"instances": [b64(images[0])] * 2})[0] == 200
        with ThreadPoolExecutor(1) as pool:
            request = pool.submit(http, url, f"/v1/models/{NAME}:predict", {"instances": [b64(images[0])]})
            time.sleep(0.5)
            assert not request.done()
            process.send_signal(signal.SIGTERM)
            status, answer, _ = request.result(timeout=60)
        assert status == 200 and len(answer["predictions"]) == 1
        output, _ = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 0, output
    assert f"serving {NAME} (versions 1)" in output and output.rstrip().endswith("stopped")


def _ready(url):
    try:
        return http(url, "/v2/health/ready")[0] == 200
    except OSError:
        return False


def test_json_mapping_as_tensorflow_serving():
    """Cases from TensorFlow Serving's json_tensor_test.cc, on tensors of other signatures than ours."""

    float_input = {"x": "DT_FLOAT"}
    _, tensors, form = protocol.predict_request({"instances": [[1, 2], [3, 4.5]]}, lambda name: float_input)
    assert form == "row" and tensors["x"].dtype == np.float32 and tensors["x"].tolist() == [[1, 2], [3, 4.5]]
    for body, message in [
        ({"instances": [[1, 2], [3]]}, "Expecting shape [2] but got: [1]"),
        ({"instances": [[1, [2]]]}, "Encountered list at unexpected level: 1 expected < 1"),
        ({"instances": [["a"]]}, 'JSON Value: "a" Type: String is not of expected type: float'),
        ({"instances": [True]}, "is not of expected type: float"),
        ({"instances": "x"}, "Expecting 'instances' to be an list/array"),
        ({"instances": []}, "No values in 'instances' array"),
        ({"signature_name": 5, "instances": [1]}, "'signature_name' key must be a string value."),
    ]:
        with pytest.raises(ApiError, match=re.escape(message)):
            protocol.predict_request(body, lambda name: float_input)
    two = {"a": "DT_INT64", "b": "DT_STRING"}
    with pytest.raises(ApiError, match="instances is a plain list, but expecting list of objects"):
        protocol.predict_request({"instances": [1]}, lambda name: two)
    with pytest.raises(ApiError, match="Missing named input: b in 'inputs' object."):
        protocol.predict_request({"inputs": {"a": [1]}}, lambda name: two)
    _, tensors, _ = protocol.predict_request({"instances": [{"a": 1, "b": {"b64": "aGVsbG8="}}]}, lambda name: two)
    assert tensors["a"].tolist() == [1] and tensors["b"].tolist() == [b"hello"]
    # answers: one output -> plain values; several -> objects; `_bytes` outputs as {"b64"}
    y = {"y": np.array([[2.5, 3.0], [3.5, 4.0]], np.float32)}
    assert protocol.predict_response(y, "row") == {"predictions": [[2.5, 3.0], [3.5, 4.0]]}
    assert protocol.predict_response(y, "columnar") == {"outputs": [[2.5, 3.0], [3.5, 4.0]]}
    named = {"str_tensor_bytes": protocol.object_array([b"hello", b"world"]), "n": np.array([1, 2])}
    assert protocol.predict_response(named, "row") == {
        "predictions": [{"str_tensor_bytes": {"b64": "aGVsbG8="}, "n": 1}, {"str_tensor_bytes": {"b64": "d29ybGQ="}, "n": 2}]
    }


def test_a_version_warms_up_on_one_image_and_on_a_full_batch(exported_cascade, monkeypatch):
    """The first full batch under load must not pay for setting up its kernels; Grad-CAM is warmed on one image."""
    from cxrkeras.serving.servable import Version

    version = Version(1, str(exported_cascade["version"]), serving.Settings(**SETTINGS), ThreadPoolExecutor(1))
    calls = []
    monkeypatch.setattr(version, "call", lambda name, inputs: calls.append((name, len(next(iter(inputs.values()))))))
    version.warm_up()
    assert sorted(calls) == [("classify", 1), ("classify", 8), ("explain", 1), ("serving_default", 1),
                             ("serving_default", 8)]

