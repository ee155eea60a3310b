"""runpod's import names the CPU without starting a second Python process (`cpu_name`)."""

from __future__ import annotations

import subprocess
import sys

from qwen_edit_worker.startup import cpu_name
from tests.test_handler import ROOT

# The worker's own imports (`import handler`), listing the Python interpreters they start
# (`uname -p` and `file -b` for the platform module are quick; another Python is not).
IMPORT_HANDLER = """
import os, subprocess, sys
started = []
real = subprocess.Popen.__init__
def counted(self, args, *rest, **kwargs):
    if os.path.basename(str(args[0])).startswith("python") or args[0] == sys.executable:
        started.append(args)
    real(self, args, *rest, **kwargs)
subprocess.Popen.__init__ = counted
import handler
from runpod.serverless.utils import rp_debugger
print("STARTED", started)
print("PROCESSOR", rp_debugger.PROCESSOR)
"""


def test_importing_the_worker_starts_no_process_to_name_the_cpu(tiny_env):
    done = subprocess.run([sys.executable, "-c", IMPORT_HANDLER], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={**tiny_env(), "PATH": "/usr/bin:/bin", "RUNPOD_SKIP_AUTO_SYSTEM_CHECKS": "true"})  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    lines = dict(line.split(" ", 1) for line in done.stdout.splitlines() if line.startswith(("STARTED", "PROCESSOR")))
    assert lines["STARTED"] == "[]"  # py-cpuinfo used to run itself in a new interpreter here (1.2 s)
    assert lines["PROCESSOR"] == cpu_name.model_name()


def test_the_model_name_is_read_from_cpuinfo(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nvendor_id\t: GenuineIntel\nmodel name\t: Intel(R) Xeon(R) Platinum 8480C\n\n"
                       "processor\t: 1\nmodel name\t: Intel(R) Xeon(R) Platinum 8480C\n")  # fmt: skip
    assert cpu_name.model_name(cpuinfo) == "Intel(R) Xeon(R) Platinum 8480C"
    cpuinfo.write_text("processor\t: 0\nBogoMIPS\t: 50.00\n")  # an ARM machine's: no model name
    assert cpu_name.model_name(cpuinfo) is None
    assert cpu_name.model_name(tmp_path / "missing") is None
