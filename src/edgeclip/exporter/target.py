"""What every export target shares: the `Target` base.

An export is always the same steps: parse labels and templates, compute the zero-shot class
embeddings and resolve the adapter heads, write the image and text graphs, validate them against
the float32 torch reference, copy the tokenizer, write the manifest. A target (one class in
`exporter/formats/`) declares its facts (precisions, tolerances, backend, graph suffix, the
target-only options it reads, the tools whose versions its manifest records) and implements one
step, `write_graphs`; the hooks below cover what differs in the manifest and in `edgeclip inspect`.

Torch is imported only when an export runs: `edgeclip inspect` reads a target's lines without it.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from .artifact import Artifact, ArtifactWriter, tool_versions

VOCAB = Path(__file__).resolve().parents[1] / "runtime" / "bpe_simple_vocab_16e6.txt.gz"
# options only some targets read: every other target requires them at their defaults
TARGET_OPTIONS = {"min_ios": 18, "compress": None, "trt_version": "10.3", "profiles": None,
                  "mobile_shapes": None, "mobile_eps": None}


@dataclass
class ExportJob:
    """One export's inputs and what its steps hand each other."""

    model: Any                   # the caller's ClipModel (never modified)
    spec: Any
    opts: Any                    # ExportOptions
    labels: list
    templates: list
    head: Any                    # (C, E) zero-shot class embeddings, or None
    heads: list                  # adapter Head objects
    trim: bool                   # the text graph takes a variable length
    fusions: dict = field(default_factory=dict)        # per graph: fused kernels written
    quantization: dict = field(default_factory=dict)   # per graph: INT8 report
    calibration: dict | None = None                    # per graph: calibration and held-out data
    quantizable: Any = None      # (layer path) -> whether INT8 may quantize it, as the towers say
    extra: dict = field(default_factory=dict)          # target-specific manifest sections
    towers: dict = field(default_factory=dict)         # per graph: what the tower's export rewrites did
    sizes: dict = field(default_factory=dict)          # per graph: bytes, weights, bits per weight
    conformance: dict | None = None                    # the conformance vectors' manifest entry


