"""What the benchmark scripts report about the machine and the process: load, versions, CPU, memory.

The scripts are run as ``python benchmarks/<script>.py``, which puts this folder on ``sys.path``, so they
``import machine``.  Standard library only.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform


def load() -> float:
    """The 1-minute load average, NaN where the platform has none."""
    try:
        return os.getloadavg()[0]
    except OSError:
        return float("nan")


def version(pkg: str) -> str:
    """The installed version of distribution ``pkg``, or ``"not installed"``."""
    try:
        return importlib.metadata.version(pkg)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def cpu_model(fallback: str | None = None) -> str:
    """The CPU's model name from /proc/cpuinfo; else ``platform.processor()``; else ``fallback``
    (``platform.machine()`` when None)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or (platform.machine() if fallback is None else fallback)


def mem_total_gib() -> float:
    """The machine's memory in GiB (MemTotal in /proc/meminfo), NaN where unreadable."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return float("nan")


def hwm_mib() -> float:
    """This process's peak resident set size in MiB: VmHWM in /proc/self/status; where that is
    unreadable, ``ru_maxrss`` (KiB on Linux)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
