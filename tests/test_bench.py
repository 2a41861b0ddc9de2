"""`edgeclip bench` with reports: real artifacts of the built-in model, real baselines, one interleaved run.

One full run (FP32 + INT8 ONNX artifacts, --baselines, --eval on the held-out digits) is shared by the
tests below; small time budgets keep the file around a minute on 2 cores.
"""
from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from edgeclip.bench import BenchConfig, run_bench
from edgeclip.bench.report import markdown, mb_num
from edgeclip.bench.svg import PALETTE
from edgeclip.builtin import digit_labels, heldout_dir
from edgeclip.cli import main
from edgeclip.errors import ArtifactError, EvalDataError, UnknownModelError

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


# builtin:tiny to ONNX without a head: FP32 (also read by test_export_onnx), and INT8 calibrated on the
# shipped calibration set. Exported once per session (conftest.py), into folders named tiny-fp32 and
# tiny-int8 (the report names variants after their folders).
TINY_FP32 = {"model": "builtin:tiny", "target": "onnx", "precision": "fp32"}
TINY_INT8 = {"model": "builtin:tiny", "target": "onnx", "precision": "int8"}
SHARED_EXPORTS = {"artifacts": [TINY_FP32, TINY_INT8]}
TINY_DIGITS = {"model": "builtin:tiny", "target": "onnx", "precision": "fp32", "labels": digit_labels()}


@pytest.fixture(scope="module")
def artifacts(shared_exports, tmp_path_factory):
    root = tmp_path_factory.mktemp("bench-artifacts")  # reports, caches and copies: the artifacts stay as exported
    fp32, int8 = shared_exports.path(TINY_FP32), shared_exports.path(TINY_INT8)
    assert (fp32.name, int8.name) == ("tiny-fp32", "tiny-int8")
    return {"fp32": fp32, "int8": int8, "root": root}


@pytest.fixture(scope="module")
def full(artifacts):
    out = artifacts["root"] / "reports" / "tiny"
    argv = ["bench", str(artifacts["fp32"]), str(artifacts["int8"]), "--baselines", "--eval", str(heldout_dir()),
            "--labels", ",".join(digit_labels()), "--batch", "1,4", "--threads", "1", "--seconds", "0.15",
            "--report", str(out), "--baseline-cache", str(artifacts["root"] / "cache"), "--quiet"]
    assert main(argv) == 0
    paths = {fmt: out.with_name(f"tiny.{fmt}") for fmt in ("json", "md", "html")}
    return paths, json.loads(paths["json"].read_text())


def _variant(report, name):
    return next(v for v in report["variants"] if v["name"] == name)


def test_report_files_and_schema(full):
    paths, report = full
    assert all(p.is_file() and p.stat().st_size > 500 for p in paths.values())
    assert report["schema"] == "edgeclip-bench-report/1" and report["interleaved"] is True
    assert report["command"].startswith("edgeclip bench ") and "--baselines" in report["command"]
    m = report["machine"]
    assert m["cores"] >= 1 and m["cpu"]["model"] and isinstance(m["cpu"]["flags"], list)
    assert {"python", "numpy", "onnxruntime"} <= set(m["libraries"])
    assert "interleaved" in report["method"]["ratios"] and "interleaved" in report["method"]["latency"]
    names = [v["name"] for v in report["variants"]]
    assert names[:4] == ["tiny-fp32", "tiny-int8", "plain-onnx-fp32", "plain-onnx-int8-dynamic"]
    for v in report["variants"]:
        assert v["size_bytes"] > 0 and v["load_s"] > 0
        assert set(v["inference_precision"]) == {"image", "text"}  # what ran, read back per graph
        assert all(p in ("f32", "bf16", "f16") for p in v["inference_precision"].values())
        mem = v["memory"]  # a fresh process: peak above what the imports alone took, and no torch
        assert mem["peak_rss_bytes"] > mem["base_rss_bytes"] > 0 and mem["torch_imported"] is False
    # the quick rows' keys survive in the full report
    row = report["results"][0]
    assert {"artifact", "batch", "threads", "load_s", "backend", "backend_info", "size_bytes", "target",
            "precision", "graphs"} <= set(row)
    assert {"p50_ms", "p90_ms", "p99_ms", "items_per_s", "inference_precision"} <= set(row["graphs"][0])


