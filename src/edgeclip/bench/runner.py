"""`run_bench`: artifacts (+ baselines) -> one report dict: latency, load time, memory, size, fidelity.

Order matters on a small machine: inputs are checked first (artifacts, eval folder, model), then the
heavy one-off work (baselines, the torch reference, fidelity, memory subprocesses), and the timing
last, with torch's threads idle. Every latency figure comes from interleaved rounds (`timing.py`).
"""
from __future__ import annotations

import gc
import shlex
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .. import __version__
from ..errors import CalibrationError, UnknownModelError
from ..heads.zero_shot import resolve_templates
from ..runtime.labels import spec_templates
from ..runtime.manifest import read_manifest
from . import fidelity as fid
from .machine import machine
from .memory import measure as measure_memory
from .progress import Progress
from .sizes import artifact_sizes, known_weights, overall_bits, tower_weights
from .timing import Interleaved
from .variants import Variant, _tools, artifact_variant

SCHEMA = "edgeclip-bench-report/1"
PROMPT = "a photo of a dog"
METHOD = {
    "latency": "All variants are timed in the same run, interleaved: in each round every variant takes one "
               "turn, in alternating order (A B C, then C B A); a turn is {warm} untimed call(s) then a block "
               "of timed calls. Rounds continue until the time budget ({seconds:g} s per variant per "
               "configuration) is spent, at least {min_rounds} rounds, after 2 discarded warm-up rounds. "
               "p50/p90/p99 are over every timed call; throughput = batch / p50.",
    "ratios": "Ratios come from the interleaved rounds: the median over rounds of (variant's turn median / base's turn median in the same "
              "round), base = {base}: paired within each round, so drifting machine load cancels. < 1 means "
              "faster than the base.",
    "image_call": "image: the image graph on preprocessed float32 pixels (preprocessing not included).",
    "text_call": "text: token ids to normalized features; artifacts trim after the end token when their "
                 "manifest allows it, baselines run the full context length.",
    "memory": "peak resident set (VmHWM; ru_maxrss without /proc) of a fresh Python process that imports numpy and the backend, "
              "loads the variant (both graphs) and runs each graph once at batch {batch}; 'added' = peak minus "
              "the resident set after the imports. The same child times the cold load (artifacts include "
              "checksum verification).",
    "size": "per graph, the bytes of its files (graph, OpenVINO weights file, package folder); bits/weight = "
            "those bits over the weights the graph holds: its tower's parameters in the model as loaded (before "
            "any folding, so every variant of one model shares the denominator), plus a baked zero-shot head. "
            "Artifacts report it in their manifest; for older artifacts and baselines it is counted from the "
            "files and the rebuilt model (empty where the model is not known).",
    "fidelity": "cosine of L2-normalized features to the FP32 reference on the same inputs (mean and min); "
                "top-1 agreement = share of images whose zero-shot top-1 matches the reference's; "
                "zero-shot top-1 = accuracy against the --eval folder labels (prompt ensemble per class).",
}


@dataclass
class BenchConfig:
    artifacts: list
    batches: list = field(default_factory=lambda: [1])
    threads: list = field(default_factory=lambda: [None])
    seconds: float = 2.0
    eval_dir: str | None = None
    labels: object = None
    templates: list | None = None
    eval_limit: int = 1000
    baselines: bool = False
    model: str | None = None
    calib: str | None = None
    cache: str | None = None
    report: str | None = None
    inference_precision: str | None = None
    memory: bool = True
    min_rounds: int = 5
    progress: bool = True
    command: str = ""

    def __post_init__(self):
        from .quick import check_seconds

        check_seconds(self.seconds)


def _unique_names(variants: list[Variant]) -> None:
    """Folder names, made unique with the parent folder (then a counter) where two collide."""
    for v in variants:
        if sum(w.name == v.name for w in variants) > 1:
            v.name = f"{Path(v.path).parent.name}/{Path(v.path).name}"
    seen: dict[str, int] = {}
    for v in variants:
        seen[v.name] = seen.get(v.name, 0) + 1
        if seen[v.name] > 1:
            v.name = f"{v.name}#{seen[v.name]}"


