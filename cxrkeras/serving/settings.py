"""The server's limits and behaviour: the `cxrkeras serve` options, importable without TensorFlow."""

import dataclasses

HOST = "127.0.0.1"  # where `serve` binds by default (0.0.0.0: every interface)
PORT = 8501  # TensorFlow Serving's REST port


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
