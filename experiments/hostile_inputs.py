"""Issue 7's closing table: the checkout's cxrkeras CLI run on a corpus of broken and odd inputs.

Prints a markdown table (item, command, exit code, what it printed). Everything
is made in a temporary folder; nothing in the repository is touched. Run from
the checkout, with its .venv installed:

    .venv/bin/python experiments/hostile_inputs.py
"""

import io
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

MAIN = Path(__file__).resolve().parents[1]  # the checkout
sys.path.insert(0, str(MAIN / "tests"))
from images import png_declaring, png_with_bad_crc  # noqa: E402

CLI = str(MAIN / ".venv/bin/cxrkeras")
PY = str(MAIN / ".venv/bin/python")
NOISE = ("oneDNN", "absl", "cuda", "TF_ENABLE", "tensorflow/core", "WARNING: All log messages", "E0000", "I0000", "W0000")
ROWS = []


def run(args, timeout=600, env=None):
    start = time.monotonic()
    p = subprocess.run(args, capture_output=True, timeout=timeout, env=env)
    return p.returncode, p.stdout.decode("utf-8", "replace"), p.stderr.decode("utf-8", "replace"), time.monotonic() - start


def meaningful(out, err, keep):
    """The lines worth showing: a traceback's last line if any, else the first `keep` non-noise lines of stderr+stdout."""
    lines = [l.rstrip() for l in (err + "\n" + out).splitlines() if l.strip() and not any(n in l for n in NOISE)]
    lines = [l for l in lines if not l.lstrip().startswith(("Epoch ", "\x08")) and "━" not in l]
    if "Traceback (most recent call last)" in err:
        return "**TRACEBACK**: " + lines[-1]
    errors = [l for l in lines if l.startswith("Error:")]
    if errors and lines[0].startswith("Usage:"):
        lines = errors + [l for l in lines if l not in errors]
    return " ⏎ ".join(lines[:keep]) if lines else "(nothing)"


def row(item, args, shown=None, keep=2, note="", **kw):
    rc, out, err, secs = run(args, **kw)
    text = meaningful(out, err, keep)
    if note:
        text += f" — {note(rc, out, err) if callable(note) else note}"
    shown = shown or " ".join(str(a) for a in args).replace(CLI, "cxrkeras")
    ROWS.append((item, shown, str(rc), text))
    print(f"[{secs:5.1f}s] {item}: exit {rc}", file=sys.stderr)
    return rc, out, err


def synth(folder, per_class=8):
    rc, out, err, _ = run([CLI, "data", "synth", str(folder), "--per-class", str(per_class)])
    assert rc == 0, err
    return folder


def image_bytes(mode, fmt, size=(20, 20), dtype="uint8", **save):
    buffer = io.BytesIO()
    if mode == "I;16":
        Image.fromarray(np.full(size, 40000, dtype)).save(buffer, fmt)
    else:
        Image.new(mode, size, 128 if mode != "CMYK" else (10, 20, 30, 40)).save(buffer, fmt, **save)
    return buffer.getvalue()


def short(path, tmp):
    return str(path).replace(str(tmp), "$T")


