"""The study's recipe and the resnet levers over three seeds on a GPU machine (Keras on JAX), timed.

A GPU machine lent here has JAX but no TensorFlow (its wheels are too large to
carry), so `cxrkeras fit` and its tf.data pipeline cannot run there. This
script trains with cxrkeras' own pieces instead: `training.build_and_compile`
(the model, the augmentation inside it, as `fit` places it on an accelerator,
the optimizer, schedule and loss of the config), `ThroughputMeter`, the best
epoch by the config's monitor; only the images come from memory (decoded by
Pillow, which rounds JPEG's inverse DCT slightly differently from
TensorFlow: up to 3 grey levels, so the final figures come from `cxrkeras
evaluate` here, on TensorFlow's decoding). Three steps:

    # here: copy train/ and val/ with the carve of experiments/seeds.py (holdout 10%, then validation 15%, seed 0)
    python experiments/gpu_levers.py bundle --data ../shared/cxr-dataset --out .gpu
    # on the GPU machine, carrying .gpu (not committed) and a keras wheel:
    KERAS_BACKEND=jax python experiments/gpu_levers.py train --bundle .gpu --out $OUT --budget 480
    # here: per recipe, a cascade per seed and the ensemble of its seeds (thresholds on the holdout), on validation
    python experiments/gpu_levers.py table OUT [OUT2]   # or the committed runs: experiments/results-h200-levers.json
    # here: run folders of recipes' members, their cascades and validation evaluations (as seeds.py's)
    python experiments/gpu_levers.py runs OUT --recipes long study --data ../shared/cxr-dataset --out exp-gpu
    # later runs train named rounds of levers instead of the plan (--round extra|third|fourth|fifth); then
    # the table of every run into the shipped metrics.json, and its model card from that
    python experiments/gpu_levers.py levers OUT OUT2 ... && python experiments/ship.py --card-only

`train` first times the study's two classifiers alone on the GPU (their full
schedules, augmentation on, validation each epoch) against the bare model's
step rate (no augmentation, no validation), then runs the recipes' fits
several at a time, most important first, until --budget seconds have gone.
Test is never read: the bundle holds train/ and val/ only.
"""

import argparse
import csv
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import keras  # noqa: E402
import numpy as np  # noqa: E402

from cxrkeras.config import CLASSES  # noqa: E402

SPLITS = ("train", "validation", "holdout", "val")
HOLDOUT = 0.1  # experiments/seeds.py's carve: the same validation and holdout as the shipped cascade
LONG_EPOCHS = {"infected": 24, "covid": 42}  # three times the resnet recipe's (seeds.RESNET_EPOCHS)
TWICE_LONG_EPOCHS = {task: 2 * epochs for task, epochs in LONG_EPOCHS.items()}
# Each lever is one change to the "long" recipe (the resnet recipe with LONG_EPOCHS), as dotted RunConfig fields.
LEVERS = {
    "long-no-erase": {"data.border_erase": 0.0},
    "long-no-smoothing": {"train.label_smoothing": 0.0},
    "long-balanced": {"train.class_weight": "balanced"},
    "long-wide": {"model.filters": [48, 48, 96, 192]},
    "long-deep": {"model.blocks": 2},
    "long-study-aug": {"data.augmentation": "study"},
    "long-ema": {"train.ema": True},
    # The third run (--round third): contrast normalisation and resolution, the levers not yet tried.
    "long-equalize": {"model.contrast": "equalize"},
    "long-clahe": {"model.contrast": "clahe"},
    "long-224": {"data.image_size": 224, "model.image_size": 224},
    # The fourth run (--round fourth): twice long's epochs, alone and with the deeper trunk.
    "long-x2": {"train.epochs": TWICE_LONG_EPOCHS},
    "long-deep-x2": {"model.blocks": 2, "train.epochs": TWICE_LONG_EPOCHS},
    # The fifth run (--round fifth): the covid stage learns normal X-rays as not covid too.
    "long-all-negatives": {"data.covid_negatives": "all"},
}
# What runs first when the budget can't hold everything: (recipes, seeds), seed by seed within a group.
PRIORITY = [
    (["resnet", "long", "study"], (0, 1, 2)),
    (["long-no-erase", "long-balanced", "long-wide", "long-no-smoothing"], (0, 1, 2)),
    (["long-deep", "long-study-aug", "long-ema"], (0, 1, 2)),
]
TASKS = ("infected", "covid")
# The second run on the H200 (--round extra): the single three-class CNNs (the study's comparison) and the lever
# seeds that the first run's budget left out.
EXTRA_JOBS = [f"{r}:three-class:{s}" for s in (0, 1, 2) for r in ("study", "long")] + [
    f"{r}:{t}:{s}" for s in (1, 2) for r in ("long-deep", "long-study-aug", "long-ema") for t in TASKS]
