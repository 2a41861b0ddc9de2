"""Adapter heads: the numpy reference vs the export modules, fitting on the built-in digits,
importing trained heads in their common layouts, exporting them inside the image graph (ONNX,
OpenVINO, INT8 with the guard), and running them in the runtime. Real files, real sessions."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("onnxruntime")

import edgeclip  # noqa: E402
from edgeclip import heads as H  # noqa: E402
from edgeclip.builtin import digit_labels, fewshot_dir, heldout_dir, prompt_templates  # noqa: E402
from edgeclip.cli import main as cli  # noqa: E402
from edgeclip.errors import EdgeClipError, HeadError, HeadShapeError, UnknownHeadError  # noqa: E402
from edgeclip.heads.importers import import_head  # noqa: E402
from edgeclip.runtime import Pipeline  # noqa: E402

E = 64  # the built-in model's embedding width
LABELS = digit_labels()


def unit(a):
    return a / np.linalg.norm(a, axis=-1, keepdims=True)


def random_heads(rng, c=7, e=24) -> list:
    text = unit(rng.normal(size=(c, e)))
    keys = unit(rng.normal(size=(c * 3, e)))
    onehot = np.eye(c)[np.repeat(np.arange(c), 3)]
    classes = [f"c{i}" for i in range(c)]
    return [
        H.Head("zero_shot", "zs", classes, {"text_weights": text}, {"scale": 50.0, "bias": -2.0}),
        H.Head("linear", "lin", classes, {"weight": rng.normal(size=(c, e)), "bias": rng.normal(size=c)}),
        H.Head("linear", "lin_raw", classes, {"weight": rng.normal(size=(c, e)), "bias": rng.normal(size=c)},
               {"normalize": 0}),
        H.Head("residual_adapter", "ada", classes, {"w1": rng.normal(size=(6, e)), "w2": rng.normal(size=(e, 6)),
                                                   "b1": rng.normal(size=6), "text_weights": text}, {"ratio": 0.3}),
        # shuffled one-hot cache: the module regroups it by class (a per-class sum)
        H.Head("tip_adapter", "tip", classes, {"keys": keys[::-1], "values": onehot[::-1], "text_weights": text},
               {"alpha": 2.0, "beta": 7.0}),
        # soft values (Tip-Adapter-F style learned values): the dense product path
        H.Head("tip_adapter", "tip_dense", classes, {"keys": keys, "values": np.abs(rng.normal(size=(c * 3, c))),
                                                    "text_weights": text}),
        H.Head("gda", "gda", classes, {"means": rng.normal(size=(c, e)) * 0.3, "text_weights": text,
                                       "precision": np.eye(e) * 3 + 0.1, "priors": np.full(c, 1 / c)},
               {"alpha": 0.5}),
    ]


# ------------------------------------------------------------------------------- maths and data

def test_every_kind_torch_module_matches_numpy_reference():
    rng = np.random.default_rng(0)
    feats = rng.normal(size=(5, 24)) * 3.0
    for head in random_heads(rng):
        want = head.logits(feats)
        with torch.no_grad():
            got = head.module()(torch.from_numpy(feats.astype(np.float32))).numpy()
        assert got.shape == (5, 7)
        assert np.abs(got - want).max() <= 1e-4 * max(1.0, np.abs(want).max()), head.name
    # the two Tip-Adapter paths really differ (grouped sum vs dense product) and both match
    tip = random_heads(rng)[4]
    assert H.kinds.one_hot_groups(tip.arrays["values"]) is not None
    assert H.kinds.one_hot_groups(random_heads(rng)[5].arrays["values"]) is None


def test_gda_folded_linear_form_equals_its_gaussian_form():
    rng = np.random.default_rng(1)
    head = random_heads(rng)[-1]
    feats = rng.normal(size=(4, 24))
    w, b = H.kinds.Gda.folded(head)
    want = head.logits(feats)  # float32 out of float64 maths
    assert np.abs(unit(feats) @ w.T + b - want).max() < 1e-6 * np.abs(want).max()


def test_head_file_round_trip_and_typed_errors(tmp_path):
    rng = np.random.default_rng(2)
    for head in random_heads(rng):
        back = H.load_head(head.save(tmp_path / head.name))
        assert (back.kind, back.name, back.classes, back.params) == (head.kind, head.name, head.classes, head.params)
        assert all(np.array_equal(back.arrays[k], head.arrays[k]) for k in head.arrays)
    tip = random_heads(rng)[4]
    with pytest.raises(HeadShapeError, match=r"tensor 'keys'.*embedding width 64"):
        tip.check(E, "tiny")
    with pytest.raises(HeadShapeError, match="expected"):
        tip.check(24, "m", classes=["a", "b"])
    with pytest.raises(HeadShapeError, match=r"tensor 'values' has shape \(21, 7\), expected \(21, 6\): C=7 disagrees with 6 classes"):
        H.Head("tip_adapter", "t", [f"c{i}" for i in range(6)], tip.arrays)
    with pytest.raises(HeadError, match="unknown head kind 'svm'"):
        H.Head("svm", "s", ["a"], {})
    with pytest.raises(HeadError, match="must start with a letter"):
        H.Head("linear", "my head", ["a"], {"weight": np.ones((1, 3)), "bias": np.ones(1)})
    bad = tmp_path / "corrupt.npz"
    bad.write_bytes(b"PK\x03\x04 not a zip")
    with pytest.raises(HeadError, match="not a readable"):
        H.load_head(bad)
    plain = tmp_path / "plain.npz"
    np.savez(plain, foo=np.ones(3))
    with pytest.raises(HeadError, match="without edgeclip head metadata"):
        H.load_head(plain)


def test_a_head_file_named_without_its_suffix(tmp_path, monkeypatch):
    """What `Head.save(STEM)` wrote (STEM.npz) is found as STEM, plain or as NAME=STEM; only STEM.npz
    is tried: never another folder, never for a name with '.npz' already, and an existing STEM wins."""
    from edgeclip.heads.base import head_file, resolve

    lin = random_heads(np.random.default_rng(3), e=E)[1]
    assert lin.save(tmp_path / "lin") == tmp_path / "lin.npz"
    stem = tmp_path / "lin"
    assert head_file(stem) == tmp_path / "lin.npz" and head_file(str(stem)) == tmp_path / "lin.npz"
    got = resolve([stem, f"renamed={stem}"], E, "tiny")
    assert [h.name for h in got] == ["lin", "renamed"]
    assert all(np.array_equal(h.arrays["weight"], lin.arrays["weight"]) for h in got)
    for unchanged in (tmp_path / "lin.npz", tmp_path / "x.npz", "", str(tmp_path) + "/"):
        assert head_file(unchanged) == unchanged
    (tmp_path / "sub").mkdir()
    monkeypatch.chdir(tmp_path / "sub")  # a bare name is looked up where it says, not in other folders
    with pytest.raises(HeadError, match="head file not found: lin "):
        resolve(["lin"], E)
    with pytest.raises(HeadError, match="head file not found: lin "):
        resolve(["renamed=lin"], E)
    (tmp_path / "sub" / "lin").write_bytes(b"not a head")  # the name as given exists: no fallback
    assert head_file("lin") == "lin"
    with pytest.raises(HeadError, match="not a readable"):
        resolve(["lin"], E)


# ------------------------------------------------------------------------------------- fitting

@pytest.fixture(scope="module")
def encoder():
    return H.encoder_for("builtin:tiny")


@pytest.fixture(scope="module")
def heldout(encoder):
    ev = H.encode_folder(encoder.image, heldout_dir(), labels=LABELS, what="--eval")
    return ev.feats[:, 0], ev.labels


@pytest.fixture(scope="module")
def zero_shot(encoder):
    return H.zero_shot_head(encoder.text, LABELS, prompt_templates(), encoder.scale)


@pytest.fixture(scope="module")
def fitted(encoder, zero_shot):
    data = H.encode_folder(encoder.image, fewshot_dir(), labels=LABELS, shots=16, seed=0, augment=4)
    return {k: H.fit(k, data, zero_shot.arrays["text_weights"], encoder.scale) for k in ("linear", "tip", "gda")}


def test_sixteen_shot_heads_beat_zero_shot_on_heldout_digits(fitted, zero_shot, heldout):
    feats, labels = heldout
    zs = H.top1(zero_shot, feats, labels)
    assert zs > 0.98  # the built-in model is strong zero-shot: the heads must still do better
    for kind, head in fitted.items():
        assert H.top1(head, feats, labels) > zs, (kind, head.info["fit"])
        assert head.info["shots"] == 16 and head.info["fit"]["by"].startswith("4-fold")


def test_fitting_is_deterministic_for_a_seed(encoder, zero_shot):
    def run(seed):
        data = H.encode_folder(encoder.image, fewshot_dir(), labels=LABELS, shots=2, seed=seed, augment=1)
        return H.fit("linear", data, zero_shot.arrays["text_weights"], encoder.scale), data.files

    (a, fa), (b, fb), (_, fc) = run(3), run(3), run(4)
    assert fa == fb and fa != fc
    assert np.array_equal(a.arrays["weight"], b.arrays["weight"])


def test_fit_errors(encoder, zero_shot, tmp_path):
    with pytest.raises(HeadError, match="has 32 image.*--shots 40"):
        H.encode_folder(encoder.image, fewshot_dir(), shots=40)
    with pytest.raises(HeadError, match="cannot fit a 'svm' head"):
        H.fit("svm", None, None, 1.0)
    (tmp_path / "flat").mkdir()
    with pytest.raises(EdgeClipError, match="--train folder"):
        H.encode_folder(encoder.image, tmp_path / "flat")


# ------------------------------------------------------------------------------------ importing

@pytest.fixture(scope="module")
def imported(tmp_path_factory, encoder, zero_shot, fitted, heldout):
    """The four import layouts, written the way their own tools write them."""
    d = tmp_path_factory.mktemp("imports")
    rng = np.random.default_rng(5)
    text = zero_shot.arrays["text_weights"]
    # an nn.Linear saved whole (probe trained in torch)
    lin = torch.nn.Linear(E, 10)
    with torch.no_grad():
        lin.weight.copy_(torch.from_numpy(fitted["linear"].arrays["weight"]))
        lin.bias.copy_(torch.from_numpy(fitted["linear"].arrays["bias"]))
    torch.save(lin, d / "probe.pt")
    # CLIP-Adapter: Sequential(Linear(E, E/4, bias=False), ReLU, Linear(E/4, E, bias=False), ReLU)
    adapter = torch.nn.Module()
    adapter.fc = torch.nn.Sequential(torch.nn.Linear(E, E // 4, bias=False), torch.nn.ReLU(),
                                     torch.nn.Linear(E // 4, E, bias=False), torch.nn.ReLU())
    torch.save({"adapter": adapter.state_dict()}, d / "clip_adapter.pth")
    # Tip-Adapter-F: keys stored (E, K) as its code does, one-hot values, fine-tuned keys (K, E)
    keys = fitted["tip"].arrays["keys"]
    torch.save({"cache_keys": torch.from_numpy(keys.T.copy()),
                "cache_values": torch.from_numpy(fitted["tip"].arrays["values"]).half(),
                "adapter.weight": torch.from_numpy(unit(keys + 0.05 * rng.normal(size=keys.shape)))},
               d / "tip_f.pt")
    # scikit-learn logistic regression on the shots' features, saved with numpy
    from sklearn.linear_model import LogisticRegression

    feats, labels = heldout
    clf = LogisticRegression(C=10.0, max_iter=500).fit(feats[::3], labels[::3])
    np.savez(d / "sklearn.npz", coef_=clf.coef_, intercept_=clf.intercept_)
    heads = {
        "probe": import_head(d / "probe.pt", classes=LABELS, embed_dim=E, name="probe"),
        "adapter": import_head(d / "clip_adapter.pth", classes=LABELS, embed_dim=E, text_weights=text,
                               scale=encoder.scale, name="adapter"),
        "tipf": import_head(d / "tip_f.pt", classes=LABELS, embed_dim=E, text_weights=text, scale=encoder.scale,
                            name="tipf", params={"alpha": 5.0, "beta": 3.0}),
        "sk": import_head(d / "sklearn.npz", classes=LABELS, embed_dim=E, name="sk", params={"normalize": 0}),
    }
    return d, heads, clf


def test_imports_recognise_their_layouts(imported, fitted, heldout):
    d, heads, clf = imported
    assert [h.kind for h in heads.values()] == ["linear", "residual_adapter", "tip_adapter", "linear"]
    assert heads["tipf"].arrays["keys"].shape == (160, E)  # transposed back from (E, K)
    assert heads["tipf"].info["tensors"]["keys"] == "adapter.weight"  # the fine-tuned keys won
    assert heads["adapter"].info["tensors"]["w1"] == "adapter.fc.0.weight"
    feats, _ = heldout
    # sklearn's own decision function is the reference for its coef_/intercept_
    assert np.abs(heads["sk"].logits(feats) - clf.decision_function(feats)).max() < 1e-4
    assert np.abs(heads["probe"].logits(feats) - fitted["linear"].logits(feats)).max() < 1e-4


def test_import_errors_say_which_tensor_and_what_was_expected(imported, tmp_path, zero_shot):
    d, _, _ = imported
    with pytest.raises(HeadShapeError, match=r"tensor 'weight' has shape \(10, 64\).*embedding width 512"):
        import_head(d / "probe.pt", classes=LABELS, embed_dim=512)
    with pytest.raises(HeadShapeError, match=r"tensor 'coef_' has shape \(10, 64\).*C=10 disagrees with 3 classes"):
        import_head(d / "sklearn.npz", classes=["a", "b", "c"], embed_dim=E)
    with pytest.raises(HeadShapeError, match="cache_values"):
        import_head(d / "tip_f.pt", classes=LABELS[:4], embed_dim=E, text_weights=zero_shot.arrays["text_weights"][:4])
    torch.save({"conv.weight": torch.zeros(3, 3, 3, 3), "conv.bias": torch.zeros(3)}, tmp_path / "conv.pt")
    with pytest.raises(HeadError, match=r"unknown head layout \(tensors: conv.weight \(3, 3, 3, 3\)"):
        import_head(tmp_path / "conv.pt", classes=LABELS)
    with pytest.raises(HeadError, match="pass --model"):
        import_head(d / "clip_adapter.pth", classes=LABELS)
    with pytest.raises(HeadError, match="give the class names"):
        import_head(d / "probe.pt")


# ---------------------------------------------------------------------------------- exporting

def _head_files(tmp, heads: dict) -> list[str]:
    return [str(h.save(Path(tmp) / f"{name}.npz")) for name, h in heads.items()]


@pytest.fixture(scope="module")
def all_heads(imported, fitted, zero_shot):
    return {**imported[1], "tip": fitted["tip"], "gda": fitted["gda"], "zero_shot": zero_shot}


@pytest.fixture(scope="module")
def onnx_fp32(tmp_path_factory, all_heads):
    d = tmp_path_factory.mktemp("heads-onnx")
    return edgeclip.export("builtin:tiny", target="onnx", precision="fp32", out=d / "art",
                           heads=_head_files(d, all_heads)).path


def _graph_logits(art: Path, backend: str, heads: dict) -> tuple[dict, dict]:
    p = Pipeline.load(art, backend=backend, **({"inference_precision": "f32"} if backend == "openvino" else {}))
    pixels = p.preprocess(sorted(heldout_dir().glob("*/*.png"))[::12])
    out = p._graph("image").run({"pixel_values": pixels})
    return out, {name: h.logits(out["image_embeds"]) for name, h in heads.items()}


def _assert_within_1e4(out: dict, ref: dict):
    for name, want in ref.items():
        got = out[f"logits_{name}"]
        assert got.shape == want.shape
        assert np.abs(got - want).max() <= 1e-4, (name, float(np.abs(got - want).max()))


def test_onnx_fp32_heads_match_numpy_reference(onnx_fp32, all_heads):
    m = json.loads((onnx_fp32 / "manifest.json").read_text())
    assert list(m["heads"]) == list(all_heads)
    assert m["heads"]["tipf"]["kind"] == "tip_adapter" and m["heads"]["sk"]["mcm_output"] is None
    out, ref = _graph_logits(onnx_fp32, "ort", all_heads)
    _assert_within_1e4(out, ref)
    for name, h in all_heads.items():  # MCM (Tip-Adapter's reuses its zero-shot cosines) vs numpy
        if h.has_text:
            assert np.abs(out[f"mcm_{name}"] - h.mcm(out["image_embeds"])).max() <= 1e-5, name
        else:
            assert f"mcm_{name}" not in out
    # the export's own validation compared every head with the numpy reference on the torch features
    assert all(m["fidelity"][f"logits_{n}"]["ok"] for n in all_heads)


def test_openvino_heads_fp32_within_1e4_and_int8_agreement(tmp_path, imported, all_heads):
    pytest.importorskip("openvino")
    heads = imported[1]
    files = _head_files(tmp_path, heads)
    art = edgeclip.export("builtin:tiny", target="openvino", precision="fp32", out=tmp_path / "ov",
                          heads=files).path
    out, ref = _graph_logits(art, "openvino", heads)
    _assert_within_1e4(out, ref)
    int8 = edgeclip.export("builtin:tiny", target="openvino", precision="int8", out=tmp_path / "ov8",
                           heads=files[2:]).path   # tipf, sk
    q = json.loads((int8 / "manifest.json").read_text())["quantization"]["graphs"]["image"]
    assert set(q["head_agreement"]) == {"logits_tipf", "logits_sk"}
    fp32, quant = (Pipeline.load(a, inference_precision="f32") for a in (art, int8))
    images = sorted(heldout_dir().glob("*/*.png"))
    for name in ("tipf", "sk"):
        a = np.array([x.index for x in fp32.classify(images, head=name)])
        b = np.array([x.index for x in quant.classify(images, head=name)])
        assert (a == b).mean() >= 0.99, (name, (a == b).mean())


def test_one_graph_call_per_batch_and_text_graph_untouched(onnx_fp32, all_heads):
    p = Pipeline.load(onnx_fp32)
    files = sorted(heldout_dir().glob("*/*.png"))[:9]
    calls = []
    real = p._graph("image").run
    p._graph("image").run = lambda feeds: calls.append(len(feeds["pixel_values"])) or real(feeds)
    preds = p.classify(files, head="tipf")
    assert calls == [9]  # one call for the whole batch, pixels to logits
    assert "text" not in p._graphs
    want = all_heads["tipf"].logits(p.encode_image(files))
    assert [x.index for x in preds] == list(want.argmax(1))
    assert all(set(x.ood) == {"max_softmax", "mcm"} for x in preds)
    assert set(p.heads) == set(all_heads)
    assert "mcm" not in p.classify(files[0], head="sk").ood  # no class text, no MCM
    with pytest.raises(UnknownHeadError, match=r"no head named 'svm'.*probe, adapter"):
        p.classify(files, head="svm")
    with pytest.raises(EdgeClipError, match="not both"):
        p.classify(files, head="tip", labels=["a", "b"])


def test_export_rejects_wrong_width_and_duplicate_names(tmp_path, imported):
    wide = H.Head("linear", "wide", ["a", "b"], {"weight": np.ones((2, 512)), "bias": np.zeros(2)})
    with pytest.raises(HeadShapeError, match="embedding width 64 of tiny"):
        edgeclip.export("builtin:tiny", out=tmp_path / "a", heads=[wide])
    probe = imported[1]["probe"]
    with pytest.raises(HeadError, match="two heads are named 'probe'"):
        edgeclip.export("builtin:tiny", out=tmp_path / "b", heads=[probe, probe])
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_int8_heads_keep_top1_agreement(tmp_path, all_heads, onnx_fp32):
    heads = {k: all_heads[k] for k in ("tipf", "gda", "adapter", "probe")}
    art = edgeclip.export("builtin:tiny", target="onnx", precision="int8", out=tmp_path / "int8",
                          heads=_head_files(tmp_path, heads)).path
    m = json.loads((art / "manifest.json").read_text())
    q = m["quantization"]["graphs"]["image"]
    assert set(q["head_agreement"]) == {f"logits_{k}" for k in heads}
    assert min(q["head_agreement"].values()) >= 0.99
    import onnx

    # the heads are layers like any other: their products run as int8 kernels unless the guard said no
    graph = onnx.load(str(art / "image.onnx")).graph
    int8_heads = {i.name.split(".")[1] for i in graph.initializer
                  if i.name.startswith("heads.") and i.data_type == onnx.TensorProto.INT8}
    assert int8_heads == set(heads) - {layer.split(".")[1] for layer in q["float_layers"] if layer.startswith("heads.")}
    assert int8_heads, "no head was quantized"
    fp32, int8 = Pipeline.load(onnx_fp32), Pipeline.load(art)
    files = sorted(heldout_dir().glob("*/*.png"))
    for name in heads:
        a = [x.index for x in fp32.classify(files, head=name)]
        b = [x.index for x in int8.classify(files, head=name)]
        agreement = float(np.mean(np.equal(a, b)))
        assert agreement >= 0.99, (name, agreement)
        assert m["heads"][name]["int8_top1_agreement"] == q["head_agreement"][f"logits_{name}"]


@pytest.mark.parametrize("recipe", ["w4a16"])  # w4a8 shares its weights and guard (its top-1: tests/test_int8.py)
def test_4bit_heads_keep_top1_agreement(tmp_path, all_heads, onnx_fp32, recipe):
    """The 4-bit recipes guard the heads too: on every held-out digit each head's top-1 agrees with FP32."""
    heads = {k: all_heads[k] for k in ("tipf", "adapter", "probe")}
    art = edgeclip.export("builtin:tiny", target="onnx", precision="int8", recipe=recipe, out=tmp_path / recipe,
                          heads=_head_files(tmp_path, heads)).path
    m = json.loads((art / "manifest.json").read_text())
    q = m["quantization"]["graphs"]["image"]
    assert min(q["head_agreement"].values()) >= 0.99
    assert any(k.startswith("heads.") and b < 32 for k, b in q["bits"].items())  # heads are quantized layers
    fp32, low = Pipeline.load(onnx_fp32), Pipeline.load(art)
    files = sorted(heldout_dir().glob("*/*.png"))
    for name in heads:
        a = [x.index for x in fp32.classify(files, head=name)]
        b = [x.index for x in low.classify(files, head=name)]
        assert float(np.mean(np.equal(a, b))) >= 0.99, name


