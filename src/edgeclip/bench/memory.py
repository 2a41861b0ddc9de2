"""Peak resident memory and cold load time of one variant, in a fresh Python process.

    python -m edgeclip.bench.memory '{"variant": {...}, "threads": 2, "batch": 8}'

The child imports numpy and the variant's backend library, reads its resident set size (`base`),
loads the variant (both graphs compiled; artifacts verify their checksums), runs the image and the
text graph once at `batch`, and reports the process's peak resident set: `VmHWM` from
/proc/self/status on Linux. Not `ru_maxrss` there: it survives fork + exec, so a child of a bench
process that holds torch would report its parent's size. `ru_maxrss` only where /proc is missing
(macOS). `peak - base` is what loading and running the model added. The child never imports torch
(it says so: `torch_imported`).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

BACKEND_MODULES = {"ort": "onnxruntime", "openvino": "openvino"}


def _status(key: str) -> int | None:
    """A /proc/self/status memory figure (VmRSS, VmHWM) in bytes; None without /proc."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _rss_now() -> int | None:
    return _status("VmRSS")


def _peak() -> int | None:
    hwm = _status("VmHWM")
    if hwm is not None:
        return hwm
    try:
        import resource
    except ImportError:
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)  # bytes on macOS, KiB on Linux


def _child(spec: dict) -> dict:
    import importlib

    import numpy as np

    from .variants import Variant

    variant = Variant.from_dict(spec["variant"])
    importlib.import_module(BACKEND_MODULES.get(variant.backend, variant.backend))
    base = _rss_now()
    t = time.perf_counter()
    runner = variant.open(spec.get("threads"))
    load_s = time.perf_counter() - t
    batch = int(spec.get("batch", 1))
    size = runner.preprocess.output_size or (224, 224)
    runner.image_call(np.zeros((batch, 3, *size), dtype=np.float32))()
    if runner.tokenizer is not None:
        runner.text(runner.tokenizer(["a photo of a dog"] * batch))
    return {"load_s": load_s, "base_rss_bytes": base, "peak_rss_bytes": _peak(), "batch": batch,
            "torch_imported": "torch" in sys.modules}


def measure(variant, threads: int | None, batch: int, timeout: float = 600) -> dict:
    """Run the child for `variant`; on failure, return {"error": ...} rather than stopping the bench."""
    import edgeclip

    env = dict(os.environ)
    src = str(Path(edgeclip.__file__).resolve().parents[1])
    env["PYTHONPATH"] = src + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    arg = json.dumps({"variant": variant.to_dict(), "threads": threads, "batch": batch})
    try:
        proc = subprocess.run([sys.executable, "-m", "edgeclip.bench.memory", arg], capture_output=True, text=True,
                              timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return {"error": f"exit {proc.returncode}: {tail}"}
    return json.loads(lines[-1])


if __name__ == "__main__":
    print(json.dumps(_child(json.loads(sys.argv[1]))))