THIRD_JOBS = [f"{r}:{t}:{s}" for s in (0, 1, 2) for r in ("long-equalize", "long-224", "long-clahe") for t in TASKS]
FOURTH_JOBS = [f"long-deep:{t}:2" for t in TASKS] + [
    f"{r}:{t}:{s}" for s in (0, 1, 2) for r in ("long-x2", "long-deep-x2") for t in TASKS]
FIFTH_JOBS = [f"long-all-negatives:{t}:{s}" for s in (0, 1, 2) for t in TASKS]
MEMBER_TAR_BYTES = 15 * 2**20  # what comes back from the machine: files of at most 16 MiB, 8 files


# ---------------------------------------------------------------- recipes


def recipe_config(recipe, task):
    """The RunConfig dict of `recipe` for `task`: seeds.py's "study" and "resnet", "long", or a lever on "long"."""
    from seeds import recipes

    if task == "three-class":  # the study's single three-class CNN, or a recipe's trunk with three outputs
        from cxrkeras.config import RunConfig, study_model_config, study_train_config

        if recipe == "study":
            config = RunConfig(model=study_model_config(task), train=study_train_config(task)).to_dict()
            config["data"]["holdout_fraction"] = HOLDOUT
            return config
        config = recipe_config(recipe, "covid")
        config["model"]["task"] = task
        return config
    base = recipes(HOLDOUT)
    if recipe in base:
        return json.loads(json.dumps(base[recipe][task]))
    config = json.loads(json.dumps(base["resnet"][task]))
    config["train"]["epochs"] = LONG_EPOCHS[task]
    if recipe == "long":
        return config
    for dotted, value in LEVERS[recipe].items():
        section, key = dotted.split(".")
        config[section][key] = value[task] if isinstance(value, dict) else value  # a dict: per task
    return config


def jobs():
    """[(recipe, task, seed)] in priority order (the study's seed 0 comes from the timing runs)."""
    out = []
    for recipes, seeds in PRIORITY:
        for seed in seeds:
            for recipe in recipes:
                out += [(recipe, task, seed) for task in TASKS if (recipe, seed) != ("study", 0)]
    return out


def job_name(recipe, task, seed, precision="float32"):
    return f"{recipe}-{task}-s{seed}" + ("" if precision == "float32" else "-bf16")


# ---------------------------------------------------------------- here: the bundle


def bundle(data, out):
    """Copy train/ and val/ of `data` into OUT/data and write OUT/split.csv (relative path, class, split)."""
    from cxrkeras.data import load_splits

    splits = load_splits(data, 0.15, 0, HOLDOUT, 0)
    rows = []
    for split in SPLITS:
        for s in splits.get(split):
            rel = os.path.relpath(s.path, data)
            os.makedirs(os.path.join(out, "data", os.path.dirname(rel)), exist_ok=True)
            shutil.copyfile(s.path, os.path.join(out, "data", rel))
            rows.append((rel, s.label, split))
    with open(os.path.join(out, "split.csv"), "w", newline="") as f:
        csv.writer(f).writerows([("path", "label", "split")] + rows)
    print(f"{len(rows)} files into {out}: " + ", ".join(f"{sp} {sum(r[2] == sp for r in rows)}" for sp in SPLITS))


def read_split(bundle_dir):
    with open(os.path.join(bundle_dir, "split.csv"), newline="") as f:
        return list(csv.DictReader(f))


def load_bundle(bundle_dir, cache):
    """{split: (uint8 images [N, 150, 150, 1], class ids [N])}, decoded once by Pillow and kept in `cache` (.npz)."""
    if not os.path.exists(cache):
        from concurrent.futures import ThreadPoolExecutor

        from PIL import Image

        rows = read_split(bundle_dir)

        def decode(row):
            with Image.open(os.path.join(bundle_dir, "data", row["path"])) as image:
                return np.asarray(image.convert("L"), dtype="uint8")[..., None]

        with ThreadPoolExecutor(16) as pool:
            images = np.stack(list(pool.map(decode, rows)))
        split = np.array([r["split"] for r in rows])
        labels = np.array([CLASSES.index(r["label"]) for r in rows], dtype="int32")
        arrays = {}
        for sp in SPLITS:
            arrays[f"x_{sp}"], arrays[f"y_{sp}"] = images[split == sp], labels[split == sp]
        np.savez(cache + ".tmp.npz", **arrays)
        os.replace(cache + ".tmp.npz", cache)
    with np.load(cache) as f:
        return {sp: (f[f"x_{sp}"], f[f"y_{sp}"]) for sp in SPLITS}


