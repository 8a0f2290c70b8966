"""The devices a fit runs on: what the Keras backend sees, the precision to compute in, and the strategy over them.

`resolve_precision` makes the precision "auto" concrete for the device at
hand; `make_strategy` spreads a fit over the local GPUs (TensorFlow's
MirroredStrategy), and `replica_batch_sizes` keeps its batches whole for
every replica; `default_augment_on` puts the augmentation where it runs
best. Several processes are `cxrkeras.distributed`'s.
"""

import keras

from cxrkeras.config import DISTRIBUTES

BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")  # /proc/cpuinfo flags of CPUs with bfloat16 arithmetic


# ---------------------------------------------------------------- what the backend sees


def cpu_flags(path="/proc/cpuinfo"):
    """The first CPU's feature flags from /proc/cpuinfo (an empty set where there is none, as on macOS)."""
    try:
        with open(path) as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def gpu_compute_capabilities():
    """[(major, minor)] of the GPUs the Keras backend sees (empty without GPUs)."""
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        details = [tf.config.experimental.get_device_details(g) for g in tf.config.list_physical_devices("GPU")]
        return [tuple(d.get("compute_capability", (0, 0))) for d in details]
    if keras.backend.backend() == "jax":
        import jax

        gpus = [d for d in jax.devices() if d.platform == "gpu"]
        return [tuple(int(x) for x in str(getattr(d, "compute_capability", "0.0")).split(".")[:2]) for d in gpus]
    return []


def gpu_visible():
    """Whether the Keras backend sees a GPU (under TensorFlow, without starting its runtime)."""
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        return bool(tf.config.list_physical_devices("GPU"))
    return any(d.lower().startswith("gpu") for d in keras.distribution.list_devices())


# ---------------------------------------------------------------- precision


def resolve_precision(precision):
    """`precision`, with "auto" made "mixed_bfloat16" where the device computes bfloat16 natively, else "float32".

    Natively: a GPU of compute capability 8 or more (Ampere on), or, with no GPU,
    a CPU with AVX-512 BF16 or AMX. Elsewhere mixed_bfloat16 is emulated and
    slower than float32 (4-5x on a 2-core AVX2 EPYC, benchmarks/train_speed.py).
    """
    if precision != "auto":
        return precision
    capabilities = gpu_compute_capabilities()
    if capabilities:
        native = min(capabilities) >= (8, 0)
    else:
        native = any(flag in cpu_flags() for flag in BF16_CPU_FLAGS)
    return "mixed_bfloat16" if native else "float32"


# ---------------------------------------------------------------- placement and distribution


def default_augment_on():
    """"data" (in tf.data, on the CPU) under TensorFlow without a GPU; else "model" (on the device).

    Under JAX (or torch) the augmentation layers compute with that backend's
    ops, which cannot run inside tf.data's graph: they go in the model.
    """
    if keras.backend.backend() != "tensorflow":
        return "model"
    return "model" if gpu_visible() else "data"


def make_strategy(name):
    """None, or a MirroredStrategy over the local GPUs (else the logical CPUs).

    None for "multiworker" too: Keras' distribution, set by `distributed.initialize`, spreads that run.
    """
    if name in ("none", "multiworker"):
        return None
    if keras.backend.backend() != "tensorflow":
        raise ValueError(
            f"Invalid `distribute` under the {keras.backend.backend()} backend: TensorFlow's distribution "
            f"strategies need KERAS_BACKEND=tensorflow. Received: distribute={name!r}"
        )
    import tensorflow as tf

    if name == "mirrored":
        devices = tf.config.list_logical_devices("GPU") or tf.config.list_logical_devices("CPU")
        return tf.distribute.MirroredStrategy([d.name for d in devices])
    raise ValueError(f"Unknown `distribute`; expected one of {list(DISTRIBUTES)}. Received: distribute={name!r}")


def replica_batch_sizes(n_train, n_val, batch_size, replicas):
    """The validation batch size under `replicas` replicas; raises ValueError/DatasetError when none works.

    Keras and TensorFlow 2.21 fail on batches that split badly across replicas:
    a replica left with no images, or a first batch that does not split evenly.
    So under distribution the batch size must be a multiple of the replicas,
    training keeps whole batches only (the few left-over images differ every
    epoch, as the data is shuffled), and validation, which must see every image,
    gets the largest batch size <= `batch_size` whose batches all split.
    """
    from cxrkeras.data import DatasetError

    if replicas == 1:
        return batch_size
    if batch_size % replicas:
        raise ValueError(
            f"Invalid `batch_size` for {replicas} replicas; expected a multiple of {replicas}. "
            f"Received: batch_size={batch_size}"
        )
    if n_train < batch_size:
        raise DatasetError(
            f"{n_train} training images: fewer than one batch of {batch_size}, which distributed training needs."
        )
    for b in range(batch_size, 0, -replicas):
        first, rest = min(b, n_val), (n_val % b if n_val > b else 0)
        if first % replicas == 0 and (rest == 0 or rest >= replicas):
            return b
    raise DatasetError(
        f"{n_val} validation images cannot be split evenly over {replicas} replicas; "
        f"use more data or a larger `val_fraction`."
    )
