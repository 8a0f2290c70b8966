"""One run across processes: `fit --distribute multiworker` on JAX's distributed runtime.

Keras 3's distribution API on the JAX backend trains one model over the
devices of N processes (machines): every process builds the same model from
the same seed, reads the same files in the same shuffled order, and feeds its
own slice of each global batch (`batch_slice`); JAX all-reduces the gradients
(Gloo collectives on CPU, NCCL on GPU), so the weights stay equal everywhere
and equal a one-process run on the same global batches.

Process 0 (the chief) alone writes the run directory. The others train into
a scratch copy of it (`process_run_dir`: the chief's bookkeeping files,
broadcast at the start) that is removed at the end, so every process takes
the same decisions (resume point, errors) without a shared file system.

Not offered under TensorFlow (MULTIWORKER_UNDER_TENSORFLOW), and not for
`tune` (keras-tuner's distributed mode spreads trials over machines, a better
use of them than splitting each trial) nor `report` (a plan of many short
fits on one machine).
"""

import atexit
import base64
import json
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass

import keras

from cxrkeras.rundir import pending_model_path
from cxrkeras.runs import BACKUP_DIR, BACKUP_METADATA, CONFIG_FILE, HISTORY_FILE, MODEL_FILE, STATE_FILE

# The variables Keras' `keras.distribution.initialize` reads; the flags of `fit` win over them.
JOB_ADDRESSES_ENV = "KERAS_DISTRIBUTION_JOB_ADDRESSES"
NUM_PROCESSES_ENV = "KERAS_DISTRIBUTION_NUM_PROCESSES"
PROCESS_ID_ENV = "KERAS_DISTRIBUTION_PROCESS_ID"

# How long a process waits for the others to join, and for a silent one before the run ends. A process
# that dies breaks the next all-reduce at once (its sockets close); the heartbeat bounds the rest (a
# machine that hangs or drops off the network) well under a minute.
JOIN_SECONDS = 300
HEARTBEAT_SECONDS = 20
SHUTDOWN_SECONDS = 20

MULTIWORKER_UNDER_TENSORFLOW = (
    "not offered under TensorFlow: Keras 3's fit fails under MultiWorkerMirroredStrategy (keras-team/keras#20585); "
    "run with KERAS_BACKEND=jax to train across processes, or use \"mirrored\" for the GPUs of one machine"
)

# The files of a run directory the other processes need to take the chief's decisions (relative paths).
BOOKKEEPING = (CONFIG_FILE, STATE_FILE, HISTORY_FILE, pending_model_path(MODEL_FILE),
               f"{BACKUP_DIR}/{BACKUP_METADATA}", f"{BACKUP_DIR}/latest.weights.h5")  # the last: Keras' name


class ClusterError(Exception):
    """The processes of a run could not start together, or one of them stopped during it."""


@dataclass(frozen=True)
class Cluster:
    """Where the coordinator (process 0) listens, how many processes train, and which one this is."""

    coordinator: str
    num_processes: int
    process_id: int


def cluster_from(coordinator=None, num_processes=None, process_id=None, environ=None):
    """The Cluster from the arguments given, else Keras' variables (JOB_ADDRESSES_ENV...); ValueError naming a gap."""
    environ = os.environ if environ is None else environ
    coordinator = coordinator or environ.get(JOB_ADDRESSES_ENV, "").split(",")[0]
    values = {"num_processes": (num_processes, NUM_PROCESSES_ENV), "process_id": (process_id, PROCESS_ID_ENV)}
    numbers = {}
    for name, (value, variable) in values.items():
        if value is None and environ.get(variable, "") != "":
            try:
                value = int(environ[variable])
            except ValueError:
                raise ValueError(f"Invalid {variable}; expected an integer. Received: {variable}={environ[variable]!r}")
        numbers[name] = value
    missing = [f"`{name}` (or {variable})" for name, (_, variable) in values.items() if numbers[name] is None]
    if not coordinator:
        missing.insert(0, f"`coordinator` HOST:PORT (or {JOB_ADDRESSES_ENV})")
    if missing:
        raise ValueError(f"distribute=\"multiworker\" needs {', '.join(missing)}.")
    host, _, port = coordinator.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"Invalid `coordinator`; expected HOST:PORT. Received: coordinator={coordinator!r}")
    n, i = numbers["num_processes"], numbers["process_id"]
    if n < 1:
        raise ValueError(f"Invalid `num_processes`; expected an integer >= 1. Received: num_processes={n}")
    if not 0 <= i < n:
        raise ValueError(f"Invalid `process_id`; expected 0 to {n - 1}. Received: process_id={i}")
    return Cluster(coordinator, n, i)