def test_interleaved_ratios_are_present_and_positive(full):
    _, report = full
    names = {v["name"] for v in report["variants"]}
    assert report["base"] == "plain-onnx-fp32"
    assert {(c["graph"], c["batch"]) for c in report["latency"]} == {("image", 1), ("image", 4), ("text", 1), ("text", 4)}
    for c in report["latency"]:
        assert set(c["results"]) == names and c["rounds"] >= 5
        assert c["ratio_vs_base"]["plain-onnx-fp32"] == pytest.approx(1.0)
        for name, r in c["results"].items():
            assert 0 < r["p50_ms"] <= r["p90_ms"] <= r["p99_ms"] and r["iterations"] >= 5 * 3
            assert c["ratio_vs_base"][name] > 0 and r["items_per_s"] > 0
            # the pairwise matrix is consistent: a/b * b/a = 1 up to the rounds' median spread
            assert 0.5 < c["ratios"][name]["tiny-fp32"] * c["ratios"]["tiny-fp32"][name] < 2.0


def test_fidelity_and_accuracy(full):
    _, report = full
    fp32, int8 = _variant(report, "tiny-fp32")["fidelity"], _variant(report, "tiny-int8")["fidelity"]
    assert report["reference"]["kind"] == "torch" and report["reference"]["zero_shot_top1"] > 0.9
    assert fp32["image_cosine"]["min"] > 0.9999 and fp32["text_cosine"]["min"] > 0.9999
    assert fp32["top1_agreement"] == 1.0 and fp32["images"] == 360
    assert 0.98 < int8["image_cosine"]["mean"] < 1.0 and 0.98 < int8["text_cosine"]["mean"] < 1.0
    assert int8["top1_agreement"] > 0.95
    for v in report["variants"]:
        assert v["fidelity"]["zero_shot_top1"] > 0.9, v["name"]


def test_markdown_has_a_row_per_variant(full):
    paths, report = full
    md = paths["md"].read_text()
    assert "Ratios come from interleaved runs" in md
    for v in report["variants"]:
        summary = [line for line in md.splitlines() if line.startswith(f"| `{v['name']}` | {v['kind']} |")]
        assert len(summary) == 1, v["name"]
        latency = [line for line in md.splitlines() if line.startswith(f"| `{v['name']}` | ")]
        assert len(latency) == 1 + 4  # summary + one row per graph x batch
    assert re.search(r"\| `tiny-int8` \| artifact \| ort f32 \|", md)


def _tower_weights():
    import edgeclip

    m = edgeclip.load_model("builtin:tiny", seed=0)
    return {"image": sum(p.numel() for p in m.visual.parameters()), "text": sum(p.numel() for p in m.text.parameters())}


def _files_bytes(v: dict) -> dict:
    """Each graph's bytes on disk, read independently of the bench: an artifact's graph files as its
    manifest lists them, a baseline's files as the baseline cache's own record names them."""
    root = Path(v["path"])
    if v["kind"] == "artifact":
        files = {g: [info["file"]] for g, info in json.loads((root / "manifest.json").read_text())["graphs"].items()}
    else:
        stamp = json.loads((root / "baselines.json").read_text())
        graphs = next(b["graphs"] for b in stamp["variants"] if b["name"] == v["name"])
        files = {g: [f] + ([f[:-4] + ".bin"] if f.endswith(".xml") else []) for g, f in graphs.items()}
    return {g: sum((root / f).stat().st_size for f in fs) for g, fs in files.items()}


def test_sizes_per_tower_for_every_variant(full):
    _, report = full
    weights = _tower_weights()
    for v in report["variants"]:
        sizes, on_disk = v["sizes"], _files_bytes(v)
        assert set(sizes) == {"image", "text"}, v["name"]
        for g, s in sizes.items():
            assert s["bytes"] == on_disk[g] > 0, (v["name"], g)
            assert s["weights"] == weights[g], (v["name"], g)  # no head baked: the towers' parameters
            assert s["bits_per_weight"] == pytest.approx(s["bytes"] * 8 / s["weights"], abs=1e-3)
        lo, hi = sorted(s["bits_per_weight"] for s in sizes.values())
        assert lo <= v["bits_per_weight"] <= hi
    bits = {v["name"]: {g: s["bits_per_weight"] for g, s in v["sizes"].items()} for v in report["variants"]}
    for fp32, int8 in (("tiny-fp32", "tiny-int8"), ("plain-onnx-fp32", "plain-onnx-int8-dynamic")):
        for g in ("image", "text"):
            assert 32 < bits[fp32][g] < 40, (fp32, g)  # float32 weights plus the graph's structure
            assert bits[int8][g] < 0.5 * bits[fp32][g], (int8, g)
    # the artifacts' figures are their manifests' own
    for name in ("tiny-fp32", "tiny-int8"):
        v = _variant(report, name)
        assert v["sizes"] == json.loads((Path(v["path"]) / "manifest.json").read_text())["sizes"]
    for row in report["results"]:
        assert row["sizes"] == _variant(report, row["name"])["sizes"]