def task_xy(x, labels3, task, covid_negatives="non-covid"):
    """Images and labels of `task` (covid: infected images only, unless covid_negatives is "all"), as
    `data.task_arrays` and `make_dataset` give."""
    if task == "covid":
        keep = labels3 != 0 if covid_negatives != "all" else np.ones(len(labels3), bool)
        x, labels3 = x[keep], labels3[keep]
        y = (labels3 == 2).astype("float32")[:, None]
    elif task == "infected":
        y = (labels3 != 0).astype("float32")[:, None]
    else:
        y = labels3.astype("int32")
    return x, y


def as_float(x, size=150):
    """[0, 1] pixels, resized to `size` as `data.decode_image` does (bilinear, antialiased), 512 at a time."""
    x = x.astype("float32") / 255.0
    if size == x.shape[1]:
        return x
    return np.concatenate([keras.ops.convert_to_numpy(keras.ops.image.resize(x[i:i + 512], (size, size),
                                                                             antialias=True))
                           for i in range(0, len(x), 512)])


# ---------------------------------------------------------------- on the GPU: one fit


def fit_one(bundle_dir, cache, recipe, task, seed, precision, work, bare_epochs=0, epochs=None):
    """Train one classifier; write WORK/NAME.json (history, probabilities per split, timing) and WORK/NAME.keras."""
    from cxrkeras import training
    from cxrkeras.config import TASKS as TASK_CLASSES
    from cxrkeras.config import RunConfig

    name = job_name(recipe, task, seed, precision)
    arrays = load_bundle(bundle_dir, cache)
    cfg = RunConfig.from_dict(recipe_config(recipe, task))
    x_train, y_train = task_xy(*arrays["train"], task, cfg.data.covid_negatives)
    x_val, y_val = task_xy(*arrays["validation"], task, cfg.data.covid_negatives)
    x_train, x_val = as_float(x_train, cfg.data.image_size), as_float(x_val, cfg.data.image_size)
    cfg.train.seed, cfg.train.precision = seed, precision
    cfg.train.epochs = epochs or cfg.train.epochs
    batch = cfg.train.batch_size
    steps = training.steps_per_epoch(cfg, len(x_train))
    start = time.perf_counter()
    model, trained = training.build_and_compile(cfg, steps, augment_on="model")
    meter = training.ThroughputMeter(len(x_train))
    best = BestWeights(model, cfg.train.monitor)
    class_weight = None
    if cfg.train.class_weight == "balanced":
        class_weight = training.balanced_class_weight(y_train.reshape(-1).astype("int32"), TASK_CLASSES[task])
    history = trained.fit(
        x_train, y_train, batch_size=batch, epochs=cfg.train.epochs, validation_data=(x_val, y_val),
        validation_batch_size=256, shuffle=True, class_weight=class_weight, verbose=0,
        callbacks=[meter, best] + training.schedule_callbacks(cfg),
    )
    fit_seconds = time.perf_counter() - start
    model.set_weights(best.weights)
    result = {
        "name": name, "recipe": recipe, "task": task, "seed": seed, "precision": precision,
        "config": cfg.to_dict(), "epochs": cfg.train.epochs, "best_epoch": best.epoch + 1,
        "history": {k: [round(float(v), 5) for v in vs] for k, vs in history.history.items()},
        "train_images": len(x_train), "fit_seconds": round(fit_seconds, 2),
        "fit_images_per_s": round(len(x_train) * cfg.train.epochs / fit_seconds, 1),
        "step_images_per_s": round(meter.images_per_second, 1),
        "first_epoch_seconds": round(meter.epoch_seconds[0], 2),
        "probabilities": {},
        "device": device_name(),
    }
    for split in ("validation", "holdout", "val"):  # every image of the split: the cascade runs both stages on all
        p = model.predict(as_float(arrays[split][0], cfg.data.image_size), batch_size=256, verbose=0)
        result["probabilities"][split] = np.round(np.asarray(p, dtype="float64"), 6).tolist()
    if bare_epochs:
        result["bare_images_per_s"] = bare_rate(cfg, x_train, y_train, bare_epochs)
    if precision == "float32":
        model.save(os.path.join(work, name + ".keras"), include_optimizer=False)
    write_json(os.path.join(work, name + ".json"), result)
    print(f"{name}: best epoch {result['best_epoch']}/{cfg.train.epochs}, {fit_seconds:.1f}s, "
          f"fit {result['fit_images_per_s']:.0f} img/s, steps {result['step_images_per_s']:.0f} img/s"
          + (f", bare {result['bare_images_per_s']:.0f} img/s" if bare_epochs else ""), flush=True)


