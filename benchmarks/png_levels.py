"""How long the worker's PNG output encoding takes at each zlib level, and how large it is.

    python3 benchmarks/png_levels.py PHOTO.jpg [--side 1024] [--repeat 5]

Resizes the image to --side² (an output's size) and encodes it as `images.encode_image` does,
at zlib levels 1-6 (6 is Pillow's default, `images.PNG_COMPRESS_LEVEL` the worker's): the
mean milliseconds of --repeat encodes, and the bytes. A CPU measurement: the encode runs on
the worker's CPU after every job.
"""

from __future__ import annotations

import argparse
import io
import sys
import time
from pathlib import Path

from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import images  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("image")
    parser.add_argument("--side", type=int, default=1024)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    picture = Image.open(args.image).convert("RGB").resize((args.side, args.side), Image.BICUBIC)
    print("| zlib level | ms per encode | KiB |\n| --- | --- | --- |")
    for level in (6, 5, 4, 3, 2, 1):
        started = time.perf_counter()
        for _ in range(args.repeat):
            buffer = io.BytesIO()
            picture.save(buffer, format="PNG", compress_level=level)
        ms = (time.perf_counter() - started) / args.repeat * 1000
        mark = " (the worker's)" if level == images.PNG_COMPRESS_LEVEL else " (Pillow's default)" if level == 6 else ""
        print(f"| {level}{mark} | {ms:.0f} | {len(buffer.getvalue()) / 1024:.0f} |")


if __name__ == "__main__":
    main()
