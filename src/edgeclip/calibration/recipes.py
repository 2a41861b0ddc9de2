"""Named INT8 recipes and the one entry point that applies them to an exported float graph.

    model, report = quantize_graph(float_model, get_recipe("int8"), calibration_set)

Every recipe quantizes the layers `quantizable` accepts (by default the linear layers inside the
transformer blocks and of adapter heads; a convolutional tower also names its convs) that its quantizer
has an int8 kernel for (`kinds`: int8-dynamic leaves convs float, static INT8 leaves grouped convs with a
channel multiplier float; see calibration.qdq). The patch embedding, LayerNorms, softmax, GELU,
residual adds, the final projections and baked heads stay float. Every recipe runs under the accuracy
guard: layers that cost too much accuracy go back to float, and the report says which.

A recipe is one `Recipe` entry in `RECIPES`: its data plus the quantizer each format runs for it
(`onnx`: OnnxStatic / OnnxDynamic / OnnxWeightsOnly; `openvino`: NncfStatic / NncfWeightsOnly /
NoOpenVinoForm), so neither format picks its steps by recipe name.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .._lazy import require
from ..errors import CalibrationError, EdgeClipError
from ..onnxgraph import copy_model, gemms_to_matmuls, lower_for_ort
from . import qdq
from .guard import guard, guard_chain, guard_measure, head_agreement, min_cosine_drop, run_outputs


@dataclass(frozen=True)
class OnnxStatic:
    """ONNX: calibrated per-tensor activation ranges and QuantizeLinear/DequantizeLinear pairs (the
    portable form), which ONNX Runtime's fused integer kernels can take over (quantize_graph's `lower`)."""

    lowers = True
    kinds = qdq.STATIC_KINDS + qdq.TABLE_KINDS
    chain = None

    def prepare(self, model, targets, data: CalibrationSet, observer: str, report: dict, form: str = "ort"):
        """`quantize(exclude) -> model` for the guard; `report` gets the observer. `form`: see
        `qdq.quantize` (TensorRT: symmetric int8 activations, Q/DQ on layer inputs only)."""
        if not data.batches:
            raise CalibrationError(f"no calibration batches for the {data.graph} graph")
        ranges = qdq.collect_ranges(model, targets, data.batches, observer)
        report["observer"] = observer
        act = "int8" if form == "tensorrt" else "uint8"
        if form != "ort":
            report["form"], report["activation_type"] = form, act
        return lambda exclude: qdq.quantize(model, targets, ranges, act, exclude=exclude, form=form)


@dataclass(frozen=True)
class OnnxDynamic:
    """ONNX: DynamicQuantizeMatMul, activations quantized per call from their own range."""

    lowers = False
    kinds = qdq.DYNAMIC_KINDS + qdq.TABLE_KINDS
    chain = None

    def prepare(self, model, targets, data: CalibrationSet, observer: str, report: dict, form: str = "ort"):
        return lambda exclude: qdq.quantize_dynamic(model, targets, exclude)


@dataclass(frozen=True)
class OnnxWeightsOnly:
    """ONNX: int8 weights behind DequantizeLinear, float activations and arithmetic."""

    lowers = False
    kinds = qdq.WEIGHT_KINDS + qdq.TABLE_KINDS
    chain = None

    def prepare(self, model, targets, data: CalibrationSet, observer: str, report: dict, form: str = "ort"):
        return lambda exclude: qdq.quantize_weights(model, targets, exclude)


@dataclass(frozen=True)
class OnnxNBits:
    """ONNX: block-wise 4-bit weights (ONNX Runtime's MatMulNBits; the token embedding as
    GatherBlockQuantized), layers the guard moves falling back to int8, then float (`chain`). `a8`:
    activations quantized to int8 per block at run time (accuracy_level 4, ONNX Runtime's int8
    kernel); else they stay float and the accuracy level is measured on the export CPU (`LEVELS`)."""

    a8: bool = False
    rounding: str = "gptq"  # "gptq": error-compensated from the calibration activations; "nearest"
    lowers = False
    kinds = qdq.WEIGHT_KINDS + qdq.TABLE_KINDS
    chain = (4, 8)
    LEVELS = (1, 2, 3)  # fp32, fp16, bf16 arithmetic on A: the a16 candidates

    @property
    def levels(self) -> tuple:
        return (4,) if self.a8 else self.LEVELS

    def prepare(self, model, targets, data: CalibrationSet, observer: str, report: dict, form: str = "ort",
                block: int = 32):
        """`quantize(bits: {layer: bits}, level=None) -> model` for the guard (level: the first candidate)."""
        from .gptq import input_hessians

        cache: dict = {}
        # GPTQ needs activations like the deployed ones: without calibration data (synthetic inputs)
        # weights round to the nearest code
        real = data.info.get("source") != "synthetic"
        hessians = input_hessians(model, targets, data.batches) if self.rounding == "gptq" and real else {}
        report.update(block_size=block, rounding=self.rounding if hessians else "nearest")

        def quantize(bits, level=None):
            return qdq.quantize_nbits(model, targets, bits, block, self.levels[0] if level is None else level, cache,
                                      hessians)

        return quantize


@dataclass(frozen=True)
class NncfStatic:
    """OpenVINO: nncf.quantize over the calibration batches, int8 activations and weights (the recipe's
    SmoothQuant runs inside NNCF). `q` is calibration.openvino's quantizer for one IR."""

    def check(self, recipe: Recipe) -> None:
        pass

    def quantize(self, q, recipe: Recipe, observer: str, alpha: float, report: dict):
        """(model, guard result, drop, float layers); `report` gets the observer (and SmoothQuant's alpha)."""
        if not q.data.batches:
            raise CalibrationError(f"no calibration batches for the {q.data.graph} graph")
        report["observer"] = observer
        if recipe.smoothquant:
            report["smoothquant"] = {"alpha": alpha}
        return q.static(observer, alpha)