class Target:
    """Base of export targets. Subclasses set the class facts and implement `write_graphs`."""

    name: ClassVar[str] = ""        # set by register_target
    precisions: ClassVar[tuple] = ("fp32",)
    tolerances: ClassVar[dict] = {}
    backend: ClassVar[str] = ""
    graph_ext: ClassVar[str] = ""
    options: ClassVar[tuple] = ()   # names in TARGET_OPTIONS this target reads
    tools: ClassVar[tuple] = ("torch",)  # packages whose versions the manifest records (with python, numpy)

    # ------------------------------------------------------------------------------ the steps
    def export(self, model, spec, opts, out) -> Artifact:
        self.check_options(opts)
        job = self.begin(model, spec, opts)
        with ArtifactWriter(out, overwrite=opts.overwrite) as w:
            graphs, fidelity = self.write_graphs(job, w)
            job.sizes = graph_sizes(w.staging, graphs, job)
            if opts.validate:
                from .graphs import raise_if_failed

                raise_if_failed(fidelity, f"the {self.name} {self.describe(opts)} export of '{spec.name}'")
            tokenizer = write_tokenizer(spec, w)
            from .conformance import write_vectors

            job.conformance = write_vectors(self, job, w, graphs)
            return w.finish(self.manifest(job, graphs, tokenizer, fidelity))

    def begin(self, model, spec, opts) -> ExportJob:
        """Labels, templates, zero-shot class embeddings and adapter heads: checked before any graph."""
        from ..heads.base import resolve as resolve_heads
        from ..runtime.labels import parse_labels, resolve_templates, spec_templates

        labels = parse_labels(opts.labels) if opts.labels else []
        templates = resolve_templates(opts.templates, spec_templates(spec)) if labels else []
        head = zero_shot_head(model, spec, labels, templates) if labels else None
        heads = resolve_heads(opts.heads, spec.embed_dim, spec.name)
        return ExportJob(model, spec, opts, labels, templates, head, heads, self.trims(opts, spec))

    def write_graphs(self, job: ExportJob, w: ArtifactWriter) -> tuple[dict, dict]:
        """Write the image and text graphs into `w`: ({name: manifest graph entry}, fidelity report)."""
        raise NotImplementedError

    def prepare(self, job: ExportJob, attention: str, dtype):
        """The export copy of the model with every tower's exact rewrites applied (`exporter.graphs.prepare`);
        records what they did for the manifest."""
        from .graphs import prepare

        m = prepare(job.model, job.opts, attention=attention, dtype=dtype)
        self.rewrite(m)
        job.towers = {"image": m.visual.export_report(), "text": m.text.export_report()}
        return m

    # ------------------------------------------------------------------------------ hooks
    def rewrite(self, m) -> None:
        """Exact rewrites this target's runtime prefers (in place, on the export copy), through the
        towers' hooks (`prefer_gemm`, `prefer_depthwise`)."""

    def check_options(self, opts) -> None:
        """Target-specific checks of the options, before any work."""

    def trims(self, opts, spec) -> bool:
        from .graphs import trim_supported

        return bool(opts.trim_text and trim_supported(spec))

    def tolerance(self, opts):
        """The fixed-input fidelity bound of this export (`exporter.tolerance.Tolerance`)."""
        return self.tolerances[opts.precision]

    def run_outputs(self, job: ExportJob, root: Path, graphs: dict, feeds: dict) -> dict | None:
        """Both written graphs' outputs on `feeds` ({"pixel_values", "input_ids"}) through this target's
        runtime backend, or None where it cannot run on this machine (the conformance vectors then
        hold the torch reference)."""
        return None

    def describe(self, opts) -> str:
        return opts.precision

    def text_manifest(self, job: ExportJob) -> dict:
        t = job.spec.text
        out = {"trim": job.trim, "pool": t.pool, "eot_token_id": t.eot_token_id, "context_length": t.context_length}
        if job.opts.trim_text and not job.trim and not t.causal:
            out["trim_note"] = ("off: the text tower is not causal, so fewer tokens would change every "
                                "position's features; the graph takes the full context")
        return out

    def manifest_extra(self, job: ExportJob) -> dict:
        return dict(job.extra)

    def head_quantization(self, job: ExportJob) -> dict | None:
        return job.quantization.get("image")

    def tool_versions(self) -> dict:
        return tool_versions(("edgeclip",) + tuple(self.tools) + ("numpy",))

    @classmethod
    def inspect_lines(cls, manifest: dict) -> list[str]:
        """Lines `edgeclip inspect` prints for this target's own manifest sections."""
        fusions = manifest.get("fusions")
        if not fusions:
            return []
        return ["fusions    " + "; ".join(f"{g}: " + (", ".join(f"{k} {v}" for k, v in c.items()) or "none")
                                          for g, c in fusions.items())]

    # ------------------------------------------------------------------------------ the manifest
    def manifest(self, job: ExportJob, graphs: dict, tokenizer: dict, fidelity: dict) -> dict:
        model, spec, opts = job.model, job.spec, job.opts
        return {
            "target": self.name, "precision": opts.precision, "backend": self.backend,
            "model": {"name": spec.name, "family": spec.family, "embed_dim": spec.embed_dim,
                      "spec": spec.to_dict(), "source": getattr(model, "source", None)},
            "preprocess": spec.preprocess_config(),
            "tokenizer": tokenizer,
            "text": self.text_manifest(job),
            "graphs": graphs,
            "towers": job.towers,
            "head": head_manifest(spec, job.labels, job.templates) if job.labels else None,
            "heads": heads_manifest(job.heads, fidelity, self.head_quantization(job)),
            "logit_scale": float(model.logit_scale.detach().exp()),
            "logit_bias": float(model.logit_bias.detach()) if model.logit_bias is not None else None,
            "activation": spec.logit_activation,  # class scores: softmax or sigmoid (the runtime's one rule)
            "options": {k: str(v) if isinstance(v, Path) else v
                        for k, v in dataclasses.asdict(opts).items() if k not in ("labels", "heads")},
            "fidelity": fidelity,
            "sizes": job.sizes or None,
            "conformance": job.conformance,
            **self.manifest_extra(job),
            "tools": self.tool_versions(),
        }


