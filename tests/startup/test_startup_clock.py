"""Start-up stages are timed from the process's start, not from when the clock module loaded."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_seconds_count_from_the_process_start():
    code = "import time; time.sleep(1.0); from qwen_edit_worker.startup import startup_clock; print(startup_clock.seconds_since_start())"
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert 1.0 <= float(done.stdout) < 30  # the second slept before the import counts