def initialize(cluster):
    """Join the run's processes (blocks until all have joined) and make Keras train data-parallel over their devices.

    Calls `jax.distributed.initialize` itself rather than through
    `keras.distribution.initialize`, which does not pass the timeouts on.
    Raises ValueError under another backend, ClusterError when the others do not join in JOIN_SECONDS.
    """
    import jax

    check_backend()

    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPUs all-reduce over TCP; GPUs use NCCL
    try:
        jax.distributed.initialize(
            coordinator_address=cluster.coordinator, num_processes=cluster.num_processes,
            process_id=cluster.process_id, initialization_timeout=JOIN_SECONDS,
            heartbeat_timeout_seconds=HEARTBEAT_SECONDS, shutdown_timeout_seconds=SHUTDOWN_SECONDS,
        )
    except Exception as e:  # jaxlib's runtime errors have no public class
        raise ClusterError(f"process {cluster.process_id} of {cluster.num_processes} could not join the run at "
                           f"{cluster.coordinator}: {_first_line(e)}") from e
    # Each process feeds its own slice (batch_slice), so Keras' own sharding of tf.data is off.
    keras.distribution.set_distribution(keras.distribution.DataParallel(
        devices=keras.distribution.list_devices(), auto_shard_dataset=False))


def check_backend():
    """Raise ValueError (one line: why, and what to use) unless Keras runs on JAX."""
    if keras.backend.backend() != "jax":
        raise ValueError(f"Invalid `distribute`; {MULTIWORKER_UNDER_TENSORFLOW}. Received: distribute='multiworker' "
                         f"under KERAS_BACKEND={keras.backend.backend()}")


def joined():
    """Whether this process joined a cluster (`initialize`), of one process or more."""
    return "jax" in sys.modules and sys.modules["jax"].distributed.is_initialized()


def process_count():
    """How many processes train this run: 1 unless `initialize` joined a cluster."""
    return sys.modules["jax"].process_count() if joined() else 1


def process_id():
    """This process's index in the run: 0 (the chief) unless `initialize` joined a cluster."""
    return sys.modules["jax"].process_index() if joined() else 0


def is_chief():
    return process_id() == 0


# ---------------------------------------------------------------- data


def check_global_batch(batch_size, n_train, processes):
    """Raise ValueError unless `batch_size` splits evenly over `processes`, DatasetError when train is under a batch."""
    from cxrkeras.data import DatasetError

    if batch_size % processes:
        raise ValueError(f"Invalid `batch_size` for {processes} processes; expected a multiple of {processes} "
                         f"(each process takes an equal slice of each batch). Received: batch_size={batch_size}")
    if n_train < batch_size:
        raise DatasetError(f"{n_train} training images: fewer than one batch of {batch_size}, which training "
                           f"across processes needs.")


def batch_slice(size, processes, index):
    """The rows of a global batch of `size` that process `index` of `processes` feeds (size divides by processes)."""
    share = size // processes
    return slice(index * share, (index + 1) * share)


def shard_batches(dataset, processes, index, drop_short=False):
    """Global batches made this process's slices (every batch must split evenly).

    `dataset`: a tf.data dataset, or a Keras PyDataset of (images, labels)
    batches such as in-memory arrays; `drop_short` drops a PyDataset's short
    last batch (training's tf.data pipeline drops it itself under distribution).
    """
    if isinstance(dataset, keras.utils.PyDataset):
        return ProcessSlices(dataset, processes, index, drop_short)
    import tensorflow as tf

    def take(*batch):
        rows = batch_slice(tf.shape(batch[0])[0], processes, index)
        return tuple(part[rows] for part in batch)

    return dataset.map(take)


