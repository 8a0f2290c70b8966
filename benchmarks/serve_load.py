"""`cxrkeras serve` under load over loopback, beside the same SavedModel called in-process, in one run.

The model: the shipped cascade's SavedModel (`saved_models/cascade/1`, as
`cxrkeras export` wrote it), copied to a temporary base folder and served by
`cxrkeras serve` with its defaults in a subprocess. The clients are threads
of this process, each on its own keep-alive connection, each sending its
next request when the last is answered; every request carries the same
150x150 JPEG of a synthetic X-ray as {"b64": ...}.

Settings (clients x images per request): 1x1, 4x1, 4x32, each for
--rounds rounds of --seconds, each round after --in-process-seconds of the
SavedModel called here on batches of 64: a setting's ratio is its served
images/s over the in-process rate of its own rounds, so both sides share the
load of a shared machine and the ratio means something even when the
absolute figures drift. The table gives images/s, p50 and p99 latency,
errors, the mean batch and model call the server ran (from its Prometheus
metrics), the in-process rate and the ratio; the targets of issue 23 are
4x1 >= 85% of it with p99 < 30 ms and 4x32 >= 95%.

    python benchmarks/serve_load.py
    python benchmarks/serve_load.py --rounds 2 --json
"""

import argparse
import base64
import http.client
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHIPPED = os.path.join(ROOT, "saved_models", "cascade", "1")
SETTINGS = ((1, 1), (4, 1), (4, 32))  # clients, images per request
TARGETS = {(4, 1): {"ratio": 0.85, "p99_ms": 30}, (4, 32): {"ratio": 0.95}}


def xray_jpeg():
    from PIL import Image

    from cxrkeras.synth import synth_image

    buffer = io.BytesIO()
    Image.fromarray(synth_image("covid", np.random.default_rng(0)), "L").resize((150, 150)).save(buffer, "JPEG")
    return buffer.getvalue()


def in_process(signature, batch, seconds):
    """(images, seconds) of back-to-back calls on `batch` for about `seconds`."""
    images, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        signature(images=batch)["probabilities"].numpy()
        images += int(batch.shape[0])
    return images, time.perf_counter() - start


def post(connection, body, images_per_request):
    """One POST on a keep-alive connection; True when answered 200 with a prediction per image."""
    connection.request("POST", "/v1/models/cxr:predict", body, {"Content-Type": "application/json"})
    answer = connection.getresponse()
    text = answer.read()
    return answer.status == 200 and text.count(b'"class_id"') == images_per_request


def load(port, body, images_per_request, clients, seconds):
    """(latencies, seconds, errors) of `clients` threads posting `body` back to back for `seconds`."""
    lock, latencies, errors = threading.Lock(), [], [0]
    stop = time.perf_counter() + seconds

    def client():
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        mine, failed = [], 0
        while time.perf_counter() < stop:
            t = time.perf_counter()
            try:
                ok = post(connection, body, images_per_request)
            except OSError:
                connection.close()
                connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
                ok = False
            mine.append(time.perf_counter() - t)
            failed += not ok
        connection.close()
        with lock:
            latencies.extend(mine)
            errors[0] += failed

    threads = [threading.Thread(target=client) for _ in range(clients)]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return latencies, time.perf_counter() - start, errors[0]


def batch_sizes(port):
    """(model calls, instances, model seconds) so far, from the server's cxrkeras_batch_size and _model_seconds."""
    from prometheus_client.parser import text_string_to_metric_families

    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    connection.request("GET", "/monitoring/prometheus/metrics")
    text = connection.getresponse().read().decode()
    connection.close()
    calls = instances = seconds = 0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if family.name == "cxrkeras_batch_size":
                calls += sample.value if sample.name.endswith("_count") else 0
                instances += sample.value if sample.name.endswith("_sum") else 0
            elif family.name == "cxrkeras_model_seconds" and sample.name.endswith("_sum"):
                seconds += sample.value
    return calls, instances, seconds


def start_server(base, port, log, options=()):
    command = [sys.executable, "-m", "cxrkeras.cli", "serve", base, "--port", str(port), *options]
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.time() + 300
    while time.time() < deadline:
        assert process.poll() is None, "cxrkeras serve stopped; see its log"
        try:
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            connection.request("GET", "/v2/health/ready")
            if connection.getresponse().status == 200:
                return process
        except OSError:
            pass
        time.sleep(0.5)
    process.kill()
    raise RuntimeError("cxrkeras serve did not become ready in 300 s")


