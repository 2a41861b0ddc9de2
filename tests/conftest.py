"""Shared test fixtures: one session-wide cache of exported artifacts.

Exports are the slow part of this suite (torch.export tracing: ~10 s for builtin:tiny, ~45 s for a
B-sized random model, single-threaded), and several modules read the very same artifact (builtin:tiny
to ONNX FP32 with the digit words baked in is read by the runtime, INT8, OpenVINO, fusion and export
tests). `shared_exports` exports each distinct (model, target, precision, options) once per session,
in a background process, two at a time (a 2-core machine: tracing uses one core), and starts every
export the selected tests will need up front, in test order, so they are ready or under way by the
time a test asks. Tests read the artifacts; none may write into one (copy it first). A planned
export's folder is removed as soon as the last selected test that declared it has run (the suite's
disk use stays at a few GB rather than the ~15 GB of every B-sized export at once).

What a module needs is declared beside its fixtures, so the plan follows the selected tests:
- `SHARED_EXPORTS = {fixture name: [spec, ...] or a function of the cache returning the list}`: the
  exports a module fixture reads, planned for every selected test that uses that fixture;
- `test.exports = (spec or function of the test's parameters, ...)` on a test function (test_export_onnx's
  `needs` decorator): the exports that test reads.
A spec is a dict of `edgeclip.export` arguments: `model` (a URI: builtin:tiny, random:SPEC, loaded
with seed 0), `target` (default onnx), `precision` (default the target's first) and options, or
`{"cli": [argv after "edgeclip"]}` for an export through the command line (`--out` is appended).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import pytest

# test helpers (hf_layouts.py) live beside the tests
sys.path.insert(0, str(Path(__file__).parent))

# A worker process: exports one job per line read on stdin ({"model", "target", "precision", "out",
# "options"}), answers one line each on its own copy of stdout (anything else the exporters print goes
# to stderr, a log file). Imports, the first export's warm-up and loading a model (random B-sized
# weights: ~10 s) are paid once per worker and model, not per export: exports deep-copy the model
# they are given and never change it (test_export_never_mutates_the_callers_model).
WORKER = r"""
import json, os, sys, time, traceback
proto = os.fdopen(os.dup(1), "w")
os.dup2(2, 1)
import torch
torch.set_num_threads(1)  # two of these run side by side on a 2-core machine
import edgeclip
held = (None, None)
for line in sys.stdin:
    a = json.loads(line)
    cpu = time.process_time()
    try:
        if held[0] != a["model"]:
            held = (None, None)
            held = (a["model"], edgeclip.load_model(a["model"], seed=0))
        edgeclip.export(held[1], target=a["target"], precision=a["precision"], out=a["out"], **a["options"])
        answer = {"ok": True}
    except BaseException:
        answer = {"ok": False, "error": traceback.format_exc()}
    answer["cpu_s"] = time.process_time() - cpu
    proto.write(json.dumps(answer) + "\n")
    proto.flush()
"""
WINDOW = 4  # a free worker looks this far down the queue for a job on the model it holds


def _key(spec: dict) -> str:
    """The cache key of a spec: the export's arguments with the defaults filled in."""
    if "cli" in spec:
        return json.dumps({"cli": [str(a) for a in spec["cli"]]})
    from edgeclip.exporter import get_target

    opts = {k: v for k, v in spec.items() if k not in ("model", "target", "precision")}
    target = spec.get("target", "onnx")
    precision = spec.get("precision") or get_target(target).precisions[0]
    return json.dumps({"model": spec["model"], "target": target, "precision": precision, "options": opts},
                      sort_keys=True, default=str)


