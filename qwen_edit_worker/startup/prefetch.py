"""Read the model's weight files into the page cache while the worker is still importing.

A cold worker spends its first 20-40 s importing torch, transformers and diffusers before it
can read a single weight, and then reads ~58 GB. Reading the files from the process's first
moment (`handler.py` starts it before importing torch) overlaps the two: by the time
`from_pretrained` asks for the weights, much of them is in memory. The files are read in the
order the loader needs them (`model_loader`: the transformer, the VAE and the Lightning LoRA,
which are compiled while the text encoder is still being read). Only files already on disk
are read (nothing is downloaded here), and only when the machine has the memory to keep them
cached; otherwise the reads would evict each other and cost disk bandwidth for nothing.

The imports and the reads share one disk, and the imports' many small reads wait behind large
ones. So the reads run in a process of their own (this file, run as a script), paced: until
`imports_done` is called, the reader pauses after each read as long as the read took, which
leaves the imports half of the disk's time; afterwards it reads without pauses. On an H200
(`benchmarks/import_contention.py` at commit aca92d5, 47 GB, imports alone 23.1 s, raw read 28.7 s):

| how the weights were read | imports done | read done |
| --- | --- | --- |
| a thread of the importing process, 128 KiB reads (before) | 39.2 s | 53.2 s |
| another process, no pauses | 41.5 s | 27.7 s |
| another process, paced at 50% until the imports are done (now) | 29.7 s | 42.8 s |
| another process, paced at 25% | 29.9 s | 52.1 s |

A thread is slower on both counts: each of its reads is a Python call that waits for the
importing interpreter's lock, and that is all that paced it. Where the weights are on a network
file system (a RunPod network volume is MooseFS, mounted through FUSE), the imports do not read
from the same disk and the pauses would cost read time for nothing: there the reader does not
pause (`duty_for`; not measured).

In the worker's image the pauses are not needed either: the image lists the files its start-up
imports (`import_set`, about 4 GB), and the reader reads those first, `FIRST_READERS` at a time,
then the weights without pauses. The imports then find their files in memory.
"""

from __future__ import annotations

import logging
import os
import re
import select
import subprocess
import sys
import sysconfig
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

log = logging.getLogger("qwen_edit_worker.prefetch")

CHUNK = 16 << 20  # the disk's fastest reads (1.5-1.9 GB/s on the H200s' disks)
DUTY = 0.5  # the share of the disk's time the reader takes while the worker imports
HEADROOM = 1.2  # the files must fit in available memory this many times over
FIRST_READERS = 16  # the import set's small files read at once: a disk serves many reads together
GO = b"go\n"  # the worker to the reader: the imports are done, read without pauses
# File systems whose reads do not queue on a local disk: FUSE ones included (MooseFS, RunPod's
# network volumes, mounts as fuse.mfs), unless the libraries are on the same one.
NETWORK_FILE_SYSTEMS = ("nfs", "nfs4", "cifs", "smb3", "smbfs", "ceph", "glusterfs", "lustre", "9p", "fuse")

LOAD_ORDER = ("transformer", "vae", "lightning", "text_encoder")
IMPORT_SET = Path(__file__).with_name("import_set.txt")  # written by `import_set` when the image is built

_reader: subprocess.Popen | None = None


def weight_files(model_path: str, lightning: str | None = None) -> list[Path]:
    """The pipeline's weight files (and the Lightning file), in `LOAD_ORDER`."""
    files = sorted(Path(model_path).glob("*/*.safetensors"))
    if lightning is not None:
        files.append(Path(lightning))

    def rank(file: Path) -> int:
        part = "lightning" if file == Path(lightning or "") else file.parent.name
        return LOAD_ORDER.index(part) if part in LOAD_ORDER else len(LOAD_ORDER)

    return sorted(files, key=rank)  # stable: a component's shards stay in order


def listed_files(manifest: Path | str) -> list[str]:
    """The files named in `manifest`, one per line, that exist (none without it: the worker
    runs outside its image)."""
    try:
        lines = Path(manifest).read_text().splitlines()
    except OSError:
        return []
    return [line for line in lines if line and os.path.isfile(line)]


def available_memory() -> int:
    """MemAvailable from /proc/meminfo, in bytes (0 where it cannot be read)."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return 0


def file_system(path: Path, mountinfo: str | None = None) -> str:
    """The type of the file system `path` is on ("ext4", "overlay", "fuse.mfs"), from
    /proc/self/mountinfo (or `mountinfo`, its text); "" where it cannot be told."""
    if mountinfo is None:
        try:
            mountinfo = Path("/proc/self/mountinfo").read_text()
        except OSError:
            return ""
    target, best, kind = os.path.realpath(path), "", ""
    for line in mountinfo.splitlines():
        fields, _, after = line.partition(" - ")
        if len(parts := fields.split()) < 5 or not after:
            continue
        point = re.sub(r"\\([0-7]{3})", lambda code: chr(int(code[1], 8)), parts[4])  # a space is written \040
        inside = target == point or target.startswith(point.rstrip("/") + "/")
        if inside and len(point) >= len(best):  # the last of stacked mounts is the one seen
            best, kind = point, after.split()[0]
    return kind


def duty_for(weights: Path, libraries: str | None = None, mountinfo: str | None = None) -> float:
    """The reader's share of the disk's time while the worker imports: `DUTY` where the imports
    may read from the same disk as the weights, 1 (no pauses) where the weights are on a network
    file system that the libraries (site-packages, by default) are not on."""
    libraries = libraries or sysconfig.get_path("purelib")
    try:
        if os.stat(weights).st_dev == os.stat(libraries).st_dev:
            return DUTY
    except OSError:
        return DUTY
    return 1.0 if file_system(weights, mountinfo).split(".")[0] in NETWORK_FILE_SYSTEMS else DUTY


def _reads(files: list[Path | str], chunk: int):
    """Read every byte of `files` once, `chunk` bytes at a time, yielding each read's size."""
    buffer = memoryview(bytearray(chunk))
    for file in files:
        with open(file, "rb", buffering=0) as stream:
            while count := stream.readinto(buffer):
                yield count