def test_size_columns_and_size_vs_fidelity_chart(full):
    paths, report = full
    md, html = paths["md"].read_text(), paths["html"].read_text()
    assert "| image MB | text MB | bits/weight (image / text) |" in md
    for v in report["variants"]:
        s = v["sizes"]
        cells = (f"| {mb_num(s['image']['bytes'])} | {mb_num(s['text']['bytes'])} | "
                 f"{s['image']['bits_per_weight']:.1f} / {s['text']['bits_per_weight']:.1f} |")
        line = next(line for line in md.splitlines() if line.startswith(f"| `{v['name']}` | {v['kind']} |"))
        assert cells in line, (cells, line)
        assert f"{mb_num(s['image']['bytes'])}</td>" in html
    charts = {m.group(1): m.group(0)
              for m in re.finditer(r'<svg class="plot scatter"[^>]*aria-label="([^"]+)".*?</svg>', html)}
    assert list(charts)[:2] == ["Latency vs fidelity (batch 1, threads 1)", "Size vs fidelity"]  # side by side
    assert "Size vs accuracy" in charts
    chart = charts["Size vs fidelity"]
    assert "image graph size, MB" in chart
    cx = {}
    for v in report["variants"]:  # one point per variant, placed left to right by the image graph's bytes
        found = re.findall(rf'<circle class="point" data-variant="{re.escape(v["name"])}" cx="([0-9.]+)"', chart)
        assert len(found) == 1, v["name"]
        cx[v["name"]] = float(found[0])
    by_bytes = sorted(cx, key=lambda n: _variant(report, n)["sizes"]["image"]["bytes"])
    assert [cx[n] for n in by_bytes] == sorted(cx.values())


def test_a_manifest_without_sizes_still_benches(artifacts):
    """An older export (no `sizes`): bytes from its files, weights from the rebuilt model, the same
    figures the exporter now records."""
    art = _old_copy(artifacts, "no-sizes", drop_source=False)
    report = run_bench(BenchConfig([str(art), str(artifacts["int8"])], seconds=0.05, memory=False, min_rounds=3,
                                   progress=False))
    recorded = json.loads((artifacts["fp32"] / "manifest.json").read_text())["sizes"]
    assert _variant(report, "no-sizes")["sizes"] == recorded
    assert not any("bits/weight left empty" in n for n in report["notes"])


def test_older_manifest_with_a_baked_head_counts_the_head(shared_exports):
    """The image graph of a zero-shot artifact holds the class embeddings too: an older manifest's
    weights are the tower's parameters plus classes x embedding width, as the exporter counts them."""
    import edgeclip
    from edgeclip.bench.sizes import artifact_sizes, tower_weights
    from edgeclip.runtime.manifest import read_manifest

    root = shared_exports.path(TINY_DIGITS)  # exported for the runtime tests too: not planned here
    m = read_manifest(root, verify=False)
    recorded = m.pop("sizes")
    towers = tower_weights(edgeclip.load_model("builtin:tiny", seed=0))
    assert recorded["image"]["weights"] == towers["image"] + len(digit_labels()) * m["model"]["embed_dim"]
    assert artifact_sizes(m, towers) == recorded
    unknown = artifact_sizes(m)  # no model: bytes only
    assert {g: s["bytes"] for g, s in unknown.items()} == {g: s["bytes"] for g, s in recorded.items()}
    assert all(s["weights"] is None and s["bits_per_weight"] is None for s in unknown.values())


def _pixels_near(img: np.ndarray, hex_colour: str, tol: int = 6) -> np.ndarray:
    rgb = np.array([int(hex_colour[i:i + 2], 16) for i in (1, 3, 5)])
    return (np.abs(img[..., :3].astype(int) - rgb).max(axis=-1) <= tol)