@dataclass(frozen=True)
class NncfWeightsOnly:
    """OpenVINO: nncf.compress_weights, float activations; no calibration data. `mode`: "int8" weights,
    or "int4" (symmetric, per block of the recipe's block size; layers the guard moves go to int8,
    then float)."""

    mode: str = "int8"

    def check(self, recipe: Recipe) -> None:
        pass

    def quantize(self, q, recipe: Recipe, observer: str, alpha: float, report: dict):
        return q.weights_only() if self.mode == "int8" else q.weights_int4(report)


@dataclass(frozen=True)
class NoOpenVinoForm:
    """A recipe OpenVINO cannot run; `why` goes into the error."""

    why: str

    def check(self, recipe: Recipe) -> None:
        raise CalibrationError(f"recipe '{recipe.name}' has no OpenVINO form ({self.why}); use --recipe int8 "
                               "(static, calibrated) or w8a16")

    def quantize(self, q, recipe: Recipe, observer: str, alpha: float, report: dict):
        self.check(recipe)


@dataclass(frozen=True)
class Recipe:
    """A named INT8 recipe: what it is (data) and how each format quantizes under it (`onnx`: a
    quantizer for calibration.qdq graphs; `openvino`: the NNCF run for OpenVINO IR)."""

    name: str
    summary: str
    activations: str          # "static" (calibrated ranges) | "dynamic" (ranges at run time) | "float"
    onnx: OnnxStatic | OnnxDynamic | OnnxWeightsOnly
    openvino: NncfStatic | NncfWeightsOnly | NoOpenVinoForm
    smoothquant: bool = False  # ONNX: SmoothQuant rewrites the float graph first; OpenVINO: NNCF's own
    weight_bits: int = 8       # the narrowest weights it stores (4: the guard widens layers to 8, then float)
    max_drop: float = 0.005    # the guard's default bound (1 - min cosine on held-out data)

    @property
    def needs_calibration(self) -> bool:
        return self.activations == "static"


