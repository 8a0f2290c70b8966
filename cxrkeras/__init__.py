"""cxrkeras: chest X-ray classification with Keras 3 (a cascade of two binary CNNs)."""

import os

# TensorFlow's C++ start-up chatter hides the tool's own output; users can still override it.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

__version__ = "0.1.0"
