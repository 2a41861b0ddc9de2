"""`Pipeline`: an artifact folder -> embeddings, similarities and labels. numpy + one backend."""
from __future__ import annotations

import os
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..errors import ArtifactError, EdgeClipError, InputError, ManifestError, TokenizerError, UsageError
from .backends import get_backend
from .registry import backends_for_target
from .manifest import check_files, graph_files, load_manifest, read_verified, safe_path
from .preprocess import Preprocessor, check_pixels
from .tokenizer import check_token_ids, load_tokenizer, trim  # noqa: F401  (export imports trim from here)
from .vectors import l2_normalize


@dataclass(frozen=True)
class Prediction:
    """The top label of one image, with the score of every label (same order as `labels`).

    `ood`: out-of-distribution scores, higher = more in-distribution: "max_softmax" (the head's own
    maximum softmax probability) and, where the head holds class text, "mcm" (maximum concept
    matching: max softmax of the zero-shot cosines). An app rejects images below a threshold it
    picks on its own data."""

    label: str
    score: float
    index: int
    labels: tuple
    scores: np.ndarray
    head: str | None = None
    ood: dict | None = None

    def top(self, k: int = 5) -> list[tuple[str, float]]:
        if not isinstance(k, (int, np.integer)) or isinstance(k, bool) or k < 1:
            raise InputError(f"top(k) needs a whole number k >= 1, got {k!r}")
        order = np.argsort(-self.scores)[:k]
        return [(self.labels[i], float(self.scores[i])) for i in order]

    def to_dict(self, k: int = 5) -> dict:
        out = {"label": self.label, "score": self.score, "top": [{"label": lb, "score": s} for lb, s in self.top(k)]}
        if self.head is not None:
            out["head"] = self.head
        if self.ood is not None:
            out["ood"] = dict(self.ood)
        return out


def _is_batch(images: Any) -> bool:
    if isinstance(images, (list, tuple)):
        return True
    return isinstance(images, np.ndarray) and images.ndim == 4


