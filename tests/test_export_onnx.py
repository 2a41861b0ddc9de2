"""Acceptance tests of the ONNX / ORT-format export (edgeclip.export + the runtime that runs it).

Every number here is measured by running the exported files with the runtime (real ONNX Runtime
sessions on the artifact folder) against the torch reference computed on the caller's model,
never read back from the manifest's own fidelity block (that block is only checked to be present).

Exports are slow for the B-sized random models (~35 s per model and precision on 2 cores): each
(model, precision, options) is exported once per test session by conftest.py's `shared_exports`
(the tiny FP32 artifacts are the ones the bench, runtime, INT8, OpenVINO and fusion tests read too),
which starts every export the selected tests declare (`needs`) up front, two at a time in background
processes. `-m "not slow"` skips the ViT-B-16/Long-CLIP-B/SigLIP cases.
"""
from __future__ import annotations

import json
import zlib
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

import edgeclip  # noqa: E402
from edgeclip.errors import ValidationError  # noqa: E402
from edgeclip.exporter.graphs import Tolerance  # noqa: E402
from edgeclip.runtime.pipeline import Pipeline, trim  # noqa: E402
from edgeclip.runtime.preprocess import Preprocessor  # noqa: E402
from hf_layouts import clip_ids  # noqa: E402

TINY_URI = "builtin:tiny"
DIGITS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
MOBILECLIP = ["MobileCLIP-S1", "MobileCLIP-S2", "MobileCLIP2-S0"]  # convolutional MCi towers, non-causal text
MODELS = ["tiny", "ViT-B-32", "ViT-B-16", "Long-CLIP-B", "SigLIP-B-16", *MOBILECLIP]
PRECISIONS = ["fp32", "fp16"]
FP32_MAX_ABS = 1e-4
FP16_MAX_ABS, FP16_MIN_COS = 1e-2, 0.999


def digit_labels() -> list[str]:
    try:
        from edgeclip.builtin import digit_labels as labels

        return list(labels())
    except (ImportError, edgeclip.EdgeClipError):  # data not built yet: builtin:tiny tests fail anyway
        return DIGITS


# ------------------------------------------------------------------------------------ fixtures