class BestWeights(keras.callbacks.Callback):
    """Keeps the classifier's weights of the best epoch by `monitor` (what `fit`'s BestModelCheckpoint keeps)."""

    def __init__(self, classifier, monitor):
        super().__init__()
        self.classifier, self.monitor = classifier, monitor
        self.value, self.epoch, self.weights = None, -1, None

    def on_epoch_end(self, epoch, logs=None):
        from cxrkeras.training import improves

        value = float(logs[self.monitor])
        if improves(self.monitor, value, self.value):
            self.value, self.epoch, self.weights = value, epoch, self.classifier.get_weights()


def bare_rate(cfg, x, y, epochs):
    """Images/s of the classifier alone (no augmentation, no validation), same compile: the step rate to compare."""
    from cxrkeras import training

    steps = training.steps_per_epoch(cfg, len(x))
    model, _ = training.build_and_compile(cfg, steps, augment_on="data")  # no augmenter attached: the bare model
    meter = training.ThroughputMeter(len(x))
    model.fit(x, y, batch_size=cfg.train.batch_size, epochs=epochs, shuffle=True, verbose=0, callbacks=[meter])
    return round(meter.images_per_second, 1)


def device_name():
    """The accelerator the fit ran on, and Keras' backend and versions."""
    import importlib

    backend = keras.backend.backend()
    devices = keras.distribution.list_devices()
    kind = devices[0]
    if backend == "jax":
        import jax

        kind = jax.devices()[0].device_kind
    version = importlib.import_module(backend).__version__
    return f"{kind} (Keras {keras.__version__} on {backend} {version})"


def write_json(path, value):
    with open(path + ".tmp", "w") as f:
        json.dump(value, f)
    os.replace(path + ".tmp", path)


# ---------------------------------------------------------------- on the GPU: the plan


def train(args):
    """Timing runs alone, then the jobs `args.workers` at a time until the budget; results and members into OUT."""
    start = time.perf_counter()
    work = os.path.join(args.work, "runs")
    os.makedirs(work, exist_ok=True)
    cache = os.path.join(args.work, "images.npz")
    load_bundle(args.bundle, cache)
    print(f"images decoded in {time.perf_counter() - start:.1f}s", flush=True)
    base = [sys.executable, os.path.abspath(__file__), "one", "--bundle", args.bundle, "--cache", cache, "--work", work]
    base += ["--epochs", str(args.epochs)] if args.epochs else []
    timing = [] if args.no_timing else [("study", task, 0, "float32") for task in TASKS]
    timing += [("study", task, 0, "mixed_bfloat16") for task in TASKS] if args.bf16 else []
    for recipe, task, seed, precision in timing:  # alone on the GPU, so their rates are the machine's
        subprocess.run(base + [recipe, task, str(seed), "--precision", precision, "--bare-epochs", "3"], check=False)
    explicit = {"extra": EXTRA_JOBS, "third": THIRD_JOBS, "fourth": FOURTH_JOBS, "fifth": FIFTH_JOBS}.get(
        args.round, args.jobs)
    queue = [tuple(j.split(":")[:2]) + (int(j.split(":")[2]),) for j in explicit] if explicit else jobs()
    queue, running = [(r, t, s) for r, t, s in queue if not args.only or r in args.only], []
    deadline = start + args.budget
    while queue or running:
        running = [p for p in running if p.poll() is None]
        if time.perf_counter() > deadline:
            for p in running:
                p.kill()
            print(f"budget spent: {len(running)} fit(s) stopped, {len(queue)} not started", flush=True)
            break
        while queue and len(running) < args.workers:
            recipe, task, seed = queue.pop(0)
            running.append(subprocess.Popen(base + [recipe, task, str(seed)]))
        time.sleep(0.5)
    collect(work, args.out)
    print(f"done in {time.perf_counter() - start:.0f}s", flush=True)