class SharedExports:
    """Session cache: exported artifact folders, each exported once, in background worker processes.

    Jobs run in the order they were submitted (test order), except that a free worker first takes a
    job among the next few on the model it already holds, and leaves those on a model another worker
    holds to that worker (the FP32 and FP16 exports of one model load it once)."""

    def __init__(self, root: Path, workers: int = 2):
        self.root = root
        self.jobs: dict[str, Future] = {}
        self.pending: list[tuple[str, dict, Path, Future]] = []
        self.holding: dict[int, str | None] = {i: None for i in range(workers)}
        self.cond = threading.Condition()
        self.closed = self.started = False
        self.threads = [threading.Thread(target=self._serve, args=(i,), daemon=True, name=f"shared-export-{i}")
                        for i in range(workers)]
        self.procs: list[subprocess.Popen] = []
        self.seconds: dict[str, float] = {}
        self.cpu: dict[str, float] = {}
        self._once: dict[str, object] = {}
        self.folders: dict[str, Path] = {}
        self.count = 0
        self.users: dict[str, set[str]] = {}  # key -> the planned tests that still read it
        self.needs: dict[str, set[str]] = {}  # test id -> the keys it reads

    def submit(self, spec: dict) -> Future:
        k = _key(spec)
        with self.cond:
            if k not in self.jobs:
                a = json.loads(k)
                stem = "cli" if "cli" in a else f"{a['model'].split(':')[-1]}-{a['precision']}"
                # the folder is named like the export (bench reports name variants after their folder)
                out = self.root / f"{self.count:02d}" / stem
                self.count += 1
                out.parent.mkdir(parents=True)
                self.folders[k] = out.parent
                self.jobs[k] = Future()
                self.pending.append((k, a, out, self.jobs[k]))
                if not self.started:
                    self.started = True
                    for t in self.threads:
                        t.start()
                self.cond.notify_all()
            return self.jobs[k]

    def plan(self, test: str, spec: dict) -> None:
        """Export `spec` for `test`; its folder is removed once every test planned to read it ran."""
        self.submit(spec)
        k = _key(spec)
        self.users.setdefault(k, set()).add(test)
        self.needs.setdefault(test, set()).add(k)

    def ran(self, test: str) -> None:
        """`test` is over: drop the exports no later test reads (B-sized ones are 0.5-2 GB each)."""
        for k in self.needs.pop(test, ()):
            users = self.users.get(k, set())
            users.discard(test)
            if not users:
                self._drop(k)

    def _drop(self, k: str) -> None:
        with self.cond:
            fut = self.jobs.pop(k, None)  # a later unplanned request exports it again
            self.users.pop(k, None)
            self.pending = [j for j in self.pending if j[0] != k]
            folder = self.folders.pop(k)
        if fut is not None and fut.cancel():
            shutil.rmtree(folder, ignore_errors=True)
        elif fut is not None:
            fut.add_done_callback(lambda _f: shutil.rmtree(folder, ignore_errors=True))

    def path(self, spec: dict) -> Path:
        """The artifact folder of `spec` (waits for its export; exports it now if it was not planned)."""
        return self.submit(spec).result()

    def get(self, spec: dict):
        """The artifact of `spec` as `edgeclip.export` returns it (folder and manifest)."""
        from edgeclip.exporter.artifact import Artifact

        return Artifact.open(self.path(spec), verify=False)

    def once(self, name: str, make):
        """`make(folder)` run once per session in its own folder (data that planned exports read)."""
        with self.cond:
            if name not in self._once:
                folder = self.root / "data" / name
                folder.mkdir(parents=True)
                self._once[name] = make(folder)
            return self._once[name]

    def _next(self, me: int):
        """The job worker `me` runs next (called holding the lock, with jobs pending)."""
        window = self.pending[:WINDOW]
        # (only random-weight models are worth keeping: builtin:tiny loads in a moment)
        models = [m if m and m.startswith("random:") else None for m in (j[1].get("model") for j in window)]
        others = {m for w, m in self.holding.items() if w != me} - {None}
        if self.holding[me] is not None and self.holding[me] in models:
            i = models.index(self.holding[me])
        else:
            i = next((i for i, m in enumerate(models) if m is None or m not in others), 0)
        return self.pending.pop(i)

    def _serve(self, me: int) -> None:
        local = threading.local()
        while True:
            with self.cond:
                while not self.pending and not self.closed:
                    self.cond.wait()
                if self.closed:
                    return
                k, a, out, fut = self._next(me)
                if "model" in a:
                    self.holding[me] = a["model"] if a["model"].startswith("random:") else None
            if not fut.set_running_or_notify_cancel():
                continue
            try:
                fut.set_result(self._export(local, k, a, out))
            except BaseException as e:  # the test that reads it reports it
                fut.set_exception(e)

    def _start(self, cmd: list[str], log: Path, **kw) -> subprocess.Popen:
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        with self.cond, open(log, "ab") as err:
            proc = subprocess.Popen(cmd, stderr=err, env=env, **kw)
            self.procs.append(proc)
        return proc

    def _export(self, local, k: str, a: dict, out: Path) -> Path:
        start = time.perf_counter()
        if "cli" in a:  # the command line in its own process, as a user runs it
            log = out.parent / "export.log"
            proc = self._start([sys.executable, "-m", "edgeclip.cli", *a["cli"], "--out", str(out)], log,
                               stdout=subprocess.DEVNULL)
            ok, error = proc.wait() == 0, f"exit status {proc.returncode}"
        else:
            worker = getattr(local, "worker", None)
            if worker is None or worker.poll() is not None:  # (re)start this thread's worker process
                local.log = self.root / f"worker-{len(self.procs)}.log"
                worker = local.worker = self._start([sys.executable, "-c", WORKER], local.log,
                                                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
            log = local.log
            worker.stdin.write(json.dumps({**a, "out": str(out)}) + "\n")
            worker.stdin.flush()
            line = worker.stdout.readline()
            answer = json.loads(line) if line else {"ok": False, "error": "the worker process died"}
            ok, error = answer["ok"], answer.get("error")
            self.cpu[k] = answer.get("cpu_s", 0.0)
        self.seconds[k] = time.perf_counter() - start
        if not ok:
            tail = log.read_text(errors="replace")[-3000:] if log.is_file() else ""
            raise RuntimeError(f"export {k} failed: {error}\n{tail}")
        return out

    def close(self) -> None:
        with self.cond:
            self.closed = True
            for _, _, _, fut in self.pending:
                fut.cancel()
            self.pending.clear()
            self.cond.notify_all()
            procs = list(self.procs)
        for proc in procs:
            if proc.stdin:
                proc.stdin.close()  # a worker's end of input: it exits
        for proc in procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:  # an interrupted run: an export still going
                proc.kill()
                proc.wait()
            if proc.stdout:
                proc.stdout.close()
        for t in self.threads:
            if t.is_alive():
                t.join(timeout=10)


def _plan(session, cache: SharedExports) -> list[tuple[str, dict]]:
    """Every (test id, spec) the selected tests declare, in test order."""
    plan, resolved = [], {}
    for item in session.items:
        module = getattr(item, "module", None)
        declared = getattr(module, "SHARED_EXPORTS", {})
        for name in item.fixturenames:
            if name in declared:
                if (module, name) not in resolved:
                    specs = declared[name]
                    resolved[module, name] = specs(cache) if callable(specs) else specs
                plan += [(item.nodeid, spec) for spec in resolved[module, name]]
        params = item.callspec.params if hasattr(item, "callspec") else {}
        for spec in getattr(getattr(item, "function", None), "exports", ()):
            plan.append((item.nodeid, spec(params) if callable(spec) else spec))
    return plan


_CACHE: list[SharedExports] = []


@pytest.fixture(scope="session", autouse=True)
def shared_exports(request, tmp_path_factory):
    cache = SharedExports(tmp_path_factory.mktemp("shared-exports"))
    _CACHE.append(cache)
    try:
        for test, spec in _plan(request.session, cache):
            cache.plan(test, spec)
        yield cache
    finally:
        cache.close()


def pytest_runtest_logfinish(nodeid, location):
    for cache in _CACHE:
        cache.ran(nodeid)


def pytest_terminal_summary(terminalreporter):
    for cache in _CACHE:
        if cache.seconds:
            write = terminalreporter.write_line
            write(f"shared exports: {len(cache.seconds)} exported once each in background processes, "
                  f"{sum(cache.seconds.values()):.0f} s in all ({sum(cache.cpu.values()):.0f} s of worker CPU); "
                  "slowest:")
            for k, sec in sorted(cache.seconds.items(), key=lambda kv: -kv[1])[:10]:
                write(f"  {sec:7.1f} s  (CPU {cache.cpu.get(k, 0):6.1f} s)  {k[:150]}")
