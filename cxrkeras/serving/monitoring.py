"""What an operator of `cxrkeras serve` scrapes: Prometheus metrics at TensorFlow Serving's path.

`prometheus_client` writes the exposition format; each app has its own
registry (several servers can live in one process, as in the tests). Label
values come from the server's own names only (a request for an unknown
model or version counts under model="" or version=""), so a client cannot
grow the number of series.

    cxrkeras_requests_total{model, version, signature, api, code}   API requests answered
    cxrkeras_request_seconds{model, api}                             request latency (body read to answer)
    cxrkeras_model_seconds{model, version, signature}                one model call (a batch)
    cxrkeras_batch_size{model, version, signature}                   instances per model call
    cxrkeras_queue_instances{model, version, signature}              instances waiting or running
    cxrkeras_model_versions{model, version, state}                   1 per version, in its state
    cxrkeras_ready{model}                                            1 when /v2/health/ready answers 200
"""

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily

PATH = "/monitoring/prometheus/metrics"  # TensorFlow Serving's --monitoring_config_file default path
CONTENT_TYPE = CONTENT_TYPE_LATEST
SECONDS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
BATCH_SIZES = (1, 2, 3, 4, 8, 16, 32, 64, 128, 256, 512)


class Metrics:
    """The registry of one server: counters and histograms fed by it, gauges read from it at scrape time."""

    def __init__(self, server):
        self.registry = CollectorRegistry()
        version = ["model", "version", "signature"]
        self.requests = Counter(
            "cxrkeras_requests", "API requests answered, by status code.", [*version, "api", "code"],
            registry=self.registry,
        )
        self.request_seconds = Histogram(
            "cxrkeras_request_seconds", "API request latency: from routing to the answer.", ["model", "api"],
            buckets=SECONDS, registry=self.registry,
        )
        self.model_seconds = Histogram(
            "cxrkeras_model_seconds", "Latency of one model call (a batch).", version, buckets=SECONDS,
            registry=self.registry,
        )
        self.batch_size = Histogram(
            "cxrkeras_batch_size", "Instances per model call.", version, buckets=BATCH_SIZES, registry=self.registry,
        )
        self.registry.register(ServerState(server))

    def request(self, model, version, signature, api, code, seconds):
        self.requests.labels(model, version, signature, api, str(code)).inc()
        self.request_seconds.labels(model, api).observe(seconds)

    def batch(self, model, version, signature, size, seconds):
        self.model_seconds.labels(model, version, signature).observe(seconds)
        self.batch_size.labels(model, version, signature).observe(size)

    def text(self):
        return generate_latest(self.registry)


class ServerState:
    """A collector of a ModelServer's state when scraped: queue depth, versions and their state, readiness."""

    def __init__(self, server):
        self.server = server

    def collect(self):
        server = self.server
        queue = GaugeMetricFamily(
            "cxrkeras_queue_instances", "Instances submitted to a signature's batcher and not yet answered.",
            labels=["model", "version", "signature"],
        )
        for number, version in sorted(server.versions.items()):
            for signature, batcher in sorted(version.batchers.items()):
                queue.add_metric([server.name, str(number), signature], batcher.pending)
        versions = GaugeMetricFamily(
            "cxrkeras_model_versions", "1 for each version in its state (AVAILABLE, LOADING, END).",
            labels=["model", "version", "state"],
        )
        for number, state in sorted(server.states().items()):
            versions.add_metric([server.name, str(number), state[0]], 1)
        ready = GaugeMetricFamily(
            "cxrkeras_ready", "1 when the server answers /v2/health/ready with 200.", labels=["model"]
        )
        ready.add_metric([server.name], int(server.readiness() is None))
        return [queue, versions, ready]
