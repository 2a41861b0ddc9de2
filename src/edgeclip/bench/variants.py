"""What bench measures: artifacts (run by `Pipeline`) and baselines (plain graph files run by the same
runtime backends), behind one small interface. numpy + runtime only: never torch.

A `Variant` is data (JSON-serializable, so a subprocess can rebuild it for the memory measurement);
`Variant.open(threads)` loads it into a `Runner` with `image(pixels)` and `text(ids)`.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from ..runtime import Pipeline
from ..runtime.backends import backend_for_target, get_backend
from ..runtime.manifest import read_manifest, safe_path
from ..runtime.preprocess import Preprocessor
from ..runtime.tokenizer import load_tokenizer
from ..runtime.vectors import l2_normalize
from .sizes import artifact_sizes


@dataclass
class Variant:
    name: str
    kind: str                    # "artifact" | "baseline"
    path: str                    # artifact folder, or the baseline's cache folder
    target: str                  # onnx | openvino | ...
    precision: str               # fp32 | fp16 | int8 | ...
    backend: str                 # runtime backend: ort | openvino
    model: str                   # spec name
    source: str | None = None    # model URI it was made from, when known
    description: str = ""
    graphs: dict = field(default_factory=dict)   # baselines: graph name -> file
    companion: str | None = None  # baselines: an artifact of the same model (tokenizer, preprocessing)
    inference_precision: str | None = None       # asked of OpenVINO (None: the device's default)
    size_bytes: int = 0
    sizes: dict = field(default_factory=dict)    # per graph: bytes, weights, bits per weight (sizes.py)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Variant":
        return cls(**d)

    def open(self, threads: int | None = None) -> "Runner":
        t = time.perf_counter()
        runner = ArtifactRunner(self, threads) if self.kind == "artifact" else BaselineRunner(self, threads)
        runner.load_s = time.perf_counter() - t
        return runner


def artifact_variant(path, name: str | None = None, inference_precision: str | None = None) -> Variant:
    """Describe an artifact folder from its manifest (missing or broken folders raise ArtifactError)."""
    root = Path(path)
    m = read_manifest(root, verify=False)  # Pipeline.load verifies checksums when it opens the folder
    backend = backend_for_target(m["target"])  # the registry, as Pipeline.load(backend="auto") picks it
    q = m.get("quantization") or {}
    how = f"edgeclip export --target {m['target']} --precision {m['precision']}"
    if q.get("recipe"):
        how += f" (recipe {q['recipe']})"
    ip = inference_precision if backend == "openvino" else None
    return Variant(name=name or root.name, kind="artifact", path=str(root), target=m["target"],
                   precision=m["precision"], backend=backend, model=m["model"]["name"],
                   source=m["model"].get("source"), description=how, inference_precision=ip,
                   size_bytes=sum(int(v["size"]) for v in m["files"].values()), sizes=artifact_sizes(m))


def _tools(root: Path):
    """An artifact's preprocessor and tokenizer, without compiling any graph."""
    m = read_manifest(root, verify=False)
    cfg = m["tokenizer"]
    tok = load_tokenizer(cfg["kind"], cfg["context_length"], safe_path(root, cfg["file"])) if cfg.get("file") else None
    return Preprocessor.from_config(m["preprocess"]), tok, m


class Runner:
    """A loaded variant: `image(pixels)` and `text(ids)` give L2-normalized float32 features;
    `image_call(pixels)` is the timed image call (the graph alone on preprocessed pixels); `info()`
    says what ran each graph (backend, threads, inference precision read back); `preprocess` and
    `tokenizer` turn files and strings into the graphs' inputs."""

    variant: Variant
    load_s: float = 0.0


class ArtifactRunner(Runner):
    def __init__(self, variant: Variant, threads: int | None):
        self.variant = variant
        self.pipeline = Pipeline.load(variant.path, threads=threads, inference_precision=variant.inference_precision)
        self.pipeline._graph("text")  # compile both graphs now: load time covers the whole artifact
        self.preprocess = self.pipeline.preprocessor
        self.tokenizer = self.pipeline.tokenizer if self.pipeline.manifest["tokenizer"].get("file") else None

    def image_call(self, pixels):
        graph = self.pipeline._graph("image")
        feeds = {"pixel_values": pixels}
        return lambda: graph.run(feeds)

    def image(self, pixels):
        out = self.pipeline._graph("image").run({"pixel_values": pixels})
        return l2_normalize(out["image_embeds"], dtype=np.float32)

    def text(self, ids):
        return self.pipeline.encode_text(ids)  # trims after the end token when the artifact allows it

    def info(self) -> dict:
        return self.pipeline.info()


class BaselineRunner(Runner):
    """Plain graph files through the runtime's own backend classes (same session settings as artifacts)."""

    def __init__(self, variant: Variant, threads: int | None):
        self.variant = variant
        cls = get_backend(variant.backend)
        kw = {"inference_precision": variant.inference_precision} if variant.inference_precision else {}
        root = Path(variant.path)
        self.graphs = {g: cls(root / f, threads=threads, **kw) for g, f in variant.graphs.items()}
        self.preprocess, self.tokenizer, _ = _tools(Path(variant.companion))

    def _run(self, graph: str, value: np.ndarray) -> np.ndarray:
        out = self.graphs[graph].run({self.graphs[graph].input_names[0]: value})
        return out.get(f"{graph}_embeds", next(iter(out.values())))

    def image_call(self, pixels):
        backend = self.graphs["image"]
        feeds = {backend.input_names[0]: pixels}
        return lambda: backend.run(feeds)

    def image(self, pixels):
        return l2_normalize(self._run("image", pixels), dtype=np.float32)

    def text(self, ids):
        return l2_normalize(self._run("text", ids), dtype=np.float32)  # full context: no trimming

    def info(self) -> dict:
        return {g: dict(b.info) for g, b in self.graphs.items()}