RECIPES = {r.name: r for r in (
    Recipe("int8", "static INT8 (QDQ): int8 weights per output channel, uint8 activations per tensor "
                   "with ranges from the calibration images/captions (default)", "static",
           onnx=OnnxStatic(), openvino=NncfStatic()),
    Recipe("int8-dynamic", "int8 weights per output channel, activations quantized per call from their "
                           "own range; needs no calibration data", "dynamic",
           onnx=OnnxDynamic(),
           openvino=NoOpenVinoForm("its CPU plugin quantizes activations at run time only for 4/8-bit "
                                   "weight-compressed LLM layers")),
    Recipe("int8-smoothquant", "int8 after SmoothQuant moves activation outliers into the weights "
                               "(--smoothquant-alpha, default 0.5); for towers with outlier channels",
           "static", onnx=OnnxStatic(), openvino=NncfStatic(), smoothquant=True),
    Recipe("w8a16", "int8 weights only, float activations and arithmetic: ~4x smaller linear "
                    "weights at FP32 speed and accuracy", "float",
           onnx=OnnxWeightsOnly(), openvino=NncfWeightsOnly()),
    Recipe("w4a16", "4-bit weights per block (--block-size, default 32; GPTQ rounding from the calibration "
                    "data), float activations: the smallest artifact, but slower than int8 on x86 CPUs "
                    "(~FP32 speed); the guard (default bound: cosine >= 0.99) moves sensitive layers to int8, "
                    "then float", "float",
           onnx=OnnxNBits(), openvino=NncfWeightsOnly(mode="int4"), weight_bits=4, max_drop=0.01),
    Recipe("w4a8", "4-bit weights per block with activations quantized to int8 at run time (ONNX Runtime's "
                   "int8 kernel, accuracy_level 4): w4a16's size with an int8 GEMM", "dynamic",
           onnx=OnnxNBits(a8=True),
           openvino=NoOpenVinoForm("its CPU plugin picks dynamic activation quantization itself; use w4a16"),
           weight_bits=4),  # int8 activations: the int8 recipes' bound (at 0.01 the built-in model lost 1.7 points)
)}
NBIT_BLOCK = 32  # default block of 4-bit recipes: input rows per scale
DEFAULT_RECIPE = "int8"


def recipes() -> list[Recipe]:
    return list(RECIPES.values())


def get_recipe(name: str | None) -> Recipe:
    name = name or DEFAULT_RECIPE
    try:
        return RECIPES[name]
    except KeyError:
        raise EdgeClipError(f"unknown quantization recipe '{name}'; available: {', '.join(RECIPES)}") from None


def recipes_help() -> str:
    return "; ".join(f"{r.name}: {r.summary}" for r in recipes())


@dataclass
class CalibrationSet:
    """What one graph is calibrated and guarded on."""

    graph: str                 # "image" | "text"
    output: str                # the output whose cosine the guard measures
    batches: list              # feed dicts for range collection
    held_out: dict             # one feed dict, never used for ranges
    info: dict = field(default_factory=dict)  # source, counts, skipped files: goes to the manifest
    heads: list = field(default_factory=list)  # class-score outputs whose top-1 agreement the guard keeps
    min_agreement: float = 0.99

    @property
    def outputs(self) -> list:
        return [self.output] + list(self.heads)


def image_calibration(pixels: np.ndarray, info: dict, batch: int = 8, holdout: float = 0.2,
                      seed: int = 0) -> CalibrationSet:
    from .data import _split

    calib, held = _split(pixels, holdout, seed)
    batches = [{"pixel_values": calib[i:i + batch]} for i in range(0, len(calib), batch)]
    return CalibrationSet("image", "image_embeds", batches, {"pixel_values": held},
                          {**info, "calibration": int(len(calib)), "held_out": int(len(held))})


def text_calibration(ids: np.ndarray, eot_token_id, trim: bool, info: dict, batch: int = 16,
                     holdout: float = 0.2, seed: int = 0) -> CalibrationSet:
    from ..runtime.tokenizer import trim as trim_ids
    from .data import _split

    calib, held = _split(ids, holdout, seed)
    fit = (lambda x: trim_ids(x, eot_token_id)) if trim else (lambda x: x)
    batches = [{"input_ids": fit(calib[i:i + batch])} for i in range(0, len(calib), batch)]
    return CalibrationSet("text", "text_embeds", batches, {"input_ids": fit(held)},
                          {**info, "calibration": int(len(calib)), "held_out": int(len(held))})