def free_port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(args):
    import tensorflow as tf

    jpeg = xray_jpeg()
    instance = {"b64": base64.b64encode(jpeg).decode()}
    batch = tf.constant([jpeg] * 64)
    rows = []
    with tempfile.TemporaryDirectory() as root:
        base = os.path.join(root, "cascade")
        shutil.copytree(args.model, os.path.join(base, "1"))
        signature = tf.saved_model.load(os.path.join(base, "1")).signatures["serving_default"]
        in_process(signature, batch, 1)  # warm-up
        port = free_port()
        with open(os.path.join(root, "serve.log"), "w") as log:
            server = start_server(base, port, log, args.serve_options.split())
            try:
                load(port, json.dumps({"instances": [instance]}).encode(), 1, 1, 2)  # warm the connection path
                for clients, per_request in SETTINGS:
                    body = json.dumps({"instances": [instance] * per_request}).encode()
                    local, served, latencies, errors = np.zeros(2), np.zeros(2), [], 0
                    before = batch_sizes(port)
                    for _ in range(args.rounds):
                        local += in_process(signature, batch, args.in_process_seconds)
                        times, seconds, failed = load(port, body, per_request, clients, args.seconds)
                        served += (len(times) * per_request, seconds)
                        latencies, errors = latencies + times, errors + failed
                    calls, instances, model_seconds = np.subtract(batch_sizes(port), before)
                    latencies = np.asarray(latencies) * 1000
                    rows.append({
                        "clients": clients,
                        "images_per_request": per_request,
                        "requests": len(latencies),
                        "images_per_s": served[0] / served[1],
                        "in_process_images_per_s": local[0] / local[1],
                        "p50_ms": float(np.percentile(latencies, 50)),
                        "p99_ms": float(np.percentile(latencies, 99)),
                        "errors": errors,
                        "mean_batch": instances / max(1, calls),
                        "model_call_ms": 1000 * model_seconds / max(1, calls),
                    })
            finally:
                server.terminate()
                server.wait(60)
    for row in rows:
        row["ratio"] = row["images_per_s"] / row["in_process_images_per_s"]
        target = TARGETS.get((row["clients"], row["images_per_request"]))
        row["target_met"] = None if target is None else bool(
            row["ratio"] >= target["ratio"] and row["p99_ms"] < target.get("p99_ms", float("inf")) and not row["errors"]
        )
    return {"model": args.model, "settings": rows}


def print_table(results):
    print(f"{results['model']}, served by `cxrkeras serve` and called in-process (serving_default, batches of 64)")
    print(f"{'clients x images':<18}{'images/s':>10}{'p50 ms':>9}{'p99 ms':>9}{'errors':>8}{'batch':>7}{'call ms':>9}"
          f"{'in-process':>12}{'ratio':>8}  target")
    for row in results["settings"]:
        met = {None: "", True: "met", False: "MISSED"}[row["target_met"]]
        print(
            f"{row['clients']} x {row['images_per_request']:<14}{row['images_per_s']:>10.1f}{row['p50_ms']:>9.1f}"
            f"{row['p99_ms']:>9.1f}{row['errors']:>8}{row['mean_batch']:>7.1f}{row['model_call_ms']:>9.1f}"
            f"{row['in_process_images_per_s']:>12.1f}{row['ratio']:>8.2f}  {met}"
        )
    print("batch, call ms: mean instances and milliseconds per model call in the server (its metrics); in-process: "
          "images/s of the rounds between this setting's; ratio: served images/s over it")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=SHIPPED, help="a SavedModel version folder [the shipped cascade's]")
    parser.add_argument("--rounds", type=int, default=5, help="rounds per setting")
    parser.add_argument("--seconds", type=float, default=6, help="load per round")
    parser.add_argument("--in-process-seconds", type=float, default=3, help="in-process calls before each round")
    parser.add_argument("--serve-options", default="", help='options of `cxrkeras serve`, e.g. "--batch-timeout-ms 5"')
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    results = run(args)
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        print_table(results)


if __name__ == "__main__":
    main()
