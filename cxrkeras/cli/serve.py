"""`cxrkeras serve`: the exported versions of a model over TensorFlow Serving's REST API."""

import click

from cxrkeras.serving.settings import HOST, PORT, Settings

DEFAULT = Settings()  # each limit's default


@click.command()
@click.argument("base_dir", metavar="BASE", type=click.Path(exists=True, file_okay=False))
@click.option("--model-name", default="cxr", show_default=True, help="The name in /v1/models/NAME.")
@click.option("--host", default=HOST, show_default=True, help="Address to bind (0.0.0.0: every interface).")
@click.option("--port", type=click.IntRange(0, 65535), default=PORT, show_default=True)
@click.option("--max-batch-size", type=click.IntRange(1), default=DEFAULT.max_batch_size, show_default=True, help="Instances per model call, and per request.")
@click.option("--batch-timeout-ms", type=click.FloatRange(0), default=DEFAULT.batch_timeout_ms, show_default=True, help="How long a batch waits at most for as many instances as were waiting at once during the last one.")
@click.option("--max-enqueued-batches", type=click.IntRange(1), default=DEFAULT.max_enqueued_batches, show_default=True, help="Queue length (in batches) before answering 429.")
@click.option("--max-body-mb", type=click.FloatRange(0, min_open=True), default=DEFAULT.max_body_mb, show_default=True, help="Larger request bodies get 413.")
@click.option("--max-image-pixels", type=click.IntRange(1), default=DEFAULT.max_image_pixels, show_default=True, help="Images declaring more get 400.")
@click.option("--read-timeout-s", type=click.FloatRange(0, min_open=True), default=DEFAULT.read_timeout_s, show_default=True, help="A request's headers, then its body, must each arrive within it (else the connection closes, or 408).")
@click.option("--poll-seconds", type=click.FloatRange(0.05), default=DEFAULT.poll_seconds, show_default=True, help="How often BASE is checked for new versions.")
@click.option("--cors", is_flag=True, help="Allow browser pages of any origin to call the API.")
@click.option("--trust-model", is_flag=True, help="Serve SavedModels whose graphs use ops outside the allow-list.")
def serve(base_dir, model_name, host, port, cors, trust_model, **limits):
    """Serve the exported versions under BASE over TensorFlow Serving's REST API, with a page to try them.

    BASE holds numbered SavedModel versions (`cxrkeras export MODEL --out
    BASE`); every one is loaded, the highest answers by default, and a new
    version folder is picked up while serving. Endpoints: GET
    /v1/models/NAME[/versions/V][/metadata], POST
    /v1/models/NAME[/versions/V]:predict and :classify (TensorFlow Serving's
    requests and answers), /v2/health/live, /v2/health/ready (after warm-up,
    until SIGTERM), /monitoring/prometheus/metrics (Prometheus) and GET / (the
    page). Concurrent requests are batched into one model call.
    SIGTERM or Ctrl-C stops it after answering the requests in flight.
    """
    from cxrkeras import serving
    from cxrkeras.savedmodel import SavedModelError

    try:
        found = serving.served_versions(base_dir, trust=trust_model)
    except SavedModelError as e:
        raise click.ClickException(str(e))
    app = serving.create_app(base_dir, model_name, Settings(cors=cors, trust_model=trust_model, **limits), checked=found)
    click.echo(
        f"serving {model_name} (versions {', '.join(map(str, found))}) from {base_dir} at http://{host}:{port}/ "
        f"(REST: /v1/models/{model_name}); ready after warm-up"
    )
    if not serving.run(app, host, port):
        raise click.ClickException(f"could not serve on {host}:{port} (see above).")
    click.echo("stopped")