def quantize_graph(model, recipe: Recipe, data: CalibrationSet, *, observer: str = "minmax",
                   alpha: float = 0.5, max_drop: float = 0.005, lower: bool = True, quantizable=None,
                   form: str = "ort", block_size: int = NBIT_BLOCK):
    """(quantized ONNX model, report for the manifest). Raises ValidationError when the accuracy
    guard cannot meet `max_drop` even with every layer back in float.

    `lower`: rewrite static QDQ pairs into ONNX Runtime's fused MatMulIntegerToFloat (bias inside);
    keep False for graphs other runtimes will read (QDQ is the portable form). Convs stay QDQ, which
    ONNX Runtime fuses into QLinearConv itself when it loads the graph.
    `quantizable(layer path) -> bool`: the layers INT8 may quantize (default:
    `qdq.default_quantizable`, the linear layers inside the transformer blocks and of adapter heads).
    In ONNX Runtime's form (`form="ort"`) every recipe also stores the towers' tables and end layers
    in int8 (token embedding, positional tables, patch and final projections: `qdq.find_targets`'
    `tables`), guarded like any other layer. `block_size`: the 4-bit recipes' block."""
    tables = form == "ort"
    if tables:
        model = copy_model(model)
        gemms_to_matmuls(model)  # the end projections are traced as Gemm: the quantizers read MatMul
    found = qdq.find_targets(model, quantizable, tables=tables)
    targets = [t for t in found if t.kind in recipe.onnx.kinds]
    if not targets:
        raise CalibrationError(f"the {data.graph} graph has no linear layers to quantize")
    if not 0.0 < max_drop < 1.0:
        raise CalibrationError(f"max cosine drop must be in (0, 1), got {max_drop}")
    report = {"recipe": recipe.name, "activations": recipe.activations, "data": data.info,
              "quantizable_layers": len({t.layer for t in targets})}
    if recipe.smoothquant:
        model = _smooth(model, targets, data, alpha, report)
    extra = {"block": block_size} if recipe.onnx.chain else {}
    quantize_fn = recipe.onnx.prepare(model, targets, data, observer, report, form=form, **extra)
    reference = run_outputs(model, data.held_out, data.outputs)

    def drop_fn(candidate):
        return guard_measure(run_outputs(candidate, data.held_out, data.outputs), reference, data.output,
                             data.heads, max_drop, data.min_agreement)

    layers = [t.layer for t in targets]
    if recipe.onnx.chain:
        cost = {t.layer: qdq.weight_count(model, t.weight) for t in targets}
        quant, g = guard_chain(model, quantize_fn, layers, data.held_out, data.output, recipe.onnx.chain,
                               max_drop, drop_fn=drop_fn, cost=cost)
        quant, drop = _choose_level(recipe.onnx, quantize_fn, g, quant, drop_fn, data, max_drop, report)
    else:
        quant, g = guard(model, quantize_fn, layers, data.held_out, data.output, max_drop, drop_fn=drop_fn)
        drop = g.drop
    if lower and recipe.onnx.lowers:
        quant, drop = _lowered(quant, drop, drop_fn, max_drop, report)
    float_layers = list(g.float_layers)
    report.update(guard_report(g, max_drop, drop, float_layers, len({t.layer for t in targets} - set(float_layers))))
    report.update(layer_counts(found, targets, float_layers))
    report["bits"] = layer_bits(targets, g)
    report.update(final_figures(run_outputs(quant, data.held_out, data.outputs), reference, data))
    return quant, report


def _lowered(quant, drop: float, drop_fn, max_drop: float, report: dict):
    """(model, drop): the QDQ graph on ONNX Runtime's fused integer kernels, which round slightly
    differently, measured again; the portable QDQ form when the lowered graph would miss the bound."""
    lowered = copy_model(quant)
    report["fused_int8_kernels"] = lower_for_ort(lowered)
    lowered_drop = drop_fn(lowered)
    if lowered_drop <= max_drop:
        return lowered, lowered_drop
    report["fused_int8_kernels"] = 0
    return quant, drop


def layer_bits(targets, g) -> dict:
    """{layer: bits of its weights} (32: float), for the manifest."""
    chosen = getattr(g, "bits", None)
    float_layers = set(g.float_layers)
    bits = {t.layer: int(chosen.get(t.layer, 32)) if chosen is not None else 32 if t.layer in float_layers else 8
            for t in targets}
    for t in targets:  # positional tables are int8 in every recipe (qdq.quantize_nbits)
        if t.kind == "table" and bits[t.layer] < 8:
            bits[t.layer] = 8
    return bits