def read_all(files: list[Path], chunk: int = CHUNK) -> int:
    """Read every byte of `files` once, `chunk` bytes at a time; the bytes read."""
    return sum(_reads(files, chunk))


def read_first(files: list[str]) -> int:
    """Read every byte of `files` (the import set), `FIRST_READERS` files at a time; files
    that cannot be read are skipped. The bytes read."""

    def read_one(file: str) -> int:
        try:
            return read_all([Path(file)], 1 << 20)
        except OSError:
            return 0

    with ThreadPoolExecutor(FIRST_READERS) as pool:
        return sum(pool.map(read_one, files))


def read_paced(files: list[Path | str], control: int, duty: float = DUTY,
               clock: Callable[[], float] = time.perf_counter) -> int:  # fmt: skip
    """The reader's loop: read `files` in `CHUNK`s, after each read waiting on the `control`
    descriptor (the worker's end of a pipe) for `read time × (1 - duty) / duty` until `GO`
    arrives, then not at all; stop when `control` closes (the worker is gone). The bytes read."""
    total, paced, began = 0, True, clock()
    for count in _reads(files, CHUNK):
        total += count
        pause = (clock() - began) * (1 - duty) / duty if paced else 0.0
        if select.select([control], [], [], pause)[0]:
            if not os.read(control, len(GO)):
                return total  # the worker exited or died: nobody needs the rest
            paced = False
        began = clock()
    return total


def start(model_path: str | None, lightning: str | None = None, memory: int | None = None,
          manifest: Path = IMPORT_SET) -> threading.Thread | None:  # fmt: skip
    """Start reading `model_path`'s weights (and the `lightning` file) in a process of its own:
    first the import set listed in `manifest`, if any, then the weights without pauses, or
    without that list paced until `imports_done`. The daemon thread that waits for it and logs
    what it read, or None when there is nothing to read or not enough memory to keep it."""
    global _reader
    if model_path is None:
        return None
    files = weight_files(model_path, lightning)
    first = listed_files(manifest) if files else []
    size = sum(file.stat().st_size for file in files) + sum(os.path.getsize(file) for file in first)
    memory = available_memory() if memory is None else memory
    if not files or size * HEADROOM > memory:
        if files:
            log.info("weights not prefetched: %.1f GB would not stay cached in %.1f GB of free memory", size / 1e9, memory / 1e9)
        return None
    began, duty = time.perf_counter(), 1.0 if first else duty_for(files[0])
    if first:
        how = f"the start-up's {len(first)} files (import_set.txt) first, then the weights without pauses"
    else:
        how = "paced while the worker imports" if duty < 1 else "without pauses (a network file system)"
    log.info("weights prefetch: %.1f GB, %s", size / 1e9, how)
    try:  # -I -S: the reader needs the standard library only, not site-packages' start-up
        reader = subprocess.Popen([sys.executable, "-I", "-S", __file__, str(duty), str(manifest if first else ""),
                                   *map(str, files)], stdin=subprocess.PIPE, stdout=subprocess.PIPE)  # fmt: skip
    except OSError as error:  # best effort: the loader reads the weights anyway
        log.info("weights not prefetched: the reader could not start (%s)", error)
        return None
    _reader = reader

    def wait():
        for line in reader.stdout:
            kind, _, value = line.decode(errors="replace").strip().partition(" ")
            if kind == "first" and value.isdigit():
                seconds = time.perf_counter() - began
                log.info("import set read into memory: %.2f GB in %.1f s", int(value) / 1e9, seconds)
            elif kind == "total" and value.isdigit() and reader.wait() == 0:
                total, seconds = int(value), time.perf_counter() - began
                log.info("weights prefetched into memory: %.1f GB in %.1f s (%.2f GB/s)", total / 1e9, seconds,
                         total / 1e9 / seconds)  # fmt: skip
                return
        # best effort: the loader reads them anyway
        log.info("weights prefetch stopped (the reader's exit status %s)", reader.wait())

    thread = threading.Thread(target=wait, name="weights-prefetch", daemon=True)
    thread.start()
    return thread


def imports_done() -> None:
    """The worker has imported its libraries: the reader reads the rest without pauses."""
    if _reader is None or _reader.poll() is not None:
        return
    try:
        _reader.stdin.write(GO)
        _reader.stdin.flush()
    except OSError:  # it ended meanwhile
        pass


if __name__ == "__main__":  # the reader: python prefetch.py DUTY MANIFEST|"" FILE..., told by its stdin
    try:
        if sys.argv[2]:
            print("first", read_first(listed_files(sys.argv[2])), flush=True)
        print("total", read_paced(sys.argv[3:], sys.stdin.fileno(), float(sys.argv[1])), flush=True)
    except OSError as error:
        sys.exit(f"weights prefetch: {error}")
