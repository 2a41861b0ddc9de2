"""OpenVINO low-bit weights: the `w4a16` recipe (NNCF INT4 per block under the 4 -> int8 -> float guard
chain) and the tables and end layers every INT8 recipe stores as int8 weights (token embedding Gather,
final projections), on real IR, real NNCF and real OpenVINO CPU compiles.

builtin:tiny artifacts are shared with tests/test_openvino.py (conftest's `shared_exports`); the guard's
choices per layer are checked on small IRs built directly with OpenVINO's opset, quantized through
`calibration.openvino.quantize_ir`. Run as a script (`python test_openvino_lowbit.py OUT_DIR`), this
file writes the 4-bit IR of `chain_ir` and its report to OUT_DIR: the test runs it under two hash seeds."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

ov = pytest.importorskip("openvino")
pytest.importorskip("nncf")
pytest.importorskip("torch")

from edgeclip import builtin  # noqa: E402
from edgeclip.runtime.pipeline import Pipeline  # noqa: E402

_TINY = {"model": "builtin:tiny", "labels": builtin.digit_labels(), "target": "openvino"}
# fp32 and int8 are the very exports tests/test_openvino.py reads (one export per session for both)
TINY = {"fp32": {**_TINY, "precision": "fp32"}, "int8": {**_TINY, "precision": "int8"},
        "w4a16": {**_TINY, "precision": "int8", "recipe": "w4a16"}}
SHARED_EXPORTS = {"tiny": list(TINY.values())}


@pytest.fixture(scope="module")
def tiny(shared_exports):
    return {name: shared_exports.get(spec) for name, spec in TINY.items()}


def _heldout():
    files = sorted(builtin.heldout_dir().glob("*/*.png"))
    return [str(f) for f in files], np.array([int(f.parent.name) for f in files])


def _top1(pipe, files, truth, through_text: bool) -> float:
    kw = {"labels": builtin.digit_labels(), "templates": builtin.prompt_templates()} if through_text else {}
    return float(np.mean([p.index == t for p, t in zip(pipe.classify(files, **kw), truth)]))


def _ir(path):
    return ov.Core().read_model(str(path))


def _stored(model, name: str) -> str:
    """Element type of the constant at the start of op `name`'s weights (a Gather's table, a MatMul's
    second input), through its decompression (Convert, Subtract, Multiply, Reshape)."""
    op = next(o for o in model.get_ordered_ops() if o.get_friendly_name() == name)
    node = op.input_value(0 if op.get_type_name() == "Gather" else 1).get_node()
    while node.get_type_name() != "Constant":
        node = node.input_value(0).get_node()
    return node.get_element_type().get_type_name()


def _int_constants(model) -> Counter:
    """Constants by integer element type (the compressed weights)."""
    types = (op.get_element_type().get_type_name() for op in model.get_ordered_ops()
             if op.get_type_name() == "Constant")
    return Counter(t for t in types if t in ("i4", "u4", "i8", "u8"))


# ----------------------------------------------------------------------------- builtin:tiny artifacts

def test_w4a16_passes_validation_and_records_its_widths(tiny):
    m = tiny["w4a16"].manifest
    assert m["precision"] == "int8" and all(r["ok"] for r in m["fidelity"].values()), m["fidelity"]
    for name in ("image", "text"):
        g = m["quantization"]["graphs"][name]
        assert g["recipe"] == "w4a16" and g["activations"] == "float" and g["block_size"] == 32
        assert g["min_cosine"] >= 1 - g["max_cosine_drop"]
        bits = g["bits"]
        assert set(bits.values()) <= {4, 8, 32} and sum(b == 4 for b in bits.values()) >= 5, bits
        # every quantizable layer and every table / end layer has a width; the projection is one of them
        assert len(bits) == g["quantizable_layers"] + g["int8_tables"] + g["int8_end_layers"] + len(g["float_tables"])
        assert f"{'visual' if name == 'image' else 'text'}.proj" in bits
        # one symmetric 4-bit weight tensor per 4-bit MatMul layer (no layer of tiny has two MatMuls)
        ints = _int_constants(_ir(tiny["w4a16"].path / f"{name}.xml"))
        assert ints["i4"] == sum(b == 4 for k, b in bits.items() if k != "text.token_embed"), (ints, bits)
    text = m["quantization"]["graphs"]["text"]
    assert text["int8_tables"] == 1 and text["bits"]["text.token_embed"] in (4, 8)
    # the token embedding is stored at the width recorded (asymmetric: codes and zero points unsigned)
    want = {4: ("u4",), 8: ("u8",)}[text["bits"]["text.token_embed"]]
    assert _stored(_ir(tiny["w4a16"].path / "text.xml"), "embedding/aten.embedding.default/Gather") in want


@pytest.mark.parametrize("recipe", ["int8", "w4a16"])
def test_lowbit_top1_within_one_point_of_fp32(tiny, recipe):
    files, truth = _heldout()
    fp32, q = Pipeline.load(tiny["fp32"].path), Pipeline.load(tiny[recipe].path)
    assert q.backend_name == "openvino"
    for through_text in (False, True):  # the baked head, and class embeddings from the quantized text tower
        ref, got = _top1(fp32, files, truth, through_text), _top1(q, files, truth, through_text)
        assert ref >= 0.98 and got >= ref - 0.01, (recipe, through_text, ref, got)


def test_text_weights_shrink_with_the_embedding(tiny):
    """builtin:tiny's text graph is mostly its token embedding (49408 x 64): int8 and 4-bit recipes
    shrink it only because the table itself is stored narrow."""
    size = {k: {n: (a.path / f"{n}.bin").stat().st_size for n in ("image", "text")} for k, a in tiny.items()}
    fp32 = size["fp32"]
    # measured: int8 text 0.26x, w4a16 0.15x of FP32; image 0.34x, 0.25x
    assert size["int8"]["text"] <= 0.3 * fp32["text"], size
    assert size["w4a16"]["text"] <= 0.2 * fp32["text"] and size["w4a16"]["text"] <= 0.65 * size["int8"]["text"], size
    assert size["w4a16"]["image"] < size["int8"]["image"] <= 0.4 * fp32["image"], size


def test_int8_stores_embedding_and_projections_as_int8_weights(tiny):
    art = tiny["int8"]
    for name, tower in (("image", "visual"), ("text", "text")):
        g = art.manifest["quantization"]["graphs"][name]
        ir = _ir(art.path / f"{name}.xml")
        assert g["bits"][f"{tower}.proj"] == 8 and g["int8_end_layers"] == 1 and g["float_tables"] == []
        proj = next(op for op in ir.get_ordered_ops() if op.get_type_name() == "MatMul" and
                    op.get_friendly_name().startswith("linear_13/"))
        assert _stored(ir, proj.get_friendly_name()) in ("u8", "i8")
        # weights only: no FakeQuantize on the projection's activations, even in static INT8
        assert proj.input_value(0).get_node().get_type_name() != "FakeQuantize"
        assert set(g["bits"].values()) == {8} and g["int8_layers"] == g["quantizable_layers"]
    text = art.manifest["quantization"]["graphs"]["text"]
    assert text["int8_tables"] == 1 and text["bits"]["text.token_embed"] == 8
    assert _stored(_ir(art.path / "text.xml"), "embedding/aten.embedding.default/Gather") in ("u8", "i8")
    assert art.manifest["quantization"]["graphs"]["image"]["int8_tables"] == 0
    # the baked zero-shot head (outside the towers) stays float
    head = [op for op in _ir(art.path / "image.xml").get_ordered_ops() if op.get_type_name() == "MatMul"
            and op.get_friendly_name().startswith("add_")]
    assert head and all(_stored(_ir(art.path / "image.xml"), op.get_friendly_name()) == "f32" for op in head)


def test_w4a16_runs_at_f32_and_default_precision(tiny):
    files, _ = _heldout()
    art = tiny["w4a16"]
    forced = Pipeline.load(art.path, inference_precision="f32")
    assert all(i["inference_precision"] == "f32" for i in forced.info().values())
    a, b = forced.encode_image(files[:8]), Pipeline.load(art.path).encode_image(files[:8])
    assert a.shape == b.shape and np.abs(np.linalg.norm(a, axis=-1) - 1).max() < 1e-4
    assert float((a * b).sum(-1).min()) >= 0.99


# ----------------------------------------------------------------------------- the guard on small IRs

VOCAB, WIDTH, IDS = 256, 64, 8
BLOCKS = [f"text.blocks.{i}.mlp.fc1" for i in range(4)]


def table_ir(table_outliers: bool, weight_outliers: bool):
    """ids -> Gather(table) -> 4 MatMuls ("text.blocks.i.mlp.fc1") -> projection MatMul ("text.proj")
    -> mean over tokens: (model, layers, tables). `table_outliers`: the table's first 16 rows carry one
    huge entry in a channel the first block ignores, so int8 per row loses the rest of those rows (and
    int8 activations in front of that block lose everything). `weight_outliers`: blocks 1 and 3 carry
    one large input column, which 4 bits per block of 32 cannot hold alongside the rest of each block
    (int8 per row can)."""
    import openvino.opset13 as ops

    rng = np.random.default_rng(0)
    ids = ops.parameter([-1, IDS], np.int64, name="ids")
    ids.output(0).get_tensor().set_names({"ids"})
    table = rng.standard_normal((VOCAB, WIDTH)).astype(np.float32)
    if table_outliers:
        table[:16, 0] = 2000.0
    h = ops.gather(ops.constant(table), ids, ops.constant(np.int64(0)))
    h.set_friendly_name("emb")
    layers = {}
    for i, layer in enumerate(BLOCKS):
        w = (rng.standard_normal((WIDTH, WIDTH)) / 8).astype(np.float32)
        if table_outliers and i == 0:
            w[:, 0] = 0.0
        if weight_outliers and i % 2:
            w[:, 0] = OUTLIER
        h = ops.matmul(h, ops.constant(w), False, True)
        h.set_friendly_name(f"mm{i}")
        layers[f"mm{i}"] = layer
    h = ops.matmul(h, ops.constant((rng.standard_normal((WIDTH, WIDTH)) / 8).astype(np.float32)), False, True)
    h.set_friendly_name("proj")
    out = ops.result(ops.reduce_mean(h, ops.constant(np.int64(1)), False))
    out.output(0).get_tensor().set_names({"out"})
    return ov.Model([out], [ids], "tables"), layers, {"emb": "text.token_embed", "proj": "text.proj"}


OUTLIER = 2.0


def _quantize(recipe: str, table_outliers: bool, weight_outliers: bool, max_drop: float, block_size: int = 32):
    from edgeclip.calibration.openvino import quantize_ir
    from edgeclip.calibration.recipes import CalibrationSet, get_recipe

    model, layers, tables = table_ir(table_outliers, weight_outliers)
    rng = np.random.default_rng(1)
    # held-out ids read the outlier rows too (ids 0..15)
    batch = [{"ids": rng.integers(0, VOCAB, (8, IDS))} for _ in range(2)]
    held = {"ids": np.concatenate([np.arange(16).reshape(2, 8), rng.integers(0, VOCAB, (6, IDS))])}
    data = CalibrationSet("text", "out", batch, held)
    return quantize_ir(model, get_recipe(recipe), data, layers, tables=tables, max_drop=max_drop,
                       block_size=block_size)


@pytest.mark.parametrize("recipe", ["w8a16", "int8"])
def test_guard_returns_an_int8_table_to_float(recipe):
    quant, r = _quantize(recipe, table_outliers=True, weight_outliers=False, max_drop=2e-3)
    assert r["cosine_drop_all_int8"] > r["max_cosine_drop"] >= r["cosine_drop"], r
    assert r["float_tables"] == ["text.token_embed"] and r["int8_tables"] == 0 and r["int8_end_layers"] == 1
    assert r["bits"]["text.token_embed"] == 32 and r["bits"]["text.proj"] == 8, r["bits"]
    assert _stored(quant, "emb") == "f32" and _stored(quant, "proj") in ("u8", "i8")
    # the table's outlier channel also reaches the first block's activations: int8 activations (static),
    # or the CPU plugin's dynamic quantization of them (w8a16), may send that block to float; no other
    assert all(r["bits"][layer] == 8 for layer in BLOCKS[1:]), r["bits"]
    assert r["float_layers"] in ([], [BLOCKS[0]]) and r["int8_layers"] + len(r["float_layers"]) == 4


CHAIN_DROP = 0.02  # sends the most sensitive blocks to int8 and keeps the rest at 4 bits


def test_w4a16_chain_moves_the_most_sensitive_layers_to_int8():
    quant, r = _quantize("w4a16", table_outliers=False, weight_outliers=True, max_drop=CHAIN_DROP)
    bits, sens = r["bits"], r["sensitivity"]
    assert r["cosine_drop_all_int8"] > r["max_cosine_drop"] >= r["cosine_drop"], r
    assert sorted(set(bits.values())) == [4, 8] and r["float_layers"] == [] == r["float_tables"], bits
    # by sensitivity (the drop with that layer alone at 4 bits) per weight: every int8 layer costs more
    # drop per weight at 4 bits than every 4-bit one; the last block, with its outlier column, is one
    per_weight = {k: v / (VOCAB * WIDTH if k == "text.token_embed" else WIDTH * WIDTH) for k, v in sens.items()}
    assert min(per_weight[k] for k, b in bits.items() if b == 8) > max(per_weight[k] for k, b in bits.items() if b == 4)
    assert bits[BLOCKS[3]] == 8 and r["block_size"] == 32
    # the IR stores every layer at the width recorded
    want = {4: ("i4", "u4"), 8: ("i8", "u8"), 32: ("f32",)}
    names = {"text.token_embed": "emb", "text.proj": "proj", **{layer: f"mm{i}" for i, layer in enumerate(BLOCKS)}}
    assert all(_stored(quant, names[k]) in want[b] for k, b in bits.items()), bits


def test_w4a16_block_size_sets_the_group():
    quant, r = _quantize("w4a16", table_outliers=False, weight_outliers=False, max_drop=0.5, block_size=16)
    assert r["block_size"] == 16 and set(r["bits"].values()) == {4}, r["bits"]
    # one scale per 16 input rows: a (64, 64) weight has 64 x 4 scales
    mm = next(op for op in quant.get_ordered_ops() if op.get_friendly_name() == "mm0")
    scales = [n for n in _decompression(mm) if n.get_type_name() == "Multiply"]
    assert scales and any(sorted(list(i.get_shape())) == [1, 4, 64] for m in scales for i in m.input_values()
                          if i.get_node().get_type_name() == "Constant"), [str(m) for m in scales]


def _decompression(op) -> list:
    """The nodes between `op`'s weight input and its stored constant."""
    out, node = [], op.input_value(1).get_node()
    while node.get_type_name() != "Constant":
        out.append(node)
        node = node.input_value(0).get_node()
    return out