NO_TORCH = r"""
import json, sys
for name in ("torch", "transformers"):
    sys.modules[name] = None
from edgeclip.runtime import Pipeline
p = Pipeline.load(sys.argv[1])
calls = []
g = p._graph("image"); real = g.run
g.run = lambda feeds: calls.append(1) or real(feeds)
preds = p.classify(sys.argv[3:], head=sys.argv[2])
print(json.dumps({"labels": [x.label for x in preds], "ood": [x.ood for x in preds], "calls": len(calls),
                  "torch": sys.modules.get("torch") is not None}))
"""


def test_heads_run_without_torch(onnx_fp32, tmp_path):
    files = [str(sorted((heldout_dir() / str(d)).glob("*.png"))[0]) for d in range(10)]
    proc = subprocess.run([sys.executable, "-c", NO_TORCH, str(onnx_fp32), "gda", *files],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["torch"] is False and got["calls"] == 1
    assert sum(a == b for a, b in zip(got["labels"], LABELS)) >= 9
    here = Pipeline.load(onnx_fp32).classify(files, head="gda")
    assert [x.label for x in here] == got["labels"]


# ------------------------------------------------------------------------------------------ CLI

def test_cli_fit_export_run(tmp_path, capsys):
    head = tmp_path / "tip.npz"
    assert cli(["heads", "fit", "builtin:tiny", "--kind", "tip", "--train", str(fewshot_dir()), "--shots", "4",
                "--augment", "0", "--labels", ",".join(LABELS), "--eval", str(heldout_dir()), "--out", str(head),
                "--json"]) == 0
    fit = json.loads(capsys.readouterr().out)
    assert fit["kind"] == "tip_adapter" and fit["shots"] == 4 and fit["heldout"]["images"] == 360
    assert fit["heldout"]["top1"] > 0.95
    art = tmp_path / "art"
    assert cli(["export", "builtin:tiny", "--head", f"digits={head}", "--out", str(art), "--json"]) == 0
    capsys.readouterr()
    img = sorted((heldout_dir() / "7").glob("*.png"))[0]
    assert cli(["run", str(art), "--image", str(img), "--head", "digits", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)["images"][0]
    assert r["label"] == "seven" and r["head"] == "digits" and 0 < r["ood"]["mcm"] <= 1
    assert cli(["run", str(art), "--image", str(img), "--head", "nope"]) == 2
    assert "no head named 'nope'" in capsys.readouterr().err
    assert cli(["heads", "show", str(head)]) == 0
    assert "tip_adapter head, 10 classes" in capsys.readouterr().out


def test_cli_import_checks_against_the_model(imported, tmp_path, capsys):
    d = imported[0]
    out = tmp_path / "adapter.npz"
    assert cli(["heads", "import", str(d / "clip_adapter.pth"), "--classes", ",".join(LABELS), "--model",
                "builtin:tiny", "--ratio", "0.4", "--out", str(out), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["kind"] == "residual_adapter" and info["params"]["ratio"] == 0.4
    assert info["shapes"]["text_weights"] == [10, E]
    assert cli(["heads", "import", str(d / "sklearn.npz"), "--classes", "a,b", "--model", "builtin:tiny",
                "--out", str(tmp_path / "x.npz")]) == 2
    assert "tensor 'coef_' has shape (10, 64)" in capsys.readouterr().err
    assert not (tmp_path / "x.npz").exists()


def test_ort_mobile_and_fp16_carry_the_heads(tmp_path, imported, onnx_fp32):
    heads = {k: imported[1][k] for k in ("tipf", "sk")}
    files = _head_files(tmp_path, heads)
    mobile = edgeclip.export("builtin:tiny", target="ort-mobile", out=tmp_path / "ort", heads=files).path
    assert (mobile / "image.ort").is_file()
    out, ref = _graph_logits(mobile, "ort", heads)
    _assert_within_1e4(out, ref)
    half = edgeclip.export("builtin:tiny", target="onnx", precision="fp16", out=tmp_path / "fp16", heads=files).path
    images = sorted(heldout_dir().glob("*/*.png"))[::4]
    fp32, fp16 = Pipeline.load(onnx_fp32), Pipeline.load(half)
    for name in heads:
        a = np.array([x.index for x in fp32.classify(images, head=name)])
        b = np.array([x.index for x in fp16.classify(images, head=name)])
        assert (a == b).mean() >= 0.98, name