def test_html_renders_with_plots_in_headless_chromium(full, tmp_path):
    paths, report = full
    html = paths["html"].read_text()
    assert "<script" not in html and "http://" not in html.replace('xmlns="http://www.w3.org/2000/svg"', "")
    for v in report["variants"]:  # one point per variant in each scatter (latency and size; cosine, accuracy)
        assert html.count(f'<circle class="point" data-variant="{v["name"]}"') == 4
        assert html.count(f'<rect class="bar" data-variant="{v["name"]}"') == len(report["latency"])
    assert CHROMIUM, "Chromium is needed for this test: apt-get install -y chromium (make test installs it)"
    shot = tmp_path / "report.png"
    subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                    "--disable-component-update", "--disable-sync", "--no-first-run",
                    f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={shot}", "--window-size=1200,2000",
                    paths["html"].resolve().as_uri()], capture_output=True, timeout=120, check=True)
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    img = np.asarray(Image.open(shot).convert("RGB"))
    assert img.shape[:2] == (2000, 1200)
    area = _pixels_near(img, "#f7f8fa", tol=1)  # the scatter plots' background
    ys, xs = np.nonzero(area)
    assert area.sum() > 50_000, "no scatter plot area on the page"
    box = img[ys.min():ys.max() + 1, xs.min():xs.max() + 1]
    for i, v in enumerate(report["variants"]):  # every variant's points were drawn inside the plots
        assert _pixels_near(box, PALETTE[i]).sum() > 100, f"no points of {v['name']} ({PALETTE[i]})"


def _old_copy(artifacts, name: str, drop_source: bool):
    """The FP32 artifact as an older export wrote it: no `sizes` section, and (drop_source) no word
    of the model it came from."""
    dst = artifacts["root"] / name
    if not dst.exists():
        shutil.copytree(artifacts["fp32"], dst)
        mf = dst / "manifest.json"
        m = json.loads(mf.read_text())
        m.pop("sizes")
        if drop_source:
            m["model"].pop("source")
        mf.write_text(json.dumps(m))
    return dst


def _sourceless_copy(artifacts):
    return _old_copy(artifacts, "no-source", drop_source=True)


def test_reference_falls_back_to_an_fp32_artifact(artifacts, capsys):
    art = _sourceless_copy(artifacts)
    report = run_bench(BenchConfig([str(art), str(artifacts["int8"])], seconds=0.05, memory=False, min_rounds=3))
    assert report["reference"]["kind"] == "artifact" and report["reference"]["name"] == "no-source"
    assert any("FP32 artifact 'no-source' is the reference" in n for n in report["notes"])
    assert report["base"] == "no-source"
    assert 0.98 < _variant(report, "tiny-int8")["fidelity"]["image_cosine"]["mean"] < 1.0
    assert "fidelity against the FP32 reference" in capsys.readouterr().err  # the progress, on stderr
    # no sizes in the manifest and no model to count: bytes from the files, bits per weight left empty
    old = _variant(report, "no-source")
    assert old["sizes"]["image"]["bytes"] == (art / "image.onnx").stat().st_size
    assert old["sizes"]["image"]["bits_per_weight"] is None and old["bits_per_weight"] is None
    assert any(n.startswith("no-source: no sizes in the manifest") for n in report["notes"])
    assert _variant(report, "tiny-int8")["sizes"]["image"]["bits_per_weight"] > 0
    cells = " | ".join(mb_num((art / f"{g}.onnx").stat().st_size) for g in ("image", "text"))
    assert re.search(rf"\| `no-source` \| artifact \| ort f32 \| [^|]+ \| {re.escape(cells)} \| – \|",
                     markdown(report))
    with pytest.raises(UnknownModelError, match="--model"):
        run_bench(BenchConfig([str(art)], baselines=True, memory=False))


def test_bad_input_raises_typed_errors(artifacts, tmp_path, capsys):
    with pytest.raises(ArtifactError, match="not found"):
        run_bench(BenchConfig([str(tmp_path / "missing")], eval_dir=str(heldout_dir())))
    flat = tmp_path / "flat"
    flat.mkdir()
    shutil.copy(next(heldout_dir().glob("3/*.png")), flat / "a.png")
    with pytest.raises(EvalDataError, match="one sub-folder|class sub-folder") as e:
        run_bench(BenchConfig([str(artifacts["fp32"])], eval_dir=str(flat)))
    assert "move them into class folders" in str(e.value)
    with pytest.raises(EvalDataError, match="10 class folders"):
        run_bench(BenchConfig([str(artifacts["fp32"])], eval_dir=str(heldout_dir()), labels=["zero", "one"]))
    with pytest.raises(UnknownModelError, match="known specs|Known specs"):
        run_bench(BenchConfig([str(artifacts["fp32"])], model="random:ViT-Q-9", memory=False))
    # the command line turns them into exit 2 and one readable line
    capsys.readouterr()
    assert main(["bench", str(artifacts["fp32"]), "--eval", str(flat), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err