def _write_chain(out: Path) -> None:
    quant, r = _quantize("w4a16", table_outliers=False, weight_outliers=True, max_drop=CHAIN_DROP)
    ov.save_model(quant, str(out / "q.xml"), compress_to_fp16=False)
    (out / "report.json").write_text(json.dumps({"bits": r["bits"]}))


def test_w4a16_ir_is_byte_identical_under_two_hash_seeds(tmp_path):
    outs, procs = [], []
    for seed in (0, 1):  # the guard hands its layer sets around: their order follows the hash seed
        out = tmp_path / str(seed)
        out.mkdir()
        env = {**os.environ, "PYTHONHASHSEED": str(seed)}
        procs.append(subprocess.Popen([sys.executable, __file__, str(out)], env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
        outs.append(out)
    for p in procs:
        _, err = p.communicate(timeout=180)
        assert p.returncode == 0, err[-3000:]
    a, b = outs
    bits = json.loads((a / "report.json").read_text())["bits"]
    assert sorted(set(bits.values())) == [4, 8] and bits == json.loads((b / "report.json").read_text())["bits"]
    assert (a / "q.xml").read_bytes() == (b / "q.xml").read_bytes()
    assert (a / "q.bin").read_bytes() == (b / "q.bin").read_bytes()


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent))
    _write_chain(Path(sys.argv[1]))
