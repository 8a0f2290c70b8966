"""`fit --distribute multiworker` on one machine: training images/s on 1 and 2 processes, and the all-reduce's time.

JAX backend, CPU, the study's classifiers on synthetic in-memory images, a
global batch of 64 (each of N processes feeds 64 / N). The processes join on
localhost exactly as `cxrkeras fit --distribute multiworker` joins them
(`cxrkeras.distributed.initialize`: Gloo collectives). "all-reduce" is the
time of one all-reduce of a float32 vector the size of the model's trainable
weights (what a step's gradients cost to combine), timed alone, median of
--repeats. On a 2-core host two processes share the cores: expect no speed-up;
the point is that it runs and what the all-reduce costs.

    python benchmarks/multiworker.py                  # infected and covid, 1 and 2 processes
    python benchmarks/multiworker.py --steps 5 --json
"""

import argparse
import json
import os
import socket
import subprocess
import sys
import time

GLOBAL_BATCH = 64


def worker(task, processes, index, port, steps, warmup, repeats):
    """One process: join, train `warmup` + `steps` steps, time the all-reduce; print a JSON line (process 0)."""
    import jax
    import keras
    import numpy as np
    import tensorflow as tf

    from cxrkeras import distributed
    from cxrkeras.config import study_model_config, study_train_config
    from cxrkeras.models import build_model
    from cxrkeras.training import compile_model

    distributed.initialize(distributed.Cluster(f"127.0.0.1:{port}", processes, index))
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(index)
    share = GLOBAL_BATCH // processes
    x = rng.uniform(0, 1, (share, 150, 150, 1)).astype("float32")
    y = rng.integers(0, 2, (share, 1)).astype("float32")
    model = build_model(study_model_config(task))
    compile_model(model, study_train_config(task), task)
    times = []

    class Clock(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            keras.ops.convert_to_numpy(self.model.optimizer.iterations)  # JAX dispatches steps asynchronously
            times.append(time.perf_counter())

    model.fit(tf.data.Dataset.from_tensors((x, y)).repeat(), steps_per_epoch=warmup + steps, epochs=1, verbose=0,
              callbacks=[Clock()])
    images_per_second = steps * GLOBAL_BATCH / (times[-1] - times[warmup - 1])

    n = sum(int(np.prod(v.shape)) for v in model.trainable_variables)
    mesh = jax.sharding.Mesh(np.array(jax.devices()), ("p",))
    rows = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("p"))
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    grads = jax.make_array_from_process_local_data(rows, np.ones((jax.local_device_count(), n), "float32"))
    all_reduce = jax.jit(lambda g: g.sum(0), out_shardings=replicated)
    all_reduce(grads).block_until_ready()  # compile
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        all_reduce(grads).block_until_ready()
        seconds.append(time.perf_counter() - start)
    if index == 0:
        print(json.dumps({"task": task, "processes": processes, "images_per_second": round(images_per_second, 1),
                          "all_reduce_ms": round(1000 * sorted(seconds)[len(seconds) // 2], 2),
                          "weights": n}), flush=True)


def run(task, processes, steps, warmup, repeats):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "KERAS_BACKEND": "jax", "JAX_PLATFORMS": "cpu"}
    command = [sys.executable, __file__, "--worker", task, str(processes), "{i}", str(port), str(steps), str(warmup),
               str(repeats)]
    started = [subprocess.Popen([a.format(i=i) for a in command], env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.DEVNULL, text=True) for i in range(processes)]
    outputs = [p.communicate(timeout=1800)[0] for p in started]
    lines = [line for line in outputs[0].splitlines() if line.startswith("{")]
    if any(p.returncode for p in started) or not lines:
        raise SystemExit(f"{task} on {processes} process(es) failed: return codes {[p.returncode for p in started]}")
    return json.loads(lines[-1])


def main():
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        task, processes, index, port, steps, warmup, repeats = sys.argv[2:9]
        return worker(task, int(processes), int(index), int(port), int(steps), int(warmup), int(repeats))
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", nargs="+", default=["infected", "covid"])
    parser.add_argument("--processes", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--steps", type=int, default=10, help="timed training steps")
    parser.add_argument("--warmup", type=int, default=3, help="steps before the clock starts (compilation)")
    parser.add_argument("--repeats", type=int, default=20, help="all-reduces timed")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    rows = [run(task, n, args.steps, args.warmup, args.repeats) for task in args.tasks for n in args.processes]
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    print(f"{'task':10} {'processes':>9} {'images/s':>9} {'all-reduce ms':>14} {'weights':>9}")
    for r in rows:
        print(f"{r['task']:10} {r['processes']:9d} {r['images_per_second']:9.1f} {r['all_reduce_ms']:14.2f} "
              f"{r['weights']:9d}")


if __name__ == "__main__":
    main()
