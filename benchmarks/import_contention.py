"""How long a cold worker's imports take while its weights are read from the same disk.

    python3 benchmarks/import_contention.py --dir /tmp/contention --size-gb 40 --trials alone,weights-128,paced

Writes one file of --size-gb once (the weights' stand-in). Each trial drops the page cache and
starts a fresh process that imports what the worker imports before it loads (torch,
transformers, diffusers' pipeline), with, in the background:
- `alone`: nothing (the imports on a cold disk by themselves);
- `weights`: a thread of the importing process reads the file, `prefetch.CHUNK` (16 MiB) at a
  time (`weights-128`: 128 KiB at a time, how the worker read before its reader moved to a
  process of its own);
- `libraries`: first the shared libraries the imports map (torch's and the CUDA wheels' `lib`
  folders, files over 1 MB), then the file;
- `weights-K`: the same thread, K KiB at a time;
- `process`: the same 16 MiB reads from another process, without pauses: the imports then
  share the disk with the reads but not their interpreter (a thread's every read is a Python
  call that takes the interpreter's lock); `process-K`: K KiB at a time;
- `paced-P`: from another process in 16 MiB reads, the worker's reader (`prefetch.py` run as
  the worker runs it), busy at most P% of the time until the imports are done (a pause
  after each read), then without pauses: the imports' small reads get the disk in the pauses.
  `paced`: at `prefetch.DUTY`, as the worker reads.
It prints when the imports ended and when the read ended, in seconds after the process started.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import prefetch  # noqa: E402
from cold_start import drop_page_cache  # noqa: E402

CHILD = """
import json, subprocess, sys, threading, time
sys.path.insert(0, {root!r})
import prefetch, startup_clock
from pathlib import Path
trial, big = sys.argv[1], Path(sys.argv[2])
kind, _, kib = trial.partition("-")
chunk = int(kib) << 10 if kib else prefetch.CHUNK
ended = {{}}
if kind == "paced":  # the worker's own reader, told through its stdin when the imports are done
    duty = int(kib) / 100 if kib else prefetch.DUTY
    paced_reader = subprocess.Popen([sys.executable, "-I", "-S", prefetch.__file__, str(duty), str(big)],
                                    stdin=subprocess.PIPE, stdout=subprocess.DEVNULL)
def read():
    if trial == "libraries":
        files = big_libraries()
        ended["libraries"] = (round(prefetch.read_all(files) / 1e9, 2), round(startup_clock.seconds_since_start(), 1))
    if kind == "paced":
        paced_reader.wait()
    elif kind == "process":
        code = f"import sys; sys.path.insert(0, {{{root!r}!r}}); import prefetch; prefetch.read_all([{{str(big)!r}}], {{chunk}})"
        subprocess.run([sys.executable, "-c", code], check=True)
    else:
        prefetch.read_all([big], chunk)
    ended["read"] = round(startup_clock.seconds_since_start(), 1)
def big_libraries():
    import importlib.util
    folders = [Path(importlib.util.find_spec("torch").submodule_search_locations[0], "lib")]
    for location in importlib.util.find_spec("nvidia").submodule_search_locations:
        folders += sorted(Path(location).glob("*/lib"))
    return [f for folder in folders for f in sorted(folder.iterdir()) if f.is_file() and f.stat().st_size > 1 << 20]
reader = threading.Thread(target=read, daemon=True)
if trial != "alone":
    reader.start()
import torch
ended["torch"] = round(startup_clock.seconds_since_start(), 1)
import transformers
from diffusers.pipelines.qwenimage.pipeline_qwenimage_edit_plus import QwenImageEditPlusPipeline
torch.zeros(1, device="cuda" if torch.cuda.is_available() else "cpu")
ended["imports"] = round(startup_clock.seconds_since_start(), 1)
if kind == "paced":
    try:
        paced_reader.stdin.write(prefetch.GO)
        paced_reader.stdin.flush()
    except BrokenPipeError:  # it has read everything already
        pass
reader.join() if trial != "alone" else None
print("RESULT " + json.dumps(ended), flush=True)
"""


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dir", required=True)
    parser.add_argument("--size-gb", type=float, default=40)
    parser.add_argument("--trials", default="alone,weights,libraries")
    args = parser.parse_args()
    big = Path(args.dir, "weights.bin")
    if not big.exists():
        big.parent.mkdir(parents=True, exist_ok=True)
        chunk = os.urandom(64 << 20)
        with open(big, "wb") as out:
            for _ in range(max(1, round(args.size_gb * 1000 / 64))):
                out.write(chunk)
    how = drop_page_cache([big])
    start = time.perf_counter()
    prefetch.read_all([big], chunk=16 << 20)
    print(f"raw read of {big.stat().st_size / 1e9:.1f} GB after {how}: {time.perf_counter() - start:.1f} s", flush=True)
    for trial in args.trials.split(","):
        drop_page_cache([big])
        done = subprocess.run([sys.executable, "-c", CHILD.format(root=str(ROOT)), trial, str(big)], capture_output=True,
                              text=True, timeout=300)  # fmt: skip
        lines = [line[7:] for line in done.stdout.splitlines() if line.startswith("RESULT ")]
        print(json.dumps({"trial": trial, **(json.loads(lines[0]) if lines else {"failed": done.stderr[-1500:]})}), flush=True)


if __name__ == "__main__":
    main()
