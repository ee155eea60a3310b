"""The CPU's name for runpod's import, without a second Python process.

Importing runpod asks py-cpuinfo for the CPU's name (`rp_debugger.PROCESSOR`, shown in its
debug output), and py-cpuinfo answers by starting another Python interpreter that imports
itself and reads every source it knows: 1.2 s on the 2-core test machine, every start, on
the path to the first job. The name is the "model name" line of /proc/cpuinfo on Linux, which
is what py-cpuinfo reports as `brand_raw`; `install` makes py-cpuinfo answer from there (and
leaves it alone where that file has no such line).
"""

from __future__ import annotations

from pathlib import Path

CPUINFO = Path("/proc/cpuinfo")


def model_name(cpuinfo: Path = CPUINFO) -> str | None:
    """The first "model name" of `cpuinfo`, or None."""
    try:
        text = cpuinfo.read_text(errors="replace")
    except OSError:
        return None
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "model name" and value.strip():
            return value.strip()
    return None


def install() -> None:
    """Before runpod is imported: py-cpuinfo's `get_cpu_info` gives the name in this process."""
    name = model_name()
    if name is None:
        return
    import cpuinfo

    cpuinfo.get_cpu_info = lambda: {"brand_raw": name}