class Bench:
    def __init__(self, cfg: BenchConfig):
        self.cfg = cfg
        self.notes: list[str] = []
        self.variants = [artifact_variant(a, inference_precision=cfg.inference_precision) for a in cfg.artifacts]
        _unique_names(self.variants)
        self.first = self.variants[0]
        self.eval_set = fid.read_eval(cfg.eval_dir, cfg.labels, cfg.eval_limit) if cfg.eval_dir else None
        # step weights: model 1, baselines 2, load 1, fidelity 1, memory 2, each timed configuration 2
        total = 3 + 2 * cfg.baselines + 2 * cfg.memory + 2 * (2 * len(cfg.batches) * len(cfg.threads))
        self.progress = Progress(total=total, enabled=cfg.progress)

    # ------------------------------------------------------------------------------- model + probe

    def _model(self):
        from .reference import rebuild

        uri = self.cfg.model or self.first.source
        self.progress.step(f"rebuilding the FP32 reference model {uri or '(unknown)'}", 1)
        model, why = rebuild(uri, explicit=self.cfg.model is not None)
        if model is None and self.cfg.baselines:
            raise UnknownModelError(f"--baselines builds from the model, and {why}")
        if model is not None:
            if self.cfg.model is None:
                self.notes.append(f"model rebuilt from the manifest's source '{uri}'")
            mismatch = [v.name for v in self.variants if v.model != model.spec.name]
            if mismatch:
                self.notes.append(f"{', '.join(mismatch)}: another model than {model.spec.name}; no fidelity figures")
        return model, why, uri

    def _probe(self, companion: Variant, spec_size):
        prep, tok, m = _tools(Path(companion.path))
        templates = None
        if self.eval_set is not None:  # the model's own prompts (spec data), unless --templates says otherwise
            templates = resolve_templates(self.cfg.templates, spec_templates(m["model"].get("spec") or {}))
        return fid.make_probe(prep, tok, self.eval_set, templates, prep.output_size or spec_size), prep, tok

    def _sizes(self, model) -> None:
        """Artifacts exported before manifests had `sizes`: weights from the rebuilt model, when it is theirs."""
        unknown = []
        for v in self.variants:
            if known_weights(v.sizes):
                continue
            if model is not None and v.model == model.spec.name:
                v.sizes = artifact_sizes(read_manifest(Path(v.path), verify=False), tower_weights(model))
            if not known_weights(v.sizes):
                unknown.append(v.name)
        if unknown:
            self.notes.append(f"{', '.join(unknown)}: no sizes in the manifest (an older export) and no rebuilt "
                              "model of theirs to count weights with (nor, for adapter heads, their sizes); "
                              "bits/weight left empty")

    # ------------------------------------------------------------------------------------ baselines

    def _calibration(self, model, prep, tok, probe):
        """NNCF's calibration inputs: --calib, else the built-in model's own set, else the eval images,
        else the probe's synthetic images; captions: the built-in set, else the probe's prompts."""
        from .. import builtin

        builtin_model = (getattr(model, "source", "") or "").startswith("builtin:")
        if self.cfg.calib:
            files = sorted(p for p in Path(self.cfg.calib).rglob("*") if p.suffix.lower() in fid.IMAGE_EXTS)[:300]
            if not files:
                raise CalibrationError(f"--calib {self.cfg.calib}: no images ({', '.join(fid.IMAGE_EXTS)}) found; "
                                       "pass a folder of representative images")
            where = f"{len(files)} images from {self.cfg.calib}"
        elif builtin_model:
            files = sorted(builtin.calib_dir().glob("*.png"))
            where = f"the built-in model's {len(files)} calibration images and captions"
        elif self.eval_set is not None:
            files = self.eval_set.files[:: max(1, len(self.eval_set.files) // 100)][:100]
            where = f"{len(files)} images of the --eval folder"
        else:
            files, where = [], "synthetic images (pass --calib DIR for representative ones)"
        pixels = prep([str(f) for f in files]) if files else probe.pixels
        ids = tok(builtin.calib_captions(), truncate=True) if builtin_model else probe.ids
        return pixels, ids, where

    def _baselines(self, model, companion, prep, tok, probe) -> list[Variant]:
        from . import baselines

        cfg = self.cfg
        pixels, ids, where = self._calibration(model, prep, tok, probe)
        ov = baselines.openvino_available()
        ov_fp32 = any(v.backend == "openvino" for v in self.variants)
        key = baselines.cache_key(model.source, pixels, ids, {"ov": ov, "ov_fp32": ov_fp32})
        root = Path(cfg.cache) if cfg.cache else (Path(cfg.report).parent / ".edgeclip-baselines" if cfg.report
                                                  else Path(tempfile.gettempdir()) / "edgeclip-baselines")
        self.progress.step("building baselines (torch.onnx.export, quantize_dynamic, OpenVINO + NNCF)", 2)
        built = baselines.build(model, root / key, companion.path, pixels, ids, openvino=ov, openvino_fp32=ov_fp32,
                                inference_precision=cfg.inference_precision, key=key, log=self.progress.log)
        if not ov:
            self.notes.append("OpenVINO + NNCF baseline skipped: openvino/nncf not installed "
                              "(pip install 'edgeclip[openvino]')")
        else:
            self.notes.append(f"NNCF baseline calibrated on {where}")
        return built

    # ------------------------------------------------------------------------------------- fidelity

    def _fidelity(self, ref_runner, runners: dict, probe, ref_model: str) -> dict:
        self.progress.step("fidelity against the FP32 reference", 1)
        ref = fid.features(ref_runner, probe) if ref_runner is not None else None
        out = {}
        for i, (name, r) in enumerate(runners.items()):
            if r.variant.model == ref_model:
                out[name] = fid.compare(fid.features(r, probe), ref, probe)
            else:  # another model: its features live in another space
                out[name] = {"note": f"model {r.variant.model} differs from the reference's ({ref_model})"}
            self.progress.update((i + 1) / len(runners))
        if ref is not None and probe.targets is not None:
            out["__reference__"] = {"zero_shot_top1": float(np.mean(fid._predict(ref, probe.n_classes) == probe.targets))}
        return out

    # --------------------------------------------------------------------------------------- timing

    def _time(self, runners: dict, graph: str, batch: int, threads) -> dict:
        cfg = self.cfg
        fns = {}
        rng = np.random.default_rng(0)
        for name, r in runners.items():
            if graph == "image":
                size = r.preprocess.output_size or (224, 224)
                fns[name] = r.image_call(rng.normal(size=(batch, 3, *size)).astype(np.float32))
            elif r.tokenizer is not None:
                ids = r.tokenizer([PROMPT] * batch)
                fns[name] = (lambda r=r, ids=ids: r.text(ids))
        self.progress.step(f"timing {graph} batch {batch} threads {threads or 'default'} ({len(fns)} variants)", 2)
        timer = Interleaved(fns).run(cfg.seconds * len(fns), min_rounds=cfg.min_rounds, tick=self.progress.update)
        results = {n: timer.stats(n, batch) for n in fns}
        base = self.base if self.base in fns else next(iter(fns))
        ratios = {a: {b: timer.paired_ratio(a, b) for b in fns} for a in fns}
        return {"graph": graph, "batch": batch, "threads": threads, "rounds": timer.rounds, "block": timer.block,
                "warm": timer.warm, "budget_s": cfg.seconds * len(fns), "base": base, "results": results,
                "ratio_vs_base": {n: ratios[n][base] for n in fns}, "ratios": ratios}

    # ------------------------------------------------------------------------------------------ run

    def run(self) -> dict:
        cfg = self.cfg
        model, why, uri = self._model()
        self._sizes(model)
        companion = next((v for v in self.variants if model is not None and v.model == model.spec.name), self.first)
        spec_size = (model.spec.vision.image_size,) * 2 if model is not None else (224, 224)
        probe, prep, tok = self._probe(companion, spec_size)
        baselines = self._baselines(model, companion, prep, tok, probe) if cfg.baselines else []
        variants = self.variants + baselines
        self.base = "plain-onnx-fp32" if baselines else self.first.name
        threads0 = cfg.threads[0]
        self.progress.step("loading variants", 1)
        runners = {v.name: v.open(threads0) for v in variants}
        ref_runner, reference = self._reference(model, why, uri, runners)
        fidelity = self._fidelity(ref_runner, runners, probe, reference.get("model") or companion.model)
        del model, ref_runner
        gc.collect()
        memory = self._memory(variants)
        latency = []
        for threads in cfg.threads:
            if threads != threads0:
                runners = {v.name: v.open(threads) for v in variants}
            for graph in ("image", "text"):
                for batch in cfg.batches:
                    latency.append(self._time(runners, graph, batch, threads))
            info = {name: r.info() for name, r in runners.items()}
            load_s = {name: r.load_s for name, r in runners.items()}
            if threads == threads0:
                info0, load0 = info, load_s
        self.progress.close()
        return self._assemble(variants, info0, load0, memory, fidelity, latency, probe, reference)

    def _reference(self, model, why, uri, runners):
        if model is not None:
            from .reference import TorchReference

            return TorchReference(model), {"kind": "torch", "source": uri, "model": model.spec.name,
                                           "description": f"the FP32 torch model ({uri})"}
        fp32 = next((v for v in self.variants if v.precision == "fp32"), None)
        if fp32 is None:
            self.notes.append(f"no FP32 reference: {why}, and no FP32 artifact in the set; fidelity "
                              "shows accuracy only")
            return None, {"kind": None, "note": why}
        note = f"the torch model could not be rebuilt ({why}); the FP32 artifact '{fp32.name}' is the reference"
        self.notes.append(note)
        return runners[fp32.name], {"kind": "artifact", "name": fp32.name, "model": fp32.model, "note": note,
                                    "description": f"the FP32 artifact {fp32.name} ({fp32.backend})"}

    def _memory(self, variants) -> dict:
        if not self.cfg.memory:
            return {}
        self.progress.step("peak memory and cold load, one fresh process per variant", 2)
        out = {}
        for i, v in enumerate(variants):
            out[v.name] = measure_memory(v, self.cfg.threads[0], max(self.cfg.batches))
            if "error" in out[v.name]:
                self.notes.append(f"memory of {v.name} not measured: {out[v.name]['error']}")
            self.progress.update((i + 1) / len(variants))
        return out

    def _assemble(self, variants, info, load_s, memory, fidelity, latency, probe, reference) -> dict:
        cfg = self.cfg
        rows_v = []
        for v in variants:
            mem = memory.get(v.name, {})
            rows_v.append({**{k: getattr(v, k) for k in ("name", "kind", "path", "target", "precision", "backend",
                                                          "model", "source", "description", "size_bytes",
                                                          "sizes")},
                           "bits_per_weight": overall_bits(v.sizes),
                           "inference_precision": {g: i.get("inference_precision") for g, i in info[v.name].items()},
                           "backend_info": info[v.name], "load_s": mem.get("load_s", load_s[v.name]),
                           "load_s_in_process": load_s[v.name], "memory": mem,
                           "fidelity": fidelity.get(v.name, {})})
        method = {k: s.format(warm="2", seconds=cfg.seconds, min_rounds=cfg.min_rounds, base=self.base,
                              batch=max(cfg.batches)) for k, s in METHOD.items()}
        report = {
            "schema": SCHEMA, "edgeclip": __version__, "command": cfg.command, "machine": machine(),
            "settings": {"batches": cfg.batches, "threads": cfg.threads, "seconds": cfg.seconds,
                         "eval": str(cfg.eval_dir) if cfg.eval_dir else None, "baselines": cfg.baselines,
                         "model": cfg.model, "inference_precision": cfg.inference_precision},
            "interleaved": True, "base": self.base, "method": method, "reference": reference,
            "probe": probe.description, "variants": rows_v, "latency": latency, "notes": self.notes,
        }
        if "__reference__" in fidelity:
            report["reference"]["zero_shot_top1"] = fidelity["__reference__"]["zero_shot_top1"]
        report["results"] = quick_rows(report)
        return report


def quick_rows(report: dict) -> list[dict]:
    """Rows in `edgeclip bench --json`'s quick shape: one per variant x batch x threads."""
    rows = []
    by_name = {v["name"]: v for v in report["variants"]}
    for threads in report["settings"]["threads"]:
        for batch in report["settings"]["batches"]:
            for name, v in by_name.items():
                graphs = []
                for cfg in report["latency"]:
                    if cfg["batch"] == batch and cfg["threads"] == threads and name in cfg["results"]:
                        graphs.append({"graph": cfg["graph"], **cfg["results"][name],
                                       "ratio_vs_base": cfg["ratio_vs_base"][name],
                                       "inference_precision": v["inference_precision"].get(cfg["graph"])})
                rows.append({"artifact": v["path"], "name": name, "kind": v["kind"], "batch": batch,
                             "threads": threads, "load_s": v["load_s"], "backend": v["backend"],
                             "backend_info": v["backend_info"], "size_bytes": v["size_bytes"],
                             "sizes": v.get("sizes") or {}, "graphs": graphs,
                             "target": v["target"], "precision": v["precision"]})
    return rows


def run_bench(cfg: BenchConfig) -> dict:
    if not cfg.command:
        cfg.command = "edgeclip " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    t = time.perf_counter()
    report = Bench(cfg).run()
    report["wall_s"] = time.perf_counter() - t
    return report