def collect(work, out):
    """OUT/results.json (every finished fit) and OUT/members-K.tar (their .keras files, priority order, 15 MiB each)."""
    results = []
    for name in sorted(os.listdir(work)):
        if name.endswith(".json"):
            with open(os.path.join(work, name)) as f:
                results.append(json.load(f))
    write_json(os.path.join(out, "results.json"), results)
    order = {job_name(*j): i for i, j in enumerate(jobs())}
    members = sorted((n for n in os.listdir(work) if n.endswith(".keras")), key=lambda n: order.get(n[:-6], -1))
    part, size, tar = 0, 0, None
    for name in members:
        path = os.path.join(work, name)
        if tar is None or size + os.path.getsize(path) > MEMBER_TAR_BYTES:
            if tar is not None:
                tar.close()
            if part == 4:
                print(f"not brought back (64 MiB at most): {members[members.index(name):]}")
                return
            part, size = part + 1, 0
            tar = tarfile.open(os.path.join(out, f"members-{part}.tar"), "w")
        tar.add(path, arcname=name)
        size += os.path.getsize(path)
    if tar is not None:
        tar.close()


# ---------------------------------------------------------------- here: the table and the run folders


def load_results(paths):
    """{(recipe, task, seed): result} of the float32 fits in each PATH/results.json (or the file PATH)."""
    results = []
    for path in [paths] if isinstance(paths, str) else paths:
        with open(path if path.endswith(".json") else os.path.join(path, "results.json")) as f:
            results += json.load(f)
    return {(r["recipe"], r["task"], r["seed"]): r for r in results if r["precision"] == "float32"}


def labels_of(bundle_dir):
    rows = read_split(bundle_dir)
    return {sp: np.array([CLASSES.index(r["label"]) for r in rows if r["split"] == sp]) for sp in SPLITS}


def cascade_scores(p_infected, p_covid, labels, target_recall=0.5):
    """Thresholds picked on the holdout (covid recall >= target, most accurate), scored on validation."""
    from sklearn.metrics import f1_score

    from cxrkeras.models.cascade import cascade_decisions
    from cxrkeras.thresholds import choose_thresholds

    pick = choose_thresholds(p_infected["holdout"], p_covid["holdout"], labels["holdout"], {"covid": target_recall})
    ti, tc = pick["t_infected"], pick["t_covid"]
    pi, pc = (np.asarray(p["validation"]).reshape(-1) for p in (p_infected, p_covid))
    pred = cascade_decisions(pi, pc, ti, tc)
    y = labels["validation"]
    f1 = f1_score(y, pred, labels=[0, 1, 2], average=None)
    # Where a normal X-ray goes when the first stage lets it through: the share of validation's normal images
    # that the covid stage alone calls covid (the test found most normal errors called covid).
    normals_covid = float(np.mean(pc[y == 0] > tc))
    return {"accuracy": float(np.mean(pred == y)), "f1": [round(float(v), 4) for v in f1],
            "t_infected": ti, "t_covid": tc, "n": int(len(y)), "normals_called_covid": round(normals_covid, 4)}


def val_grid(mean, y, scores):
    """The ensemble on the release's 25-image val/ at its thresholds: a look at the release's other images,
    too few to choose anything on (nothing is chosen on them)."""
    from cxrkeras.models.cascade import cascade_decisions

    pred = cascade_decisions(mean["infected"]["val"], mean["covid"]["val"], scores["t_infected"], scores["t_covid"])
    return {"right": int(np.sum(pred == y)), "n": int(len(y)), "normals": int(np.sum(y == 0)),
            "normals_called_covid": int(np.sum((y == 0) & (pred == 2)))}


def table(results, labels):
    """{recipe: {"seeds": {seed: scores}, "ensemble": scores}} for every recipe with both stages of some seed."""
    out = {}
    for recipe in sorted({r for r, _, _ in results}):
        seeds = sorted(s for r, t, s in results if r == recipe and t == "infected" and (r, "covid", s) in results)
        if not seeds:
            continue
        probs = {s: {t: results[(recipe, t, s)]["probabilities"] for t in TASKS} for s in seeds}
        row = {"seeds": {s: cascade_scores(probs[s]["infected"], probs[s]["covid"], labels) for s in seeds}}
        mean = {t: {sp: np.mean([np.asarray(probs[s][t][sp]).reshape(-1) for s in seeds], axis=0)
                    for sp in ("validation", "holdout", "val")} for t in TASKS}
        row["ensemble"] = cascade_scores(mean["infected"], mean["covid"], labels)
        row["val_grid"] = val_grid(mean, labels["val"], row["ensemble"])
        row["best_epochs"] = {t: [results[(recipe, t, s)]["best_epoch"] for s in seeds] for t in TASKS}
        row["fit_seconds"] = sum(results[(recipe, t, s)]["fit_seconds"] for s in seeds for t in TASKS)
        out[recipe] = row
    return out