def _choose_level(quantizer, quantize_fn, g, quant, drop_fn, data: CalibrationSet, max_drop: float, report: dict):
    """The MatMulNBits accuracy level of a 4-bit graph, measured here: each candidate of the recipe
    (`OnnxNBits.levels`) is timed at batch 1 and measured on the held-out set; a candidate whose
    outputs equal the first one's bit for bit is not implemented by this CPU's kernels (it falls back)
    and is not chosen; of the rest, the fastest within the bound. (model, drop); `report` gets
    `accuracy_level` with every figure."""
    levels = quantizer.levels
    first = run_outputs(quant, data.held_out, data.outputs)[data.output]
    figures, best = {}, (levels[0], quant, g.drop, _latency_ms(quant, data.held_out))
    figures[str(levels[0])] = {"ms": best[3], "cosine_drop": g.drop}
    for level in levels[1:]:
        candidate = quantize_fn(g.bits, level)
        out = run_outputs(candidate, data.held_out, data.outputs)[data.output]
        if np.array_equal(out, first):
            figures[str(level)] = {"same_as": levels[0]}
            continue
        drop, ms = drop_fn(candidate), _latency_ms(candidate, data.held_out)
        figures[str(level)] = {"ms": ms, "cosine_drop": drop}
        if drop <= max_drop and ms < best[3]:
            best = (level, candidate, drop, ms)
    report["accuracy_level"] = {"chosen": best[0], "name": qdq.NBITS_LEVELS[best[0]], "measured": figures,
                                "note": "timed at batch 1 on the export machine; a level this CPU's kernels "
                                        "do not implement gives the first level's outputs and is not chosen"}
    return best[1], best[2]


def _latency_ms(model, feeds: dict, runs: int = 10) -> float:
    """Median ms of one batch-1 run of `model` under ONNX Runtime."""
    import time

    ort = require("onnxruntime", "4-bit quantization")
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    one = {k: v[:1] for k, v in feeds.items()}
    sess.run(None, one)
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        sess.run(None, one)
        times.append(time.perf_counter() - t0)
    return round(float(np.median(times)) * 1e3, 3)


def layer_counts(found, targets, float_layers) -> dict:
    """How many conv and matmul layers are int8, and the quantizable convs this recipe leaves float
    (no int8 kernel worth running for their kind), for the report."""
    kept = [t for t in targets if t.layer not in set(float_layers)]
    convs = {t.layer for t in kept if t.is_conv}
    tables = {t.layer for t in kept if t.is_table}
    out = {"int8_conv_layers": len(convs), "int8_matmul_layers": len({t.layer for t in kept} - convs - tables),
           "int8_tables": len(tables)}
    skipped = sorted({t.layer for t in found if t.is_conv} - {t.layer for t in targets})
    if skipped:
        kinds = sorted({t.kind for t in found if t.layer in set(skipped)})
        out["convs_left_float"] = {"count": len(skipped), "kinds": kinds, "layers": skipped[:20],
                                   "why": CONV_FLOAT_WHY}
    return out


CONV_FLOAT_WHY = ("no int8 kernel faster than float for them in ONNX Runtime 1.32 CPU: ConvInteger (the only "
                  "dynamic conv) and QLinearConv on grouped convs with a channel multiplier ran 5-70x "
                  "slower than the float Conv")


def _smooth(model, targets, data: CalibrationSet, alpha: float, report: dict):
    """The SmoothQuant-rewritten float graph; `report` gets alpha and how many LayerNorms it smoothed."""
    from .smoothquant import smooth, smoothable_pairs

    if not 0.0 <= alpha <= 1.0:
        raise CalibrationError(f"SmoothQuant alpha must be in [0, 1], got {alpha}")
    # SmoothQuant folds into LayerNorm -> MatMul pairs only; a LayerNorm feeding a conv is left alone
    targets = [t for t in targets if t.kind == "matmul"]
    report["smoothquant"] = {"alpha": alpha, "layernorms": len(smoothable_pairs(model, targets))}
    return smooth(model, targets, data.batches, alpha)


def final_figures(got: dict, reference: dict, data: CalibrationSet) -> dict:
    """The written graph's own cosine drop and, with heads, each head's top-1 agreement with float."""
    drop = min_cosine_drop(got[data.output], reference[data.output])
    out = {"cosine_drop": drop, "min_cosine": 1.0 - drop}
    if data.heads:
        out["head_agreement"] = head_agreement(got, reference, data.heads)
        out["min_head_agreement"] = data.min_agreement
    return out


def guard_report(g, max_drop: float, drop: float, float_layers: list, int8_layers: int) -> dict:
    """The accuracy guard's part of a graph's quantization report (same keys for every target)."""
    return {
        "max_cosine_drop": max_drop,
        "cosine_drop": drop,
        "min_cosine": 1.0 - drop,
        "cosine_drop_all_int8": g.drop_all_int8,
        "float_layers": float_layers,
        "int8_layers": int8_layers,
        "sensitivity": {k: round(v, 6) for k, v in g.sensitivity.items()},
    }