class Pipeline:
    """Run an exported artifact. Safe to share between threads.

        p = Pipeline.load("artifact/")
        p.encode_image(["cat.jpg"]); p.encode_text(["a photo of a cat"])
        p.classify("cat.jpg", labels=["cat", "dog"])
    """

    TEXT_CACHE_SIZE = 64  # label sets whose class embeddings are kept (least recently used go first)

    def __init__(self, root: Path, manifest: dict, backend: str, threads: int | None,
                 inference_precision: str | None = None, digest: str | None = None, providers=None):
        self.root, self.manifest, self.threads = root, manifest, check_threads(threads)
        self.digest = digest
        self.backend_name = backend
        if inference_precision not in (None, "f32") and backend != "openvino":
            raise ArtifactError(f"backend '{backend}' runs float32 on CPU; inference_precision="
                                f"'{inference_precision}' applies to the openvino backend only")
        if providers is not None and backend != "ort":
            raise UsageError(f"providers= are ONNX Runtime execution providers; this artifact runs on the "
                             f"'{backend}' backend")
        self.inference_precision, self.providers = inference_precision, providers
        try:
            self.preprocessor = Preprocessor.from_config(manifest["preprocess"])
        except EdgeClipError as e:
            raise ManifestError(f"manifest field 'preprocess' is invalid: {e}", field="preprocess") from e
        self._backend_cls = get_backend(backend)
        self._graphs: dict[str, Any] = {}
        self._lock = threading.Lock()
        self._tokenizer = None
        self._text_cache: OrderedDict[tuple, np.ndarray] = OrderedDict()
        self.head = manifest.get("head")

    @classmethod
    def load(cls, path, backend: str = "auto", threads: int | None = None, verify: bool = True,
             inference_precision: str | None = None, digest: str | None = None, providers=None) -> "Pipeline":
        """Open an artifact folder, verifying the manifest and every file's checksum (verify=False
        skips hashing at load; each graph and the tokenizer are still checked as they are read).

        `digest="sha256:…"` (as `edgeclip export` and `inspect` print it) pins the exact artifact an
        app shipped: any other manifest raises DigestError. `backend="auto"` runs the artifact with
        the backend its target is made for. `inference_precision` (OpenVINO: f32 | bf16 | f16)
        overrides the device's default; OpenVINO runs float32 models in bf16 on CPUs that support it
        unless told f32. `providers` (ort backend): ONNX Runtime execution providers, names or
        (name, options) pairs, e.g. ["CUDAExecutionProvider", "CPUExecutionProvider"]. `info()` says what ran."""
        root = Path(path)
        check_threads(threads)
        manifest, found = load_manifest(root, verify=False, digest=digest)  # parsed, validated, sizes checked
        if verify:  # the image graph is hashed as it is read, just below: hash every other file now
            image = graph_files(manifest["graphs"]["image"], manifest["files"])
            check_files(root, {k: v for k, v in manifest["files"].items() if k not in image}, True)
        expected, *also = backends_for_target(manifest["target"])
        if backend == "auto":
            backend = expected
        elif backend != expected and backend not in also:
            raise ArtifactError(f"a {manifest['target']} artifact runs on the '{expected}' backend"
                                + (f" (or {', '.join(also)})" if also else "") + f", not '{backend}'; pass backend='auto'")
        p = cls(root, manifest, backend, threads, inference_precision, digest=found, providers=providers)
        p._graph("image")  # compile now: load errors surface at load time, not at first call
        return p

    # ------------------------------------------------------------------------------------- parts

    def _graph(self, name: str):
        g = self._graphs.get(name)
        if g is None:
            with self._lock:
                g = self._graphs.get(name)
                if g is None:
                    info = self.manifest["graphs"].get(name)
                    if info is None:
                        raise ArtifactError(f"this artifact has no {name} graph")
                    g = self._open(info)
                    check_signature(name, info, g)
                    self._graphs[name] = g
        return g

    def _open(self, info: dict):
        """A backend over the verified bytes of one graph (what runs is what was hashed)."""
        kw = _backend_kwargs(info, self.inference_precision)
        if self.providers is not None:
            kw["providers"] = self.providers
        from .shapes import fit_shapes

        return fit_shapes(self._backend_cls.open_verified(self.root, info, self.manifest, threads=self.threads,
                                                          **kw), info)

    def info(self) -> dict:
        """What runs each loaded graph: backend, version, threads, the inference precision read back."""
        return {name: dict(g.info) for name, g in self._graphs.items()}

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            cfg = self.manifest["tokenizer"]
            if not cfg.get("file"):
                raise TokenizerError("this artifact carries no tokenizer; pass token ids to encode_text instead")
            tok = load_tokenizer(cfg["kind"], cfg["context_length"], safe_path(self.root, cfg["file"]),
                                 data=read_verified(self.root, cfg["file"], self.manifest))
            with self._lock:
                self._tokenizer = self._tokenizer or tok
        return self._tokenizer

    @property
    def labels(self) -> list[str]:
        """Labels of the zero-shot head baked into the artifact (empty if none)."""
        return list(self.head["labels"]) if self.head else []

    @property
    def heads(self) -> dict:
        """Adapter heads inside the image graph: {name: manifest entry (kind, classes, outputs, figures)}."""
        return dict(self.manifest.get("heads") or {})

    @property
    def embed_dim(self) -> int:
        return int(self.manifest["model"]["embed_dim"])

    # ---------------------------------------------------------------------------------- features

    def preprocess(self, images) -> np.ndarray:
        """float32 NCHW pixels, exactly what the image graph receives."""
        return self.preprocessor(images)

    def _run_image(self, images) -> dict:
        if isinstance(images, np.ndarray) and images.ndim == 4 and images.dtype == np.float32 \
                and images.shape[1] == 3:
            # already preprocessed NCHW: the right shape, and no NaN/Inf (which would flow silently into scores)
            # any batch: a graph of fixed batch runs it in chunks (runtime.shapes)
            shape = self.manifest["graphs"]["image"]["inputs"]["pixel_values"]["shape"]
            pixels = check_pixels(np.ascontiguousarray(images), [None, *shape[1:]])
        else:
            pixels = self.preprocess(images if _is_batch(images) else [images])
        return self._graph("image").run({"pixel_values": pixels})

    def encode_image(self, images) -> np.ndarray:
        """(N, E) float32 L2-normalized image embeddings. One image in, one row out."""
        return l2_normalize(self._run_image(images)["image_embeds"], dtype=np.float32)

    def tokenize(self, texts, truncate: bool = False) -> np.ndarray:
        return self.tokenizer(texts, truncate=truncate)

    def encode_text(self, texts, truncate: bool = False) -> np.ndarray:
        """(N, E) float32 L2-normalized text embeddings, from strings or int64 token ids (N, L)."""
        text = self.manifest["text"]
        if isinstance(texts, np.ndarray) and texts.dtype.kind not in "UO":
            # pre-made ids: a negative or out-of-vocabulary id would wrap or read out of range in the graph
            vocab = ((self.manifest["model"].get("spec") or {}).get("text") or {}).get("vocab_size", 1 << 24)
            ids = check_token_ids(texts, vocab, text["context_length"])
        else:
            ids = self.tokenize(texts, truncate=truncate)
            if ids.shape[0] == 0:
                raise InputError("no texts given: the list is empty; pass at least one string")
        if text["trim"]:
            ids = trim(ids, text["eot_token_id"])
        return l2_normalize(self._graph("text").run({"input_ids": ids})["text_embeds"], dtype=np.float32)

    def similarity(self, images, texts) -> np.ndarray:
        """(N_images, N_texts) cosine similarities."""
        img = self.encode_image(images)
        txt = self.encode_text([texts] if isinstance(texts, str) else texts)
        return img @ txt.T

    # ----------------------------------------------------------------------------- classification

    def class_embeddings(self, labels: Sequence[str], templates: Sequence[str] | None = None) -> np.ndarray:
        from .labels import parse_labels

        return self._class_embeddings(parse_labels(labels), templates)

    def _class_embeddings(self, labels: list[str], templates) -> np.ndarray:
        """`labels` already checked (classify checks them once per call)."""
        from .labels import DEFAULT_TEMPLATES, class_embeddings, resolve_templates

        templates = resolve_templates(templates, (self.head or {}).get("templates") or DEFAULT_TEMPLATES)
        key = (tuple(labels), tuple(templates))
        with self._lock:
            cached = self._text_cache.get(key)
            if cached is not None:
                self._text_cache.move_to_end(key)
                return cached
        cached = class_embeddings(lambda prompts: self.encode_text(prompts, truncate=True), list(labels),
                                  list(templates))
        with self._lock:
            self._text_cache[key] = cached
            while len(self._text_cache) > self.TEXT_CACHE_SIZE:
                self._text_cache.popitem(last=False)
        return cached

    def classify(self, images, labels: Sequence[str] | None = None, templates: Sequence[str] | None = None,
                 head: str | None = None, labels_file=None):
        """Labels for images: one image gives a Prediction, a batch a list of them.

        `head="NAME"` uses that adapter head of the artifact (`heads` lists them); `labels=[...]` (a
        list of strings) or `labels_file=PATH` (one label per line) runs zero-shot on those labels
        through the text graph. With neither, the baked zero-shot head (`--labels` at export) is used,
        else the artifact's first adapter head. Heads run inside the image graph: one graph call per
        batch, whatever the head.
        """
        from .labels import parse_labels, read_labels_file

        if labels_file is not None:
            if labels is not None:
                raise InputError("pass labels=[...] or labels_file=PATH, not both")
            labels = read_labels_file(labels_file)
        if head is not None and labels is not None:
            raise InputError("pass either head='NAME' (an adapter head of the artifact) or labels=[...], not both")
        labels = parse_labels(labels) if labels is not None else None
        if head is None and labels is None and self.head is None and self.heads:
            head = next(iter(self.heads))
        if head is not None:
            from .labels import select

            return self._classify_head(images, select(self.heads, head))
        use_head = self.head is not None and (labels is None or list(labels) == self.labels) and templates is None
        if labels is None and self.head is None:
            raise InputError("this artifact has no baked zero-shot head and no adapter heads: pass labels=[...] "
                             "(or export with --labels or --head to put one inside)")
        out = self._run_image(images)
        if use_head:
            labels, logits = self.labels, out["logits"]
        else:
            emb = l2_normalize(out["image_embeds"], dtype=np.float32)
            logits = self.manifest["logit_scale"] * emb @ self._class_embeddings(labels, templates).T
            logits = logits + (self.manifest.get("logit_bias") or 0.0)
        probs = _activate(logits, self._activation())
        preds = [Prediction(labels[i], float(p[i]), int(i), tuple(labels), p,
                            ood={"max_softmax": float(p[i])} if self._activation() == "softmax" else None)
                 for p in probs for i in [int(np.argmax(p))]]
        return preds if _is_batch(images) else preds[0]

    def _classify_head(self, images, info: dict):
        out = self._run_image(images)
        labels = tuple(info["classes"])
        probs = _activate(out[info["output"]], info.get("activation", "softmax"))
        soft = probs if info.get("activation", "softmax") == "softmax" else _activate(out[info["output"]], "softmax")
        mcm = out.get(info["mcm_output"]) if info.get("mcm_output") else None
        preds = []
        for n, p in enumerate(probs):
            i = int(np.argmax(p))
            ood = {"max_softmax": float(soft[n].max())}
            if mcm is not None:
                ood["mcm"] = float(mcm[n])
            preds.append(Prediction(labels[i], float(p[i]), i, labels, p, head=info["name"], ood=ood))
        return preds if _is_batch(images) else preds[0]

    def _activation(self) -> str:
        """The manifest's class-score rule (schema fills it in for exports that predate the field)."""
        return self.manifest["activation"]

    def __repr__(self) -> str:
        m = self.manifest
        return f"Pipeline({str(self.root)!r}, model={m['model']['name']}, target={m['target']}, " \
               f"precision={m['precision']}, backend={self.backend_name})"