class ProcessSlices(keras.utils.PyDataset):
    """A PyDataset of global batches seen as this process's slices (see shard_batches)."""

    def __init__(self, batches, processes, index, drop_short=False):
        super().__init__()
        self.batches, self.processes, self.index = batches, processes, index
        n = len(batches)
        short = drop_short and n > 1 and len(batches[n - 1][0]) < len(batches[0][0])
        self.length = n - 1 if short else n

    def __len__(self):
        return self.length

    def __getitem__(self, i):
        batch = self.batches[i]
        rows = batch_slice(len(batch[0]), self.processes, self.index)
        return tuple(part[rows] for part in batch)

    def on_epoch_end(self):
        self.batches.on_epoch_end()


def shard_datasets(sets, n_val):
    """`sets` (training.Datasets) made this process's: train sliced; validation sliced when it splits evenly.

    Training keeps whole batches only, so each slice is equal. Validation must see every image once: its batches split evenly
    when the image count divides by the processes; otherwise every process
    feeds all of it, and the means over N equal copies are the means over one.
    """
    processes = process_count()
    if processes == 1:
        return sets
    sets.train = shard_batches(sets.train, processes, process_id(), drop_short=True)
    if n_val % processes == 0:
        sets.val = shard_batches(sets.val, processes, process_id())
    return sets


# ---------------------------------------------------------------- the run directory


def broadcast_json(value):
    """Process 0's `value` (anything JSON holds), returned on every process."""
    from jax.experimental import multihost_utils
    import numpy as np

    data = json.dumps(value).encode() if is_chief() else b""
    with peer_failures():
        size = int(multihost_utils.broadcast_one_to_all(np.int32(len(data))))
        buffer = np.frombuffer(data, np.uint8) if is_chief() else np.zeros(size, np.uint8)
        data = bytes(np.asarray(multihost_utils.broadcast_one_to_all(buffer)))
    return json.loads(data.decode())


def process_run_dir(run_dir):
    """Where this process writes the run: `run_dir` on the chief, else a scratch copy of its bookkeeping files.

    The scratch folder is removed when the process exits. Every process calls this at the same point.
    """
    if process_count() == 1:
        return run_dir
    files = {}
    if is_chief():
        for name in BOOKKEEPING:
            path = os.path.join(run_dir, name)
            if os.path.isfile(path):
                with open(path, "rb") as f:
                    files[name] = base64.b64encode(f.read()).decode()
    files = broadcast_json(files)
    if is_chief():
        return run_dir
    scratch = tempfile.mkdtemp(prefix=f"cxrkeras-process{process_id()}-")
    _SCRATCH.append(scratch)
    for name, data in files.items():
        path = os.path.join(scratch, name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(base64.b64decode(data))
    return scratch


_SCRATCH = []  # this process's scratch run dirs, removed at exit (process state, like JAX's runtime itself)


def _remove_scratch():
    while _SCRATCH:
        shutil.rmtree(_SCRATCH.pop(), ignore_errors=True)


atexit.register(_remove_scratch)


# ---------------------------------------------------------------- a process that stops


class peer_failures:
    """Turn an error of the collectives (another process died or hung) into a ClusterError naming the way on."""

    def __enter__(self):
        return self

    def __exit__(self, kind, error, traceback):
        if error is None or process_count() == 1 or not _is_runtime_error(error):
            return False
        raise ClusterError(
            f"process {process_id()} of {process_count()}: the run stopped: another process stopped or cannot be "
            f"reached ({_first_line(error)}). Finished epochs are kept in the chief's run dir; start all "
            f"{process_count()} processes again with --resume."
        ) from error


def _is_runtime_error(error):
    """Whether `error` came from JAX's runtime (jaxlib's XlaRuntimeError, or a collective's failure as ValueError)."""
    text = str(error)
    return type(error).__name__ in ("XlaRuntimeError", "JaxRuntimeError") or any(
        marker in text for marker in ("Gloo", "NCCL", "UNAVAILABLE", "heartbeat", "Connection reset"))


def _first_line(error):
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


def exit_now(code):
    """End this process at once: after a peer died, JAX's own shutdown waits for it and then aborts with a core dump."""
    _remove_scratch()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