class Case:
    """One model: its fixed test inputs and the float32 torch reference on them."""

    def __init__(self, name: str, model):
        self.name, self.spec = name, model.spec
        s, t = model.spec, model.spec.text
        rng = np.random.default_rng(zlib.crc32(name.encode()))
        # Photos of assorted sizes through the model's own preprocessing: what the graph really gets.
        images = []
        for h, w in [(s.vision.image_size + 17, s.vision.image_size * 2), (300, 200), (64, 64)]:
            coarse = rng.uniform(0, 255, size=(-(-h // 16), -(-w // 16), 3))
            img = np.kron(coarse, np.ones((16, 16, 1)))[:h, :w] + rng.normal(0, 12, size=(h, w, 3))
            images.append(np.clip(img, 0, 255).astype(np.uint8))
        self.pixels = Preprocessor.from_config(s.preprocess_config())(images)
        ids = np.zeros((3, t.context_length), dtype=np.int64)
        for i, n in enumerate([3, 20, t.context_length - 2]):  # words per prompt; the last one is full
            if t.pool == "eot":  # CLIP BPE: start, words, end, zero padding
                # eot_token_id None: OpenAI's argmax rule, the end token is the largest id (49407)
                ids[i, 0], ids[i, n + 1] = 49406, t.eot_token_id if t.eot_token_id is not None else 49407
                ids[i, 1:n + 1] = rng.integers(1, 49405, size=n)
            else:  # SigLIP: words, end token, then its pad id (= the end id) up to the full length
                ids[i] = t.eot_token_id
                ids[i, :n] = rng.integers(2, t.vocab_size, size=n)
        self.ids = ids.astype(np.int64)
        # short prompts (at most 12 tokens) padded to the full context: what trimming is for
        self.short = np.zeros((4, t.context_length), dtype=np.int64)
        self.short[:, :12] = clip_ids(n=4, context=12, seed=11, vocab=min(t.vocab_size, 49408)).numpy()
        with torch.no_grad():
            self.ref_image = model.encode_image(torch.from_numpy(self.pixels)).numpy()
            self.ref_text = model.encode_text(torch.from_numpy(self.ids)).numpy()
            self.ref_short = model.encode_text(torch.from_numpy(self.short)).numpy() if t.pool == "eot" else None


def uri(name: str) -> str:
    return TINY_URI if name == "tiny" else f"random:{name}"


def key(name: str, precision: str = "fp32", target: str = "onnx", **options) -> dict:
    """One export: `edgeclip.export(edgeclip.load_model(uri(name), seed=0), target, precision, **options)`,
    as conftest.py's `shared_exports` runs it (random: models are deterministic for a seed)."""
    return {"model": uri(name), "target": target, "precision": precision, **options}


def needs(*keys):
    """Declare the exports a test uses (dicts from `key`, or functions of the test's parameters), so
    that conftest.py's `shared_exports` can start them all, in test order, before the first one is needed."""
    def deco(fn):
        fn.exports = keys
        return fn
    return deco


class Exports:
    """Models (one big one at a time), their cases, and the exported artifact folders (from the
    session's `shared_exports`)."""

    def __init__(self, shared):
        self.shared = shared
        self.models: dict = {}
        self.cases: dict[str, Case] = {}

    def model(self, name: str):
        if name not in self.models:
            if name != "tiny":  # keep the tiny model, at most one big one (memory)
                self.models = {k: v for k, v in self.models.items() if k == "tiny"}
            self.models[name] = edgeclip.load_model(uri(name), seed=0)
        return self.models[name]

    def case(self, name: str) -> Case:
        if name not in self.cases:
            self.cases[name] = Case(name, self.model(name))
        return self.cases[name]

    def get(self, name: str, precision: str = "fp32", target: str = "onnx", **options) -> Path:
        """The artifact folder (planned exports are under way already; others are exported now)."""
        return self.shared.path(key(name, precision, target, **options))


@pytest.fixture(scope="module")
def exports(shared_exports):
    return Exports(shared_exports)


def raw_features(pipe: Pipeline, pixels: np.ndarray, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Unnormalized features straight from the artifact's graphs, fed the way Pipeline feeds them."""
    img = pipe._graph("image").run({"pixel_values": pixels})["image_embeds"]
    text = pipe.manifest["text"]
    feed = trim(ids, text["eot_token_id"]) if text["trim"] else ids
    txt = pipe._graph("text").run({"input_ids": feed})["text_embeds"]
    return img, txt


def max_abs(a, b) -> float:
    return float(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).max())


def min_cosine(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.min((a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))))


def unit(x):
    x = np.asarray(x, np.float64)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def text_input_dims(path: Path) -> list:
    """The declared shape of the text graph's input: ints for fixed axes, names for symbolic ones."""
    graph = onnx.load(str(path), load_external_data=False).graph
    (inp,) = [i for i in graph.input if i.name == "input_ids"]
    return [d.dim_param if d.dim_param else d.dim_value for d in inp.type.tensor_type.shape.dim]


# ------------------------------------------------------------------------------------ fidelity

BIG = {"ViT-B-16", "Long-CLIP-B", "SigLIP-B-16", *MOBILECLIP}  # marked slow; they run by default all the same


@pytest.mark.parametrize("name,precision", [
    pytest.param(m, p, id=f"{m}-{p}", marks=[pytest.mark.slow] if m in BIG else [])
    for m in MODELS for p in PRECISIONS])
@needs(lambda p: key(p["name"], p["precision"]))
def test_features_match_torch_reference(exports, name, precision):
    case = exports.case(name)
    path = exports.get(name, precision)
    pipe = Pipeline.load(path)
    img, txt = raw_features(pipe, case.pixels, case.ids)
    assert img.shape == case.ref_image.shape and txt.shape == case.ref_text.shape
    errs = {"image": max_abs(img, case.ref_image), "text": max_abs(txt, case.ref_text),
            "image_cos": min_cosine(img, case.ref_image), "text_cos": min_cosine(txt, case.ref_text)}
    print(f"{name} {precision}: {errs}")  # visible with -s
    if precision == "fp32":
        assert errs["image"] <= FP32_MAX_ABS, errs
        assert errs["text"] <= FP32_MAX_ABS, errs
    else:
        assert errs["image"] <= FP16_MAX_ABS and errs["image_cos"] >= FP16_MIN_COS, errs
        assert errs["text"] <= FP16_MAX_ABS and errs["text_cos"] >= FP16_MIN_COS, errs
        # and fp16 really is fp16 (a silently-fp32 graph would be far closer than this)
        assert max(errs["image"], errs["text"]) > 1e-5, errs

    # The public Pipeline API (normalized features; token ids in, trimmed inside) agrees too.
    tol = 1e-5 if precision == "fp32" else FP16_MAX_ABS
    assert max_abs(pipe.encode_image(case.pixels), unit(case.ref_image)) <= tol
    assert max_abs(pipe.encode_text(case.ids), unit(case.ref_text)) <= tol

    m = pipe.manifest
    assert m["precision"] == precision and m["model"]["name"] == case.spec.name
    assert set(m["fidelity"]) == {"image_embeds", "text_embeds"}
    assert all(r["ok"] for r in m["fidelity"].values())
    # trimming is on exactly for causal end-token-pooled towers; SigLIP keeps a fixed length
    expect_trim = case.spec.text.causal and case.spec.text.pool == "eot"
    assert m["text"]["trim"] is expect_trim
    dims = text_input_dims(path / m["graphs"]["text"]["file"])
    assert (dims[1] == case.spec.text.context_length) is (not expect_trim)


# ------------------------------------------------------------------------------------ trimming

@pytest.mark.parametrize("name", ["tiny", "ViT-B-32", pytest.param("Long-CLIP-B", marks=pytest.mark.slow)])
@needs(lambda p: key(p["name"], "fp32"))
def test_trimmed_ids_give_the_padded_features(exports, name):
    case = exports.case(name)
    pipe = Pipeline.load(exports.get(name, "fp32"))
    L = pipe.manifest["text"]["context_length"]
    assert pipe.manifest["text"]["trim"] is True and case.short.shape[1] == L
    trimmed = trim(case.short, pipe.manifest["text"]["eot_token_id"])
    assert trimmed.shape[1] <= 12 < L
    graph = pipe._graph("text")
    full = graph.run({"input_ids": case.short})["text_embeds"]
    cut = graph.run({"input_ids": trimmed})["text_embeds"]
    print(f"{name} trimmed {trimmed.shape[1]} vs padded {L}: max abs {max_abs(full, cut):.3g}")
    assert max_abs(full, cut) <= 1e-6
    # and both are the model's features for the padded ids
    assert max_abs(cut, case.ref_short) <= FP32_MAX_ABS
    assert max_abs(pipe.encode_text(case.short), unit(case.ref_short)) <= 1e-5  # Pipeline trims inside


# ------------------------------------------------------------------------------ no side effects

def _snapshot(model) -> dict:
    from edgeclip.models.clip import Attention

    return {
        "state": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "impl": [m.impl for m in model.modules() if isinstance(m, Attention)],
        "pooled": (model.visual.pooled_only_last, model.text.pooled_only_last),
        "training": model.training,
        "requires_grad": [p.requires_grad for p in model.parameters()],
        "dtypes": {p.dtype for p in model.parameters()},
    }


def test_export_never_mutates_the_callers_model(tmp_path):
    model = edgeclip.load_model(TINY_URI)
    # a state the export's own settings (reference attention, pooled-only-last, eval, fp16) differ from
    model.set_attention("sdpa").set_pooled_only_last(False).train()
    before = _snapshot(model)
    edgeclip.export(model, target="onnx", precision="fp16", out=tmp_path / "a", labels=digit_labels()[:3],
                    pooled_only_last=True, attention="reference")
    after = _snapshot(model)
    assert before["state"].keys() == after["state"].keys()
    changed = [k for k in before["state"] if not torch.equal(before["state"][k], after["state"][k])]
    assert not changed, f"export changed {changed}"
    for key in ("impl", "pooled", "training", "requires_grad", "dtypes"):
        assert before[key] == after[key], key
    assert after["impl"] and set(after["impl"]) == {"sdpa"}
    assert after["dtypes"] == {torch.float32}


# ------------------------------------------------------------------------------------- options

@needs(key("tiny", trim_text=False), key("tiny"))
def test_trim_text_false_gives_a_fixed_length_graph(exports):
    case = exports.case("tiny")
    fixed = exports.get("tiny", "fp32", trim_text=False)
    dynamic = exports.get("tiny", "fp32")
    L = case.spec.text.context_length
    m = json.loads((fixed / "manifest.json").read_text())
    assert m["text"]["trim"] is False and m["options"]["trim_text"] is False
    assert text_input_dims(fixed / "text.onnx")[1] == L
    assert isinstance(text_input_dims(dynamic / "text.onnx")[1], str)  # symbolic "length"
    assert m["graphs"]["text"]["inputs"]["input_ids"]["shape"][1] == L
    pipe = Pipeline.load(fixed)
    graph = pipe._graph("text")
    with pytest.raises(Exception):  # the fixed graph really refuses other lengths
        graph.run({"input_ids": trim(case.ids[1:2], case.spec.text.eot_token_id)})
    img, txt = raw_features(pipe, case.pixels, case.ids)
    assert max_abs(txt, case.ref_text) <= FP32_MAX_ABS
    assert max_abs(pipe.encode_text(case.ids), Pipeline.load(dynamic).encode_text(case.ids)) <= 1e-5


@needs(key("tiny", pooled_only_last=False), key("tiny"))
def test_pooled_only_last_false_still_validates(exports):
    case = exports.case("tiny")
    path = exports.get("tiny", "fp32", pooled_only_last=False)  # validate=True: raises if off
    pooled = exports.get("tiny", "fp32")
    m = json.loads((path / "manifest.json").read_text())
    assert m["options"]["pooled_only_last"] is False
    assert all(r["ok"] for r in m["fidelity"].values())
    pm = json.loads((pooled / "manifest.json").read_text())
    assert m["files"]["image.onnx"]["sha256"] != pm["files"]["image.onnx"]["sha256"]  # a different graph
    img, txt = raw_features(Pipeline.load(path), case.pixels, case.ids)
    assert max_abs(img, case.ref_image) <= FP32_MAX_ABS
    assert max_abs(txt, case.ref_text) <= FP32_MAX_ABS


@needs(key("tiny", labels=digit_labels()))
def test_labels_bake_a_head(exports, tmp_path):
    labels = digit_labels()
    path = exports.get("tiny", "fp32", labels=labels)
    m = json.loads((path / "manifest.json").read_text())
    assert m["head"]["labels"] == labels and m["head"]["output"] == "logits"
    assert m["head"]["templates"] and all("{}" in t for t in m["head"]["templates"])
    outputs = [o.name for o in onnx.load(str(path / "image.onnx"), load_external_data=False).graph.output]
    assert outputs == ["image_embeds", "logits"]
    assert m["graphs"]["image"]["outputs"]["logits"]["shape"] == ["batch", len(labels)]

    pipe = Pipeline.load(path)
    case = exports.case("tiny")
    preds = pipe.classify(case.pixels)
    assert "text" not in pipe._graphs  # the baked head answered: no text encoder ran
    assert len(preds) == len(case.pixels) and all(p.labels == tuple(labels) for p in preds)
    # the baked logits equal the ones the runtime computes through its own text graph
    fresh = Pipeline.load(path)
    via_text = fresh.classify(case.pixels, labels=labels, templates=m["head"]["templates"])
    assert "text" in fresh._graphs
    for a, b in zip(preds, via_text):
        assert a.label == b.label
        assert max_abs(a.scores, b.scores) <= 1e-4


@needs(key("tiny", target="ort-mobile"), key("tiny"))
def test_ort_mobile_writes_ort_files_only(exports):
    case = exports.case("tiny")
    ort_path = exports.get("tiny", "fp32", target="ort-mobile")
    onnx_path = exports.get("tiny", "fp32")
    files = sorted(p.relative_to(ort_path).as_posix() for p in ort_path.rglob("*") if p.is_file())
    assert "image.ort" in files and "text.ort" in files
    assert not [f for f in files if f.endswith(".onnx")], files
    mo = json.loads((ort_path / "manifest.json").read_text())
    mx = json.loads((onnx_path / "manifest.json").read_text())
    assert mo.keys() - {"ort-mobile"} == mx.keys() and mo["ort-mobile"]["contrib_ops"].keys() == {"image", "text"}
    assert mo["graphs"].keys() == mx["graphs"].keys() and mo["text"].keys() == mx["text"].keys()
    assert mo["target"] == "ort-mobile" and mo["graphs"]["image"]["file"] == "image.ort"
    assert set(mo["files"]) == {f for f in files if f != "manifest.json"}
    p_ort, p_onnx = Pipeline.load(ort_path), Pipeline.load(onnx_path)
    a_img, a_txt = raw_features(p_ort, case.pixels, case.ids)
    b_img, b_txt = raw_features(p_onnx, case.pixels, case.ids)
    assert max_abs(a_img, b_img) <= 1e-4 and max_abs(a_txt, b_txt) <= 1e-4
    assert max_abs(a_img, case.ref_image) <= FP32_MAX_ABS and max_abs(a_txt, case.ref_text) <= FP32_MAX_ABS
    assert max_abs(p_ort.encode_text(["a photo of the number seven."]),
                   p_onnx.encode_text(["a photo of the number seven."])) <= 1e-4


# ---------------------------------------------------------------------------------- validation

def test_validation_failure_names_every_output_and_writes_nothing(exports, tmp_path, monkeypatch):
    from edgeclip.exporter.formats.onnx import OnnxTarget

    model = exports.model("tiny")
    # Impossible bounds (cosine can't reach 1.5): every output fails. The error path is under test.
    monkeypatch.setitem(OnnxTarget.tolerances, "fp32", Tolerance(max_abs=0.0, min_cosine=1.5))
    parent = tmp_path / "parent"
    parent.mkdir()
    out = parent / "art"
    with pytest.raises(ValidationError) as info:
        edgeclip.export(model, target="onnx", precision="fp32", out=out, labels=digit_labels()[:4])
    msg = str(info.value)
    for name in ("image_embeds", "text_embeds", "logits"):
        assert name in msg
    assert {f["output"] for f in info.value.failures} == {"image_embeds", "text_embeds", "logits"}
    assert "validate=False" in msg  # says what to do
    assert not out.exists()
    assert list(parent.iterdir()) == []  # no staging folder left behind either

    # validate=False keeps the same export, with the failed fidelity recorded in its manifest
    art = edgeclip.export(model, target="onnx", precision="fp32", out=out, validate=False)
    assert out.is_dir() and (out / "manifest.json").is_file()
    assert [n for n, r in art.fidelity.items() if not r["ok"]] == ["image_embeds", "text_embeds"]
    assert sorted(p.name for p in parent.iterdir()) == ["art"]


@needs(key("tiny"))
def test_export_refuses_to_overwrite_without_asking(exports, tmp_path):
    out = exports.get("tiny", "fp32")
    before = (out / "manifest.json").read_bytes()
    with pytest.raises(edgeclip.EdgeClipError, match="overwrite"):
        edgeclip.export(exports.model("tiny"), target="onnx", out=out)
    assert (out / "manifest.json").read_bytes() == before


# ------------------------------------------------------------------------------------ fusions

@pytest.mark.parametrize("name", ["tiny", "ViT-B-32", pytest.param("ViT-B-16", marks=pytest.mark.slow),
                                  pytest.param("Long-CLIP-B", marks=pytest.mark.slow),
                                  pytest.param("SigLIP-B-16", marks=pytest.mark.slow),
                                  pytest.param("ViT-L-14-336", marks=pytest.mark.slow)])
@needs(lambda p: key(p["name"], "fp32"))
def test_ort_graphs_have_no_unfused_attention(exports, name):
    """Every attention of both towers is one MultiHeadAttention, in the file and (but for ViT-L, the
    same code at 1.7 GB) after ONNX Runtime's own optimizations, which must not undo it."""
    import onnxruntime as ort
    from collections import Counter

    from edgeclip.specs import get_spec

    spec = get_spec(name)
    path = exports.get(name, "fp32")
    expected = {"image": spec.vision.layers + int(spec.vision.pool == "map"), "text": spec.text.layers}
    for graph, count in expected.items():
        ops = Counter(n.op_type for n in onnx.load(str(path / f"{graph}.onnx")).graph.node)
        assert ops["MultiHeadAttention"] == count and ops["Softmax"] == 0, (graph, dict(ops))
        if name == "ViT-L-14-336":
            continue  # the same blocks as the B-sized models, whose optimized graphs are checked below (1 min less)
        so = ort.SessionOptions()
        so.optimized_model_filepath = str(path.parent / f"{name}-{graph}-optimized.onnx")
        ort.InferenceSession(str(path / f"{graph}.onnx"), so, providers=["CPUExecutionProvider"])
        optimized = Counter(n.op_type for n in onnx.load(so.optimized_model_filepath).graph.node)
        assert optimized["MultiHeadAttention"] == count and optimized["Softmax"] == 0, (graph, dict(optimized))


# ------------------------------------------------------------------------------------ MobileCLIP

@pytest.mark.slow
@pytest.mark.parametrize("name", MOBILECLIP)
@needs(lambda p: key(p["name"], "fp32"))
def test_mci_graphs_hold_no_batchnorm_and_no_branches(exports, name):
    """Reparameterized at export: one Conv per convolution of the folded tower, no BatchNormalization,
    and every attention of the image tower fused; the manifest says what was folded."""
    import copy
    from collections import Counter

    import torch.nn as nn

    path = exports.get(name, "fp32")
    folded = copy.deepcopy(exports.model(name).visual)
    folded.reparameterize()
    convs = sum(isinstance(m, nn.Conv2d) for m in folded.modules())
    ops = Counter(n.op_type for n in onnx.load(str(path / "image.onnx")).graph.node)
    assert ops["BatchNormalization"] == 0 and ops["Conv"] == convs, dict(ops)
    assert ops["MultiHeadAttention"] == folded.attention_layout()[0] and ops["Softmax"] == 0, dict(ops)
    m = Pipeline.load(path).manifest
    assert m["towers"]["image"]["kind"] == "mci" and m["towers"]["image"]["reparameterized"]["blocks"] > 0
    assert m["text"]["trim"] is False and "not causal" in m["text"]["trim_note"]


@pytest.mark.slow
@needs(key("MobileCLIP-S1", "fp32"))
def test_mobileclip_artifact_runs_with_torch_blocked(exports, tmp_path):
    import subprocess
    import sys
    import textwrap

    case = exports.case("MobileCLIP-S1")
    np.save(tmp_path / "pixels.npy", case.pixels)
    np.save(tmp_path / "ids.npy", case.ids)
    code = textwrap.dedent(f"""
        import sys
        sys.modules["torch"] = None  # any "import torch" now raises ImportError
        import numpy as np
        from edgeclip.runtime import Pipeline
        p = Pipeline.load({str(exports.get("MobileCLIP-S1", "fp32"))!r})
        np.save({str(tmp_path / "img.npy")!r}, p.encode_image(np.load({str(tmp_path / "pixels.npy")!r})))
        np.save({str(tmp_path / "txt.npy")!r}, p.encode_text(np.load({str(tmp_path / "ids.npy")!r})))
        assert sys.modules["torch"] is None
    """)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert max_abs(np.load(tmp_path / "img.npy"), unit(case.ref_image)) <= 1e-5
    assert max_abs(np.load(tmp_path / "txt.npy"), unit(case.ref_text)) <= 1e-5