def three_class_rows(results, labels):
    """{recipe: {"seeds": {seed: accuracy}, "ensemble": accuracy, "f1": [...]}}: single three-class CNNs on validation."""
    from sklearn.metrics import f1_score

    out, y = {}, labels["validation"]
    for recipe in sorted({r for r, t, _ in results if t == "three-class"}):
        probs = {s: np.asarray(results[(r, t, s)]["probabilities"]["validation"])
                 for r, t, s in results if r == recipe and t == "three-class"}
        mean = np.mean(list(probs.values()), axis=0).argmax(axis=1)
        out[recipe] = {
            "seeds": {s: round(float(np.mean(p.argmax(axis=1) == y)), 4) for s, p in sorted(probs.items())},
            "ensemble": round(float(np.mean(mean == y)), 4),
            "ensemble_f1": [round(float(v), 4) for v in f1_score(y, mean, labels=[0, 1, 2], average=None)],
        }
    return out


def lever_rows(rows):
    """One summary per recipe (what ship.py's model card shows): mean and spread over seeds, the ensemble."""
    out = []
    for recipe, row in rows.items():
        accs = [v["accuracy"] for v in row["seeds"].values()]
        out.append({
            "recipe": recipe, "seeds": len(accs), "accuracy_per_seed": [round(a, 4) for a in accs],
            "accuracy_mean": round(float(np.mean(accs)), 4), "accuracy_spread": round(max(accs) - min(accs), 4),
            "covid_f1_mean": round(float(np.mean([v["f1"][2] for v in row["seeds"].values()])), 4),
            "normals_called_covid_mean": round(float(np.mean([v["normals_called_covid"]
                                                              for v in row["seeds"].values()])), 4),
            "ensemble_accuracy": round(row["ensemble"]["accuracy"], 4), "ensemble_f1": row["ensemble"]["f1"],
            "ensemble_covid_f1": row["ensemble"]["f1"][2], "best_epochs": row["best_epochs"],
            "val_grid": row["val_grid"],
        })
    return out


def print_table(rows):
    print("| recipe | seeds | accuracy per seed | mean (spread) | covid F1 mean | ensemble accuracy | ensemble F1 "
          "normal / non-covid / covid | best epochs infected; covid |")
    print("|---|---|---|---|---|---|---|---|")
    for r in lever_rows(rows):
        print(f"| {r['recipe']} | {r['seeds']} | {' / '.join(f'{a:.4f}' for a in r['accuracy_per_seed'])} | "
              f"{r['accuracy_mean']:.4f} ({r['accuracy_spread']:.4f}) | {r['covid_f1_mean']:.3f} | "
              f"{r['ensemble_accuracy']:.4f} | {' / '.join(f'{v:.3f}' for v in r['ensemble_f1'])} | "
              f"{r['best_epochs']['infected']}; {r['best_epochs']['covid']} |")


# The device runs behind the lever table (see the run rounds above), then the table into the shipped metrics.
LEVER_RUNS = [
    "KERAS_BACKEND=jax python experiments/gpu_levers.py train --bundle .gpu --out gpu-out --bf16  # GPU machine",
    "KERAS_BACKEND=jax python experiments/gpu_levers.py train --bundle .gpu --out gpu-out2 --no-timing --round extra",
    "KERAS_BACKEND=jax python experiments/gpu_levers.py train --bundle .gpu --out gpu-out3 --no-timing --round third",
    "KERAS_BACKEND=jax python experiments/gpu_levers.py train --bundle .gpu --out gpu-out4 --no-timing --round fourth",
    "KERAS_BACKEND=jax python experiments/gpu_levers.py train --bundle .gpu --out gpu-out5 --no-timing --round fifth",
]


def rebuild_commands(recipes, machine):
    """The commands that rebuild the shipped cascade (the first of `recipes`) and its card's lever table."""
    shipped = recipes[0]  # the first recipe named is the one ship.py ships
    return ["python experiments/gpu_levers.py bundle --data ../shared/cxr-dataset --out .gpu"] + LEVER_RUNS + [
        f"python experiments/gpu_levers.py runs gpu-out gpu-out2 --recipes {' '.join(recipes)} "
        f"--data ../shared/cxr-dataset --out exp-gpu --machine '{machine}'",
        f"python experiments/ship.py --runs exp-gpu --data ../shared/cxr-dataset --recipe {shipped} "
        f"--cascade {shipped}-ensemble --overwrite",
        "python experiments/gpu_levers.py levers gpu-out gpu-out2 gpu-out3 gpu-out4 gpu-out5 --recipes "
        f"{' '.join(recipes)} && python experiments/ship.py --card-only",
    ]


