"""The command line as a user runs it: a real subprocess, real files."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from edgeclip.builtin import digit_labels, heldout_dir
from edgeclip.specs import list_specs


def edgeclip(*args, check=True):
    proc = subprocess.run([sys.executable, "-m", "edgeclip.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"edgeclip {' '.join(map(str, args))} failed ({proc.returncode}):\n{proc.stderr}")
    return proc


# `edgeclip export` itself, run in the background from the start of the session (conftest.py)
EXPORT = {"cli": ["export", "builtin:tiny", "--target", "onnx", "--labels", ",".join(digit_labels())]}
SHARED_EXPORTS = {"tiny_artifact": [EXPORT]}


@pytest.fixture(scope="module")
def tiny_artifact(shared_exports):
    """builtin:tiny exported by `edgeclip export ... --out DIR` (this module's own: one test tries to
    overwrite it)."""
    return shared_exports.path(EXPORT)


def test_models_lists_every_spec():
    out = edgeclip("models").stdout
    for name in list_specs():
        assert name in out
    rows = json.loads(edgeclip("models", "--json").stdout)
    by_name = {r["name"]: r for r in rows}
    assert by_name["Long-CLIP-B"]["context"] == 248
    assert by_name["SigLIP-B-16"]["tokenizer"] == "hf"


def test_export_then_run_prints_the_right_digit(tiny_artifact):
    labels = digit_labels()
    images = [sorted((heldout_dir() / str(d)).glob("*.png"))[0] for d in range(10)]
    proc = edgeclip("run", tiny_artifact, "--json", "--image", *images)
    results = json.loads(proc.stdout)["images"]
    predicted = [r["label"] for r in results]
    correct = sum(p == labels[d] for d, p in enumerate(predicted))
    assert correct >= 9, f"predicted {predicted}"
    # the human-readable form names the label after each file
    text = edgeclip("run", tiny_artifact, "--image", images[7]).stdout
    assert text.startswith(str(images[7])) and labels[7] in text


def test_run_with_other_labels_and_texts(tiny_artifact):
    img = sorted((heldout_dir() / "3").glob("*.png"))[0]
    out = json.loads(edgeclip("run", tiny_artifact, "--json", "--image", img, "--labels", "three,eight",
                              "--text", "a photo of the number three", "a photo of the number eight").stdout)
    assert {t["label"] for t in out["images"][0]["top"]} == {"three", "eight"}
    sims = out["similarity"][0]
    assert len(sims) == 2 and all(-1.0 <= s <= 1.0 for s in sims)


def test_inspect_shows_manifest(tiny_artifact):
    text = edgeclip("inspect", tiny_artifact).stdout
    assert "checksums ok" in text and "onnx fp32" in text and "zero-shot, 10 labels" in text
    m = json.loads(edgeclip("inspect", tiny_artifact, "--json").stdout)
    assert m["head"]["labels"] == digit_labels()
    assert all(r["ok"] for r in m["fidelity"].values())


def test_bench_reports_percentiles(tiny_artifact):
    rows = json.loads(edgeclip("bench", tiny_artifact, "--seconds", "0.2", "--batch", "1,4", "--json").stdout)
    assert [r["batch"] for r in rows] == [1, 4]
    for r in rows:
        for g in r["graphs"]:
            assert 0 < g["p50_ms"] <= g["p90_ms"] <= g["p99_ms"]


def test_errors_exit_2_with_a_message(tmp_path, tiny_artifact):
    proc = edgeclip("export", "ViT-Q-9", "--out", tmp_path / "x", check=False)
    assert proc.returncode == 2 and "known specs" in proc.stderr.lower() and "Traceback" not in proc.stderr
    proc = edgeclip("run", tmp_path / "nothing", "--image", "a.png", check=False)
    assert proc.returncode == 2 and "edgeclip export" in proc.stderr
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    proc = edgeclip("run", tiny_artifact, "--image", bad, check=False)
    assert proc.returncode == 2 and "bad.png" in proc.stderr
    proc = edgeclip("export", "builtin:tiny", "--out", tiny_artifact, check=False)
    assert proc.returncode == 2 and "--overwrite" in proc.stderr
    assert Path(tiny_artifact, "manifest.json").is_file()  # the refused export left it intact


# ------------------------------------------------------------------------------------------ parser
# The parser as a table: every subcommand's options, and the namespace a representative command line
# gives (defaults filled in, values converted). A changed option, default or type shows up here.

from edgeclip import cli as cli_module  # noqa: E402

OPTIONS = {
    "models": ["--json"],
    "export": ["--block-size", "--calib", "--calib-captions", "--calib-size", "--checkpoint", "--compress", "--head", "--json",
               "--labels", "--labels-file", "--max-cosine-drop", "--min-ios", "--mobile-ep", "--mobile-shapes", "--no-fuse", "--no-pooled-last",
               "--no-trim", "--no-validate", "--observer", "--out", "--overwrite", "--precision", "--profile",
               "--recipe", "--seed", "--smoothquant-alpha", "--spec", "--target", "--templates", "--trt-version"],
    "run": ["--backend", "--digest", "--head", "--image", "--inference-precision", "--json", "--labels",
            "--labels-file", "--providers", "--text", "--threads", "--top-k", "--truncate"],
    "inspect": ["--digest", "--json"],
    "verify": ["--backend", "--digest", "--json", "--vectors"],
    "bench": ["--baseline-cache", "--baselines", "--batch", "--calib", "--eval", "--eval-limit",
              "--inference-precision", "--json", "--labels", "--model", "--no-memory", "--quiet", "--report",
              "--seconds", "--templates", "--threads"],
    "heads": [],
    "heads fit": ["--augment", "--eval", "--eval-labels", "--json", "--kind", "--labels", "--name", "--out",
                  "--seed", "--shots", "--templates", "--train"],
    "heads import": ["--alpha", "--beta", "--classes", "--json", "--kind", "--model", "--name", "--normalize",
                     "--out", "--ratio", "--templates"],
    "heads show": ["--json"],
    "engine": [],
    "engine build": ["--device", "--json", "--rebuild", "--workspace-mb"],
}

EXPORT_DEFAULTS = {"command": "export", "model": "builtin:tiny", "target": "onnx", "precision": None, "out": "a",
                   "labels": None, "labels_file": None, "templates": None, "head": None, "checkpoint": None,
                   "spec": None, "seed": 0, "no_trim": False, "no_pooled_last": False, "no_validate": False,
                   "overwrite": False, "no_fuse": False, "min_ios": None, "compress": None, "recipe": None,
                   "calib": None, "calib_captions": None, "calib_size": 256, "observer": "minmax",
                   "smoothquant_alpha": 0.5, "max_cosine_drop": None, "trt_version": None, "profile": None,
                   "block_size": None, "mobile_shapes": None, "mobile_ep": None, "json": False}
RUN_DEFAULTS = {"command": "run", "artifact": "art", "image": ["x.png"], "text": None, "labels": None,
                "labels_file": None, "digest": None, "head": None, "top_k": 5, "truncate": False, "backend": "auto",
                "threads": None, "inference_precision": None, "providers": None, "json": False}
BENCH_DEFAULTS = {"command": "bench", "artifacts": ["art"], "batch": [1], "threads": [None], "seconds": 2.0,
                  "inference_precision": None, "report": None, "baselines": False, "eval": None, "labels": None,
                  "templates": None, "eval_limit": 1000, "model": None, "calib": None, "baseline_cache": None,
                  "no_memory": False, "quiet": False, "json": False}
FIT_DEFAULTS = {"command": "heads", "heads_command": "fit", "model": "builtin:tiny", "kind": "tip", "train": None,
                "shots": None, "seed": 0, "augment": 4, "labels": None, "templates": None, "eval": None,
                "eval_labels": None, "name": None, "out": "h", "json": False}
IMPORT_DEFAULTS = {"command": "heads", "heads_command": "import", "src": "s.pt", "kind": None, "classes": None,
                   "model": None, "templates": None, "ratio": None, "alpha": None, "beta": None, "normalize": None,
                   "name": None, "out": "h", "json": False}

PARSES = [  # (argv, the command function, the whole namespace but `func`)
    (["models"], "cmd_models", {"command": "models", "json": False}),
    (["models", "--json"], "cmd_models", {"command": "models", "json": True}),
    (["export", "builtin:tiny", "--out", "a"], "cmd_export", EXPORT_DEFAULTS),
    (["export", "builtin:tiny", "--out", "a", "--target", "coreml", "--precision", "int8", "--seed", "7",
      "--head", "x.npz", "--head", "b=y", "--templates", "a {}", "b {}", "--min-ios", "17", "--compress", "w8",
      "--recipe", "int8-smoothquant", "--calib-size", "3", "--observer", "mse", "--smoothquant-alpha", "0.25",
      "--max-cosine-drop", "0.01", "--no-trim", "--no-fuse", "--overwrite", "--json", "--block-size", "64"],
     "cmd_export",
     {**EXPORT_DEFAULTS, "target": "coreml", "precision": "int8", "seed": 7, "head": ["x.npz", "b=y"],
      "templates": ["a {}", "b {}"], "min_ios": 17, "compress": "w8", "recipe": "int8-smoothquant",
      "calib_size": 3, "observer": "mse", "smoothquant_alpha": 0.25, "max_cosine_drop": 0.01, "no_trim": True,
      "no_fuse": True, "overwrite": True, "json": True, "block_size": 64}),
    (["run", "art", "--image", "x.png"], "cmd_run", RUN_DEFAULTS),
    (["run", "art", "--image", "x.png", "y.png", "--text", "t", "--top-k", "3", "--threads", "2",
      "--inference-precision", "bf16", "--head", "tip", "--truncate"], "cmd_run",
     {**RUN_DEFAULTS, "image": ["x.png", "y.png"], "text": ["t"], "top_k": 3, "threads": 2,
      "inference_precision": "bf16", "head": "tip", "truncate": True}),
    (["inspect", "art"], "cmd_inspect", {"command": "inspect", "artifact": "art", "digest": None, "json": False}),
    (["bench", "art"], "cmd_bench", BENCH_DEFAULTS),
    (["bench", "art", "b", "--batch", "1,8", "--threads", "1,2", "--seconds", "0.5", "--eval-limit", "9",
      "--baselines", "--no-memory"], "cmd_bench",
     {**BENCH_DEFAULTS, "artifacts": ["art", "b"], "batch": [1, 8], "threads": [1, 2], "seconds": 0.5,
      "eval_limit": 9, "baselines": True, "no_memory": True}),
    (["heads", "fit", "builtin:tiny", "--kind", "tip", "--out", "h"], "cmd_heads_fit", FIT_DEFAULTS),
    (["heads", "fit", "builtin:tiny", "--kind", "tip", "--out", "h", "--shots", "4", "--augment", "0",
      "--seed", "3"], "cmd_heads_fit", {**FIT_DEFAULTS, "shots": 4, "augment": 0, "seed": 3}),
    (["heads", "import", "s.pt", "--out", "h"], "cmd_heads_import", IMPORT_DEFAULTS),
    (["heads", "import", "s.pt", "--out", "h", "--kind", "tip_adapter", "--alpha", "2", "--normalize", "no"],
     "cmd_heads_import", {**IMPORT_DEFAULTS, "kind": "tip_adapter", "alpha": 2.0, "normalize": "no"}),
    (["heads", "show", "h"], "cmd_heads_show", {"command": "heads", "heads_command": "show", "head": "h",
                                                "json": False}),
    (["verify", "art", "--vectors"], "cmd_verify", {"command": "verify", "artifact": "art", "vectors": "",
                                                    "backend": "auto", "digest": None, "json": False}),
    (["verify", "art", "--vectors", "v.npz", "--backend", "ort"], "cmd_verify",
     {"command": "verify", "artifact": "art", "vectors": "v.npz", "backend": "ort", "digest": None, "json": False}),
    (["export", "builtin:tiny", "--out", "a", "--target", "ort-mobile", "--mobile-shapes", "1x16", "--mobile-ep",
      "nnapi,coreml"], "cmd_export",
     {**EXPORT_DEFAULTS, "target": "ort-mobile", "mobile_shapes": "1x16", "mobile_ep": "nnapi,coreml"}),
    (["export", "builtin:tiny", "--out", "a", "--target", "tensorrt", "--trt-version", "11.0", "--profile",
      "batch=1,4,8", "--profile", "length=1,16,77"], "cmd_export",
     {**EXPORT_DEFAULTS, "target": "tensorrt", "trt_version": "11.0", "profile": ["batch=1,4,8", "length=1,16,77"]}),
    (["engine", "build", "art", "--workspace-mb", "2048", "--rebuild"], "cmd_engine_build",
     {"command": "engine", "engine_command": "build", "artifact": "art", "workspace_mb": 2048, "rebuild": True,
      "device": 0, "json": False}),
]


def _subparsers(parser, prefix=""):
    import argparse

    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, p in action.choices.items():
                yield f"{prefix}{name}", p
                yield from _subparsers(p, f"{prefix}{name} ")


def test_every_subcommand_has_its_options():
    found = {name: sorted(o for a in p._actions for o in a.option_strings if o not in ("-h", "--help"))
             for name, p in _subparsers(cli_module.build_parser())}
    assert found == OPTIONS


@pytest.mark.parametrize("argv,func,expected", PARSES, ids=[" ".join(a[:2]) + f" #{i}" for i, (a, _, _) in
                                                              enumerate(PARSES)])
def test_parser_defaults_and_types(argv, func, expected):
    ns = vars(cli_module.build_parser().parse_args(argv))
    assert ns.pop("func") is getattr(cli_module, func)
    assert ns == expected
    for key, value in expected.items():  # 256 == 256.0: the type must match too
        assert type(ns[key]) is type(value), key


# ------------------------------------------------------------------------------------------ head files

def test_a_head_named_without_its_suffix_is_found(tmp_path):
    """`heads fit --out DIR/tip` writes DIR/tip.npz; `export --head DIR/tip`, `--head NAME=DIR/tip` and
    `heads show DIR/tip` name that same file."""
    from edgeclip.builtin import fewshot_dir

    stem = tmp_path / "tip"
    fit = json.loads(edgeclip("heads", "fit", "builtin:tiny", "--kind", "tip", "--train", fewshot_dir(),
                              "--labels", ",".join(digit_labels()), "--shots", "2", "--augment", "0",
                              "--out", stem, "--json").stdout)
    assert fit["head"] == str(tmp_path / "tip.npz") and not stem.exists()
    shown = edgeclip("heads", "show", stem).stdout
    assert "tip_adapter head, 10 classes" in shown
    assert json.loads(edgeclip("heads", "show", stem, "--json").stdout)["classes"] == digit_labels()
    art = tmp_path / "art"
    edgeclip("export", "builtin:tiny", "--head", stem, "--head", f"again={stem}", "--out", art, "--json")
    heads = json.loads(edgeclip("inspect", art, "--json").stdout)["heads"]
    assert sorted(heads) == sorted([fit["name"], "again"])
    img = sorted((heldout_dir() / "7").glob("*.png"))[0]
    r = json.loads(edgeclip("run", art, "--image", img, "--head", "again", "--json").stdout)["images"][0]
    assert r["label"] == digit_labels()[7] and r["head"] == "again"
    # a name that is neither a file nor FILE + ".npz" is still an error that names it as given
    proc = edgeclip("heads", "show", tmp_path / "nope", check=False)
    assert proc.returncode == 2 and f"head file not found: {tmp_path / 'nope'}" in proc.stderr