def main():
    tmp = Path(tempfile.mkdtemp(prefix="hostile-"))
    T = lambda p: short(p, tmp)  # noqa: E731
    print(f"temp dir $T = {tmp}", file=sys.stderr)

    # --- A: a 20000x20000-declaring PNG and a bad-CRC PNG beside good images
    a = synth(tmp / "A")
    huge = a / "train/normal/huge.png"
    huge.write_bytes(png_declaring(20000, 20000))
    crc = a / "train/normal/badcrc.png"
    crc.write_bytes(png_with_bad_crc())
    good = a / "test/normal/normal-0000.jpg"
    row("PNG declaring 20000x20000 (200 bytes) + bad-CRC PNG in a dataset", [CLI, "data", "check", str(a)],
        "cxrkeras data check $T/A", keep=4)
    runs = tmp / "runs"
    rc, out, err = row("bad-CRC (and huge) PNG in train: fit skips and finishes",
                       [CLI, "fit", "infected", "--data", str(a), "--epochs", "1", "--batch-size", "8",
                        "--precision", "float32", "--out", str(runs), "--name", "r1"],
                       "cxrkeras fit infected --data $T/A --epochs 1 --batch-size 8 --precision float32 --out $T/runs --name r1",
                       keep=3, timeout=900,
                       note=lambda rc, o, e: f"model.keras written: {(runs / 'infected/r1/model.keras').exists()}")
    run_dir = runs / "infected/r1"
    have_model = (run_dir / "model.keras").exists()
    if have_model:
        row("predict the huge PNG beside a good image", [CLI, "predict", str(run_dir), str(huge), str(good)],
            f"cxrkeras predict $T/runs/infected/r1 {T(huge)} {T(good)}", keep=3)
        row("predict the bad-CRC PNG beside a good image", [CLI, "predict", str(run_dir), str(crc), str(good)],
            f"cxrkeras predict $T/runs/infected/r1 {T(crc)} {T(good)}", keep=3)
    row("huge + bad-CRC PNG in train, data preview of 12 images", [CLI, "data", "preview", str(a), "--images", "12",
                                                                   "--out", str(tmp / "preview.png")],
        "cxrkeras data preview $T/A --images 12 --out $T/preview.png", keep=2,
        note=lambda rc, o, e: f"preview.png written: {(tmp / 'preview.png').exists()}")
    if have_model:
        row("huge PNG with the pixel limit raised over it", [CLI, "--max-pixels", "1000000000", "predict", str(run_dir),
                                                             str(huge), str(good)],
            f"cxrkeras --max-pixels 1000000000 predict $T/runs/infected/r1 {T(huge)} {T(good)}", keep=3, timeout=300)

    # --- B: formats that tf.io.decode_image accepts
    b = synth(tmp / "B")
    d = b / "train/normal"
    (d / "bmp.bmp").write_bytes(image_bytes("L", "BMP"))
    (d / "gif.gif").write_bytes(image_bytes("P", "GIF"))
    (d / "cmyk.jpg").write_bytes(image_bytes("CMYK", "JPEG"))
    (d / "sixteen.png").write_bytes(image_bytes("I;16", "PNG", dtype="uint16"))
    (d / "one.png").write_bytes(image_bytes("RGBA", "PNG", size=(1, 1)))
    (d / "rgb.png").write_bytes(image_bytes("RGB", "PNG"))
    row("BMP, GIF, CMYK JPEG, 16-bit PNG, 1x1 RGBA PNG, RGB PNG in train/normal", [CLI, "data", "check", str(b)],
        "cxrkeras data check $T/B", keep=3)
    row("same, counted by data stats", [CLI, "data", "stats", str(b), "--out", str(tmp / "statsB")],
        "cxrkeras data stats $T/B", keep=6)

    # --- C: names and non-files
    c = synth(tmp / "C")
    d = c / "train/normal"
    with open(os.fsencode(d) + b"/bad-\xff\xfe-name.jpg", "wb") as f:
        f.write((d / "normal-0000.jpg").read_bytes())
    (d / "x.jpg").mkdir()
    (d / "empty.jpg").write_bytes(b"")
    (d / "text.png").write_text("this is not a PNG\n")
    row("non-UTF-8 name, folder x.jpg, zero-byte .jpg, text .png", [CLI, "data", "check", str(c)],
        "cxrkeras data check $T/C", keep=6)
    row("same, data stats", [CLI, "data", "stats", str(c), "--out", str(tmp / "statsC")],
        "cxrkeras data stats $T/C", keep=8)

    # --- E: no covid train image readable after skipping
    e = synth(tmp / "E")
    for p in (e / "train/infected/covid").glob("*.jpg"):
        p.write_text("not an image")
    row("every train covid image unreadable", [CLI, "fit", "covid", "--data", str(e), "--epochs", "1",
                                                "--precision", "float32", "--out", str(tmp / "runsE"), "--name", "e"],
        "cxrkeras fit covid --data $T/E --epochs 1 --precision float32 --out $T/runsE", keep=3,
        note=lambda rc, o, e_: f"model written: {(tmp / 'runsE/covid/e/model.keras').exists()}")

    # --- side files
    manifest = tmp / "manifest.csv"
    manifest.write_text(f"path,label,split\n{good},normal,train\n{good},,train\n")
    row("manifest row with a missing cell", [CLI, "data", "check", str(manifest)], "cxrkeras data check $T/manifest.csv")
    if have_model:
        broken = tmp / "broken-run"
        shutil.copytree(run_dir, broken)
        (broken / "config.json").write_text('{"model": {"task": "inf')
        row("corrupt config.json beside a model", [CLI, "predict", str(broken), str(good)],
            f"cxrkeras predict $T/broken-run {T(good)}  (config.json truncated)", keep=2)
    row("an image given as the dataset", [CLI, "data", "check", str(good)], f"cxrkeras data check {T(good)}")
    row("an image given as --data to fit", [CLI, "fit", "infected", "--data", str(good), "--epochs", "1",
                                            "--out", str(tmp / "runsX")],
        f"cxrkeras fit infected --data {T(good)} --epochs 1")

    # --- nothing overwritten
    sys.path.insert(0, str(MAIN))
    from tiny_models import write_crafted_savedmodel, write_runs  # imports keras / TensorFlow

    tiny_runs = tmp / "tiny-runs"
    tiny_runs.mkdir()
    folders = write_runs(tiny_runs, str(a))
    before = (folders["infected"] / "model.keras").read_bytes()
    row("cascade --out a classifier's run folder", [CLI, "cascade", str(folders["infected"]), str(folders["covid"]),
                                                    "--out", str(folders["infected"])],
        "cxrkeras cascade $T/tiny-runs/infected $T/tiny-runs/covid --out $T/tiny-runs/infected",
        note=lambda rc, o, e_: "model.keras unchanged: "
        f"{(folders['infected'] / 'model.keras').read_bytes() == before}")
    casc = tmp / "casc"
    rc, _, _ = row("cascade into a new folder, then again into it", [CLI, "cascade", str(folders["infected"]),
                                                                     str(folders["covid"]), "--out", str(casc)],
                   "cxrkeras cascade $T/tiny-runs/infected $T/tiny-runs/covid --out $T/casc")
    row("… second time (folder now holds a cascade)", [CLI, "cascade", str(folders["infected"]), str(folders["covid"]),
                                                      "--out", str(casc)],
        "cxrkeras cascade $T/tiny-runs/infected $T/tiny-runs/covid --out $T/casc")
    row("… with --overwrite", [CLI, "cascade", str(folders["infected"]), str(folders["covid"]), "--out", str(casc),
                              "--overwrite"],
        "cxrkeras cascade $T/tiny-runs/infected $T/tiny-runs/covid --out $T/casc --overwrite")
    row("data synth into a non-empty folder", [CLI, "data", "synth", str(a), "--per-class", "2"],
        "cxrkeras data synth $T/A --per-class 2",
        note=lambda rc, o, e_: f"huge.png still there: {huge.exists()}")

    # --- evaluate with a 250-character name
    if have_model:
        dd = synth(tmp / "D")
        longname = dd / "test/normal" / ("a" * 246 + ".jpg")
        shutil.copy(dd / "test/normal/normal-0000.jpg", longname)
        out = tmp / "evalD"
        row("evaluate, image with a 250-character name", [CLI, "evaluate", str(run_dir), "--data", str(dd),
                                                         "--image", str(longname), "--out", str(out)],
            "cxrkeras evaluate $T/runs/infected/r1 --data $T/D --image $T/D/test/normal/a…a.jpg (250 chars) --out $T/evalD",
            keep=1, timeout=900,
            note=lambda rc, o, e_: f"metrics.json written: {(out / 'metrics.json').exists()}; "
            f"gradcam files: {[p.name[:40] + ('…' if len(p.name) > 40 else '') + f' ({len(p.name)} chars)' for p in out.glob('gradcam*')]}")

    # --- read-only output folder
    ro = tmp / "readonly"
    ro.mkdir()
    os.chmod(ro, 0o555)
    try:
        (ro / "probe").write_text("x")
        (ro / "probe").unlink()
        ROWS.append(("fit --out a chmod 555 folder", "(not run)", "-",
                     "skipped: running as root, chmod 555 does not block writes here"))
    except PermissionError:
        row("fit --out a chmod 555 folder", [CLI, "fit", "infected", "--data", str(a), "--epochs", "1",
                                             "--out", str(ro)], "cxrkeras fit infected --data $T/A --epochs 1 --out $T/readonly")

    # --- a crafted SavedModel
    crafted = tmp / "crafted"
    marker = tmp / "MARKER"
    write_crafted_savedmodel(str(crafted), str(marker))
    row("predict with a crafted SavedModel that writes a file", [CLI, "predict", str(crafted), str(good)],
        f"cxrkeras predict $T/crafted {T(good)}", keep=2,
        note=lambda rc, o, e_: f"marker file written: {marker.exists()}")
    row("… with --trust-model", [CLI, "predict", "--trust-model", str(crafted), str(good)],
        f"cxrkeras predict --trust-model $T/crafted {T(good)}", keep=2,
        note=lambda rc, o, e_: f"marker file written: {marker.exists()}")

    # --- start-up time
    helps = [run([CLI, "--help"])[3] for _ in range(3)]
    imports = [run([PY, "-c", "import tensorflow"])[3] for _ in range(3)]
    usage = run([CLI, "fit", "nosuchtask"])
    ROWS.append(("`--help` wall time vs importing TensorFlow (3 runs each, median)", "cxrkeras --help ; python -c 'import tensorflow'",
                 "0", f"--help {statistics.median(helps):.2f} s ({', '.join(f'{t:.2f}' for t in helps)}); "
                 f"import tensorflow {statistics.median(imports):.2f} s ({', '.join(f'{t:.2f}' for t in imports)})"))
    ROWS.append(("argument error time", "cxrkeras fit nosuchtask", str(usage[0]),
                 f"{meaningful(usage[1], usage[2], 3)} — {usage[3]:.2f} s"))

    print("| item | command | exit | what it prints |")
    print("|---|---|---|---|")
    for r in ROWS:
        print("| " + " | ".join(x.replace("|", "\\|").replace("\n", " ") for x in r) + " |")
    os.chmod(ro, 0o755)
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
