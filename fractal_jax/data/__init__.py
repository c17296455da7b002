"""Input pipelines (see `pipeline`). TF only feeds data here: importing this package keeps
TF's logs quiet and hides every GPU from it, so that it never claims memory JAX needs."""
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# TF's oneDNN kernels only matter for its own math, not for this input pipeline; turning them off
# also silences the notice TF prints on import regardless of the log level.
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")

import tensorflow as tf  # noqa: E402  (after the log level is set)

try:
    tf.config.set_visible_devices([], "GPU")
except (RuntimeError, ValueError):  # TF already initialised its devices elsewhere.
    pass
