"""What a benchmark ran on: CPU model and the flags that decide INT8/bf16 speed, cores, library versions.

Standard library only (`importlib.metadata` reads versions without importing the libraries)."""
from __future__ import annotations

import os
import platform
import time
from pathlib import Path

# The flags that change which kernels ONNX Runtime / oneDNN pick (INT8 VNNI, bf16, AMX, AVX-512).
SPEED_FLAGS = ("sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni",
               "avx_vnni", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_int8", "amx_bf16", "neon", "asimd",
               "asimddp", "sve")
LIBRARIES = ("edgeclip", "numpy", "pillow", "onnxruntime", "openvino", "nncf", "onnx", "torch")


def cpu_info() -> dict:
    """CPU model name and flags from /proc/cpuinfo (Linux); the platform's processor string elsewhere."""
    model, flags = platform.processor() or platform.machine(), []
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        text = ""
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and value.strip():
            model = value.strip()
        elif key in ("flags", "Features") and not flags:
            flags = value.split()
    return {"model": model, "flags": flags, "speed_flags": [f for f in SPEED_FLAGS if f in flags]}


def library_versions() -> dict:
    from ..exporter.artifact import tool_versions

    return tool_versions(LIBRARIES)


def machine() -> dict:
    """Everything a reader needs to judge where figures came from (and how busy the machine was)."""
    try:
        usable = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        usable = os.cpu_count()
    info = {"cpu": cpu_info(), "cores": os.cpu_count(), "cores_usable": usable, "os": platform.platform(),
            "machine": platform.machine(), "libraries": library_versions(),
            "measured": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    try:
        info["loadavg_1m"] = round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        pass
    try:
        info["memory_bytes"] = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        pass
    return info
