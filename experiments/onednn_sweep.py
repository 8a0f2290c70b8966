"""Search TensorFlow's CPU kernels for the ones that corrupt memory (issue 19's strided 1x1 filter gradient).

Each case (an op, its shape and stride) runs forward and backward (input and
filter gradients) in a fresh process with glibc's heap checks on
(libc_malloc_debug, MALLOC_CHECK_=3), so a heap overwrite aborts there and
then instead of later in an unrelated test. Prints one line a case that
failed and a summary; the cases cover every op kind the project's models
use (Conv2D by kernel and stride, MaxPooling2D, AveragePooling, Dense) over
small batches, channel counts and image sizes, where the reported fault lives.

    python experiments/onednn_sweep.py [--quick]
"""

import argparse
import itertools
import json
import os
import subprocess
import sys

CASE = r"""
import json, sys
import numpy as np, tensorflow as tf
for op, batch, size, channels, filters, kernel, stride, padding in json.loads(sys.argv[1]):
    x = tf.constant(np.random.default_rng(0).random((batch, size, size, channels)).astype("float32"))
    if op == "conv":
        w = tf.Variable(np.random.default_rng(1).random((kernel, kernel, channels, filters)).astype("float32"))
        f = lambda x: tf.nn.conv2d(x, w, stride, padding)
    elif op == "maxpool":
        w = None
        f = lambda x: tf.nn.max_pool2d(x, kernel, stride, padding)
    else:
        w = None
        f = lambda x: tf.nn.avg_pool2d(x, kernel, stride, padding)
    with tf.GradientTape(persistent=True) as tape:
        tape.watch(x)
        y = tf.reduce_sum(f(x) ** 2)
    grads = tape.gradient(y, [x] + ([w] if w is not None else []))
    float(sum(tf.reduce_sum(g) for g in grads))
print("ok", flush=True)
"""


BATCHES = (1, 2, 3)  # the reported fault needs a batch of one (Grad-CAM of one image, a last batch of one)


def cases(quick):
    sizes = (8, 16, 19, 38) if quick else (7, 8, 9, 15, 16, 17, 19, 31, 32, 37, 38, 75)
    channels = (1, 4, 8, 32) if quick else (1, 2, 3, 4, 8, 12, 16, 24, 32, 64)
    filters = (8, 32) if quick else (8, 16, 32, 64)
    for kernel, stride, padding in itertools.product((1, 3, 5), (1, 2), ("SAME", "VALID")):
        group = [("conv", b, s, c, f, kernel, stride, padding)
                 for b in BATCHES for s in sizes for c in channels for f in filters if s >= kernel]
        yield f"conv k{kernel} s{stride} {padding}", group
    for op, kernel, stride in (("maxpool", 2, 2), ("maxpool", 3, 2), ("avgpool", 2, 2)):
        yield f"{op} k{kernel} s{stride}", [(op, b, s, c, 0, kernel, stride, "SAME")
                                            for b in BATCHES for s in sizes for c in channels]


def run(group, env):
    done = subprocess.run([sys.executable, "-c", CASE, json.dumps(group)], env=env, capture_output=True, text=True)
    return done.returncode == 0 and done.stdout.strip().endswith("ok")


def failing(group, env):
    """The cases of a failed `group` that fail alone, found by halving (a process a half)."""
    if len(group) == 1:
        return group
    halves = group[: len(group) // 2], group[len(group) // 2 :]
    return [case for half in halves if not run(half, env) for case in failing(half, env)]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer sizes and channel counts")
    args = parser.parse_args()
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", MALLOC_CHECK_="3")
    debug = "/lib/x86_64-linux-gnu/libc_malloc_debug.so.0"
    if os.path.exists(debug):
        env["LD_PRELOAD"] = debug
    failed = []
    for name, group in cases(args.quick):
        if run(group, env):
            print(f"{name}: {len(group)} cases pass", flush=True)
            continue
        bad = failing(group, env)
        failed += bad
        print(f"{name}: {len(bad)} of {len(group)} cases fail: {bad[:6]}{' ...' if len(bad) > 6 else ''}", flush=True)
    print(json.dumps({"failed": len(failed), "cases": failed}))


if __name__ == "__main__":
    main()