def write_provenance(args):
    """OUT/provenance.json, read by ship.py: where the fits ran, the commands that rebuild them, the lever table."""
    results, labels = load_results(args.results), labels_of(args.bundle)
    os.makedirs(args.out, exist_ok=True)
    write_json(os.path.join(args.out, "provenance.json"), {
        "machine": args.machine, "rebuild": rebuild_commands(args.recipes, args.machine),
        "levers": lever_rows(table(results, labels)), "three_class": three_class_rows(results, labels),
    })


def update_levers(args):
    """Rewrite the lever table and the three-class rows of a shipped metrics.json from every run's results."""
    results, labels = load_results(args.results), labels_of(args.bundle)
    with open(args.metrics) as f:
        metrics = json.load(f)
    metrics["levers"] = lever_rows(table(results, labels))
    metrics["three_class"] = three_class_rows(results, labels)
    metrics["rebuild"] = rebuild_commands(args.recipes, metrics["machine"])
    with open(args.metrics + ".tmp", "w") as f:
        json.dump(metrics, f, indent=2)
    os.replace(args.metrics + ".tmp", args.metrics)
    print(f"{args.metrics}: {len(metrics['levers'])} recipes, {len(metrics['three_class'])} three-class trunks")


def runs(args):
    """Run folders of `args.recipes`' members, then seeds.py's cascades and validation evaluations of them.

    OUT/TASK/RECIPE-sSEED/{model.keras, config.json} is what `cxrkeras cascade`
    and ship.py read from a fit's run; OUT/timing.json holds the fits' seconds
    (on the GPU machine), OUT/configs/RECIPE-TASK.json the configs; then, per
    seed and for the ensemble of the seeds, `cxrkeras cascade` (thresholds on
    the holdout) and `cxrkeras evaluate --split validation` (TensorFlow's
    decoding, the shortcut audit) under OUT/cascades, as experiments/seeds.py does.
    """
    from seeds import cascade_and_evaluate, cxrkeras

    from cxrkeras.config import RunConfig
    from cxrkeras.training import load_task_data

    write_provenance(args)
    results = load_results(args.results)
    members_dir = os.path.join(args.out, "members")
    for folder in args.results:
        for tar_name in sorted(n for n in os.listdir(folder) if n.startswith("members-")):
            with tarfile.open(os.path.join(folder, tar_name)) as tar:
                tar.extractall(members_dir, filter="data")
    timing, seeds = {}, {}
    for (recipe, task, seed), result in sorted(results.items()):
        member = os.path.join(members_dir, job_name(recipe, task, seed) + ".keras")
        if recipe not in args.recipes or not os.path.exists(member):
            continue
        run_dir = os.path.join(args.out, task, f"{recipe}-s{seed}")
        os.makedirs(run_dir, exist_ok=True)
        shutil.copyfile(member, os.path.join(run_dir, "model.keras"))
        cfg = RunConfig.from_dict(result["config"])
        cfg.data.data_dir = os.path.abspath(args.data)
        cfg.fingerprint = load_task_data(cfg).fingerprint
        cfg.save(os.path.join(run_dir, "config.json"))
        os.makedirs(os.path.join(args.out, "configs"), exist_ok=True)
        cfg.save(os.path.join(args.out, "configs", f"{recipe}-{task}.json"))
        timing[f"{task}/{recipe}-s{seed}"] = result["fit_seconds"]
        seeds.setdefault(recipe, set()).add((task, seed))
    write_json(os.path.join(args.out, "timing.json"), timing)
    for recipe in args.recipes:
        done = sorted(s for t, s in seeds.get(recipe, ()) if ("infected", s) in seeds[recipe] and t == "covid")
        for seed in done:
            cascade_and_evaluate(cxrkeras(), args, f"{recipe}-s{seed}", [f"{recipe}-s{seed}"])
        if len(done) > 1:
            cascade_and_evaluate(cxrkeras(), args, f"{recipe}-ensemble", [f"{recipe}-s{s}" for s in done])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("bundle", help="Copy the data and write the carve (here).")
    p.add_argument("--data", required=True)
    p.add_argument("--out", default=".gpu")
    p = sub.add_parser("train", help="Timing runs, then the recipes' fits (on the GPU machine).")
    p.add_argument("--bundle", default=".gpu")
    p.add_argument("--out", required=True)
    p.add_argument("--work", default="/tmp/gpu-levers")
    p.add_argument("--budget", type=float, default=480, help="Seconds after which no fit runs on.")
    p.add_argument("--workers", type=int, default=6, help="Fits at a time, each its own process.")
    p.add_argument("--bf16", action="store_true", help="Also time the study's classifiers in mixed_bfloat16.")
    p.add_argument("--only", nargs="+", help="Only these recipes (tries).")
    p.add_argument("--epochs", type=int, help="Override every schedule's epochs (tries).")
    p.add_argument("--jobs", nargs="+", help="RECIPE:TASK:SEED fits to run instead of the plan (task three-class too).")
    p.add_argument("--round", choices=["extra", "third", "fourth", "fifth"],
                   help="Run EXTRA_JOBS (the three-class CNNs, the last seeds of run 1), THIRD_JOBS (contrast "
                        "normalisation, resolution) or FOURTH_JOBS (twice the epochs) instead of the plan.")
    p.add_argument("--no-timing", action="store_true", help="Skip the timing runs of the study's classifiers.")
    p = sub.add_parser("one", help="One fit (train runs these).")
    p.add_argument("recipe")
    p.add_argument("task")
    p.add_argument("seed", type=int)
    p.add_argument("--precision", default="float32")
    p.add_argument("--bare-epochs", type=int, default=0)
    p.add_argument("--epochs", type=int)
    p.add_argument("--bundle", required=True)
    p.add_argument("--cache", required=True)
    p.add_argument("--work", required=True)
    p = sub.add_parser("table", help="The validation table of what train brought back (here).")
    p.add_argument("results", nargs="+", help="train's --out folders (or results.json files).")
    p.add_argument("--bundle", default=".gpu")
    p.add_argument("--json", action="store_true")
    p = sub.add_parser("levers", help="The lever table of every run into a shipped metrics.json (here).")
    p.add_argument("results", nargs="+", help="train's --out folders (or results.json files).")
    p.add_argument("--bundle", default=".gpu")
    p.add_argument("--metrics", default=os.path.join("saved_models", "cascade", "metrics.json"))
    p.add_argument("--recipes", nargs="+", default=["long", "study"], help="As `runs` was given (the rebuild line).")
    p = sub.add_parser("runs", help="Run folders of recipes' members, their cascades and evaluations (here).")
    p.add_argument("results", nargs="+", help="train's --out folders (or results.json files).")
    p.add_argument("--recipes", nargs="+", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--target-recall", default="covid=0.5", help="The cascades' operating point, on the holdout.")
    p.add_argument("--dry-run", action="store_true", help="Print the cascade and evaluate commands only.")
    p.add_argument("--bundle", default=".gpu", help="The bundle train read (its carve labels the probabilities).")
    p.add_argument("--machine", default="a GPU machine", help="Where train ran, for the model card.")
    args = parser.parse_args(argv)
    if args.command == "bundle":
        bundle(args.data, args.out)
    elif args.command == "train":
        os.makedirs(args.out, exist_ok=True)
        train(args)
    elif args.command == "one":
        enable_compile_cache(args.work)
        fit_one(args.bundle, args.cache, args.recipe, args.task, args.seed, args.precision, args.work,
                args.bare_epochs, args.epochs)
    elif args.command == "table":
        results, labels = load_results(args.results), labels_of(args.bundle)
        rows, three = table(results, labels), three_class_rows(results, labels)
        if args.json:
            print(json.dumps({"cascades": rows, "three_class": three}, indent=1))
        else:
            print_table(rows)
            for recipe, row in three.items():
                accs = list(row["seeds"].values())
                print(f"three-class {recipe}: accuracy per seed {accs}, mean {np.mean(accs):.4f} "
                      f"(spread {max(accs) - min(accs):.4f}), ensemble {row['ensemble']:.4f}, F1 {row['ensemble_f1']}")
    elif args.command == "levers":
        update_levers(args)
    else:
        runs(args)


def enable_compile_cache(work):
    """JAX's persistent compilation cache, shared by the fit processes: seeds of one recipe compile once."""
    if keras.backend.backend() == "jax":
        import jax

        jax.config.update("jax_compilation_cache_dir", os.path.join(os.path.dirname(work), "jax-cache"))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


if __name__ == "__main__":
    main()
