"""Wall time of `cxrkeras --help` and of `cxrkeras data check DATA` (a cold and a warm check), in fresh processes.

    python benchmarks/cli_speed.py [--data ../shared/cxr-dataset] [--repeat 3] [--src OTHER_CHECKOUT]

`--src` times another checkout of cxrkeras (e.g. an older commit unpacked with
`git archive`) with this Python, so two versions are compared in one run on
one machine. A cold check starts from an empty verdict cache
(CXRKERAS_CACHE_DIR in a fresh temporary folder); a warm one reuses it.
"""

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_DATA = os.path.join(ROOT, "..", "shared", "cxr-dataset")

# Run cxrkeras' CLI from the checkout in argv[1], not from whatever is installed (editable installs included).
LAUNCH = """
import sys
sys.meta_path = [f for f in sys.meta_path if "editable" not in type(f).__name__.lower()]
sys.path.insert(0, sys.argv.pop(1))
from cxrkeras.cli import main
main(sys.argv[1:], prog_name="cxrkeras")
"""


def timed(src, args, env):
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", LAUNCH, src, *args], capture_output=True, text=True, env=env)
    seconds = time.perf_counter() - start
    if done.returncode not in (0, 1):
        raise SystemExit(f"cxrkeras {' '.join(args)} failed ({done.returncode}):\n{done.stderr[-2000:]}")
    return seconds


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=DEFAULT_DATA)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--src", default=ROOT, help="the cxrkeras checkout to time [this one]")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    src = os.path.abspath(args.src)
    results = {"machine": f"{platform.machine()}, {os.cpu_count()} CPU cores", "src": src, "help": [], "check_cold": [],
               "check_warm": []}
    for _ in range(args.repeat):
        with tempfile.TemporaryDirectory() as cache:
            env = {**os.environ, "CXRKERAS_CACHE_DIR": cache}
            results["help"].append(timed(src, ["--help"], env))
            results["check_cold"].append(timed(src, ["data", "check", args.data], env))
            results["check_warm"].append(timed(src, ["data", "check", args.data], env))
    if args.json:
        print(json.dumps(results, indent=2))
        return
    print(f"{src} on {results['machine']}")
    for key in ("help", "check_cold", "check_warm"):
        values = sorted(results[key])
        print(f"{key:<11} median {values[len(values) // 2]:6.2f} s   (runs: {', '.join(f'{v:.2f}' for v in values)})")


if __name__ == "__main__":
    main()