# ----------------------------------------------------------------------------- shared steps

TOWERS = {"image": "visual", "text": "text"}  # graph -> the ClipModel tower it holds


def tower_weights(model) -> dict:
    """{graph: parameter count of its tower, as loaded (before any folding)}."""
    return {g: int(sum(p.numel() for p in getattr(model, attr).parameters())) for g, attr in TOWERS.items()}


def size_entry(size: int, weights: int | None) -> dict:
    """One graph's `sizes` entry: bytes, weights, bits per weight (None when the weights are unknown)."""
    return {"bytes": int(size), "weights": weights,
            "bits_per_weight": round(size * 8 / weights, 3) if weights else None}


def path_bytes(path: Path) -> int:
    """A file's size, or a package folder's regular files' (links not followed); 0 when missing."""
    if path.is_dir():
        return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and not f.is_symlink())
    return path.stat().st_size if path.is_file() else 0


def graph_sizes(root: Path, graphs: dict, job: ExportJob) -> dict:
    """Per graph: the bytes of its files (graph, weights file, or package folder), the weights it holds
    (the tower's parameters, plus the baked zero-shot head and the adapter heads' arrays for the
    image graph), and bits per weight (file bits over weights: 32 for a float32 graph, plus the
    graph's own structure)."""
    weights = tower_weights(job.model)
    if job.head is not None:
        weights["image"] += int(job.head.size)
    weights["image"] += sum(int(a.size) for h in job.heads for a in h.arrays.values())
    return {name: size_entry(sum(path_bytes(root / entry[k]) for k in ("file", "weights") if entry.get(k)),
                             int(weights.get(name, 0)))
            for name, entry in graphs.items()}


def zero_shot_head(model, spec, labels, templates):
    """(C, E) class embeddings computed once with the float32 torch reference."""
    import torch

    from ..models.inputs import model_tokenizer
    from ..runtime.labels import class_embeddings

    tok = model_tokenizer(spec)

    def encode(prompts):
        ids = torch.from_numpy(tok(prompts, truncate=True))
        with torch.no_grad():
            return model.encode_text(ids).float().numpy()

    return class_embeddings(encode, labels, templates)


def head_logit_outputs(labels, heads) -> list:
    """The image graph's class-score outputs: the INT8 guard keeps each one's top-1 agreement."""
    from .graphs import head_outputs

    return (["logits"] if labels else []) + [head_outputs(h)["logits"] for h in heads]


def heads_manifest(heads, fidelity: dict, quantization: dict | None) -> dict:
    """Per adapter head: kind, classes, outputs, how it was fitted, and what the export measured."""
    from .graphs import head_outputs

    out = {}
    agreement = (quantization or {}).get("head_agreement", {})
    for h in heads:
        names = head_outputs(h)
        entry = {**h.manifest(), "output": names["logits"], "mcm_output": names["mcm"],
                 "validation": fidelity.get(names["logits"])}
        if names["logits"] in agreement:
            entry["int8_top1_agreement"] = agreement[names["logits"]]
        out[h.name] = entry
    return out


def head_manifest(spec, labels, templates) -> dict:
    return {"kind": "zero_shot", "labels": labels, "templates": templates, "output": "logits",
            "activation": spec.logit_activation}


def write_tokenizer(spec, w) -> dict:
    cfg = spec.tokenizer_config()
    out = {"kind": cfg["kind"], "context_length": cfg["context_length"], "file": None}
    if cfg["kind"] == "clip_bpe":
        out["file"] = w.copy(VOCAB, f"tokenizer/{VOCAB.name}")
    elif cfg.get("path"):
        out["file"] = w.copy(cfg["path"], "tokenizer/tokenizer.json")
    return out