MAX_THREADS = 256


def check_threads(threads) -> int | None:
    """None (the backend's choice) or 1..max(4 x cores, 8), capped at MAX_THREADS."""
    if threads is None:
        return None
    limit = min(MAX_THREADS, max(8, 4 * (os.cpu_count() or 1)))
    if not isinstance(threads, (int, np.integer)) or isinstance(threads, bool) or not 1 <= threads <= limit:
        raise InputError(f"threads must be an integer from 1 to {limit} on this machine ({os.cpu_count()} cores), "
                         f"got {threads!r}; leave it unset to let the backend choose")
    return int(threads)


def check_signature(name: str, declared: dict, backend) -> None:
    """The graph's own inputs and outputs must be the manifest's (names, dtypes, ranks): a graph swapped
    for another (image for text, or a foreign model) fails here, at load, with the difference named."""
    sig = getattr(backend, "signature", None)
    if sig is None:
        return
    for kind in ("inputs", "outputs"):
        want = {n: (t["dtype"], len(t["shape"])) for n, t in declared[kind].items()}
        have = sig[kind]
        if set(want) != set(have):
            raise ArtifactError(f"graph '{name}' ({declared['file']}) has {kind} {sorted(have)}, the manifest "
                                f"declares {sorted(want)}: the graph was swapped or the manifest edited; "
                                "re-export the artifact")
        for n, (dtype, rank) in want.items():
            if have[n][0] != dtype or (have[n][1] is not None and have[n][1] != rank):
                raise ArtifactError(f"graph '{name}' {kind[:-1]} '{n}' is {have[n][0]} of rank {have[n][1]}, the "
                                    f"manifest declares {dtype} of rank {rank}; re-export the artifact")


def _backend_kwargs(info: dict, inference_precision: str | None = None) -> dict:
    """What the manifest asks of the backend for one graph (ORT session entries, OpenVINO properties)."""
    kw = {}
    config = info.get("session_config") or info.get("ov_config")
    if config:
        kw["config"] = config
    if inference_precision:
        kw["inference_precision"] = inference_precision
    return kw


def _activate(logits: np.ndarray, kind: str) -> np.ndarray:
    logits = np.asarray(logits, dtype=np.float64)
    if kind == "sigmoid":
        return (1.0 / (1.0 + np.exp(-logits))).astype(np.float32)
    z = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return (z / z.sum(axis=-1, keepdims=True)).astype(np.float32)
