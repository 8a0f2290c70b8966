"""Test-time augmentation for the shipped cascade's members: does averaging over views help on validation?

Each member of saved_models/cascade predicts every validation and holdout
image (the shipped carve: holdout 10%, then validation 15%, seed 0; TensorFlow's
decoding) as it is and under a few mild views (zoomed crops, small rotations:
the kind of change the training augmentation makes). Per seed and for the
3-seed ensemble, with and without the views, the cascade's thresholds are
picked on the holdout (covid recall >= 0.5) and scored on validation, as
experiments/gpu_levers.py's table does. Test is never read.

    python experiments/tta.py --data ../shared/cxr-dataset [--members saved_models/cascade/members]
"""

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402

from cxrkeras.config import CLASSES  # noqa: E402

SEEDS = (0, 1, 2)
ZOOM, DEGREES = 0.9, 7.0  # the views: crops of 90% of the side, rotations of +-7 degrees


def views(x):
    """The identity, 4 corner and 1 centre crops of ZOOM of the side (resized back), rotations of +-DEGREES."""
    import keras

    size = x.shape[1]
    side = round(size * ZOOM)
    out = [x]
    for top, left in [(0, 0), (0, size - side), (size - side, 0), (size - side, size - side),
                      ((size - side) // 2, (size - side) // 2)]:
        crop = x[:, top:top + side, left:left + side]
        out.append(keras.ops.convert_to_numpy(keras.ops.image.resize(crop, (size, size), antialias=True)))
    for degrees in (-DEGREES, DEGREES):
        rotate = keras.layers.RandomRotation((degrees / 360, degrees / 360), fill_mode="reflect")
        out.append(keras.ops.convert_to_numpy(rotate(x, training=True)))
    return out


def member_probabilities(path, images):
    """{split: [views, N]} of the member's positive class (p_infected or p_covid)."""
    from cxrkeras.runs import load_model

    model = load_model(path)
    return {split: np.stack([model.predict(v, batch_size=128, verbose=0).reshape(-1) for v in views(x)])
            for split, x in images.items()}


def main(argv=None):
    from gpu_levers import cascade_scores

    from cxrkeras.data import load_images, load_splits

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True)
    parser.add_argument("--members", default=os.path.join("saved_models", "cascade", "members"))
    parser.add_argument("--out", help="Write the table as JSON here too.")
    args = parser.parse_args(argv)
    splits = load_splits(args.data, 0.15, 0, 0.1, 0)
    images = {sp: load_images([s.path for s in splits.get(sp)]) for sp in ("validation", "holdout")}
    labels = {sp: np.array([CLASSES.index(s.label) for s in splits.get(sp)]) for sp in images}
    probs = {(task, seed): member_probabilities(os.path.join(args.members, f"{task}-long-s{seed}.keras"), images)
             for task in ("infected", "covid") for seed in SEEDS}
    rows = {}
    for name, seeds in [(f"seed {s}", [s]) for s in SEEDS] + [("ensemble", list(SEEDS))]:
        for mode, pick in (("plain", slice(0, 1)), ("views", slice(None))):
            p = {task: {sp: np.mean([probs[(task, s)][sp][pick].mean(axis=0) for s in seeds], axis=0)
                        for sp in images} for task in ("infected", "covid")}
            rows[f"{name}, {mode}"] = cascade_scores(p["infected"], p["covid"], labels)
    for name, r in rows.items():
        print(f"{name:22s} accuracy {r['accuracy']:.4f}  F1 {' / '.join(f'{v:.3f}' for v in r['f1'])}  "
              f"thresholds {r['t_infected']:.2f} / {r['t_covid']:.2f}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
