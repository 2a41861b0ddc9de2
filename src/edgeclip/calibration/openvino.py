"""INT8 for OpenVINO IR through NNCF, under edgeclip's recipes, calibration data and accuracy guard.

    model, report = quantize_ir(float_ir, get_recipe("int8"), calibration_set, layers)

`layers` maps the IR's MatMul, Convolution and GroupConvolution nodes (friendly names) to our module
paths ("visual.blocks.0.mlp.fc1", "visual.stages.2.blocks.0.mlp.fc1"). As for ONNX, only the layers
the towers call quantizable are; everything else (patch embedding or stem, attention itself, final
projection, heads) becomes an NNCF ignored scope, and so do the layers the guard returns to float. What NNCF runs for a recipe
(nncf.quantize, nncf.compress_weights, or nothing: an error) is the recipe's `openvino` entry.

The guard ranks layers on cheap probes: the all-INT8 model with the quantization of some layers
stripped again (their activation FakeQuantize bypassed, their float weights put back). The model
written is always NNCF's own output for the chosen ignored scope, measured once more.
"""
from __future__ import annotations

import contextlib
import io
import logging

import numpy as np

from .._lazy import require
from ..errors import CalibrationError, ValidationError
from .guard import guard, guard_measure
from .recipes import CalibrationSet, Recipe, final_figures, guard_report

log = logging.getLogger(__name__)
QUANTIZABLE = ("MatMul", "Convolution", "GroupConvolution", "ConvolutionBackpropData")
# Ops that stay float on OpenVINO even where the tower allows INT8: the CPU plugin runs grouped and
# depthwise convolutions no faster in INT8 than in f32 (MobileCLIP-S1, 41 7x7 depthwise convs: 2.0 vs
# 2.1 ms) and those with several outputs per group far slower (jit_gemm_I8, ~10x), while they are the
# layers the guard returns to float first (RepMixer convs carry the residual). The ONNX target leaves
# them to its guard.
FLOAT_FOR_SPEED = ("GroupConvolution",)
OBSERVERS = ("minmax", "percentile")
MAX_REQUANTIZE = 4  # extra NNCF runs when the probes' choice misses the bound on the real model


def _ov():
    return require("openvino", "the OpenVINO target")


def _nncf():
    nncf = require("nncf", "INT8 for the OpenVINO target")
    nncf.set_log_level(logging.ERROR)
    return nncf


def weight_source(op):
    """The Constant behind a MatMul's or convolution's weight input (through Convert), else None."""
    node = op.input_value(1).get_node()
    while node.get_type_name() == "Convert":
        node = node.input_value(0).get_node()
    return node if node.get_type_name() == "Constant" else None


def module_paths(program) -> dict:
    """{torch.export node name: path of the module it came from} of an ExportedProgram."""
    paths = {}
    for node in program.graph.nodes:
        stack = node.meta.get("nn_module_stack")
        if stack:
            paths[node.name] = list(stack.values())[-1][0]
    return paths


def conv_module_paths(program) -> dict:
    """module_paths for the convolutions as OpenVINO names them. convert_model decomposes the program
    first, and aten.conv2d becomes aten.convolution there, named "convolution", "convolution_1", ... in
    graph order; the decomposed graph keeps each node's module stack, so its names map the IR's
    Convolution/GroupConvolution ops (linear layers keep their names: OpenVINO does not decompose them)."""
    import torch

    return {name: path for name, path in module_paths(program.run_decompositions()).items()
            if name.startswith("convolution")} if any(
        n.op == "call_function" and n.target in (torch.ops.aten.conv2d.default, torch.ops.aten.convolution.default)
        for n in program.graph.nodes) else {}


def runner(outputs, precision: str = "f32"):
    """`run(model, feeds) -> {output: array}`, compiled on CPU at `precision` (default full float32)."""
    ov = _ov()
    core = ov.Core()

    def run(model, feeds):
        compiled = core.compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": precision})
        res = compiled.create_infer_request().infer(feeds)
        return {o: np.asarray(res[compiled.output(o)]) for o in outputs}

    return run


def quantize_ir(model, recipe: Recipe, data: CalibrationSet, layers: dict, *, observer: str = "minmax",
                alpha: float = 0.5, max_drop: float = 0.005):
    """(quantized ov.Model, report for the manifest), the report shaped as the ONNX target's."""
    nncf = _nncf()
    _check_request(recipe, data, layers, observer, alpha, max_drop)
    q = _Quantizer(nncf, model, recipe, data, layers, max_drop)
    report = {"recipe": recipe.name, "activations": recipe.activations, "data": data.info,
              "quantizable_layers": len(q.by_layer), "quantizer": f"nncf {nncf.__version__}"}
    quant, g, drop, float_layers = recipe.openvino.quantize(q, recipe, observer, alpha, report)
    done = quantized_layers(quant, layers)
    report.update(guard_report(g, max_drop, drop, float_layers, len(done)))
    convs = conv_layers(model, layers)
    report.update({"int8_conv_layers": len(done & convs), "int8_matmul_layers": len(done - convs)})
    report.update(final_figures(q.run(quant, data.held_out), q.reference, data))
    report.update(q.float_for_speed_report(), **q.default_precision_check(quant))
    return quant, report


def _check_request(recipe: Recipe, data: CalibrationSet, layers: dict, observer: str, alpha: float,
                   max_drop: float) -> None:
    if not layers:
        raise CalibrationError(f"the {data.graph} graph has no linear layers to quantize")
    if not 0.0 < max_drop < 1.0:
        raise CalibrationError(f"max cosine drop must be in (0, 1), got {max_drop}")
    recipe.openvino.check(recipe)  # a recipe with no OpenVINO form says so here
    if observer not in OBSERVERS:
        raise CalibrationError(f"observer '{observer}' is not available for the OpenVINO target (NNCF); "
                               f"use one of {', '.join(OBSERVERS)}")
    if recipe.smoothquant and not 0.0 <= alpha <= 1.0:
        raise CalibrationError(f"SmoothQuant alpha must be in [0, 1], got {alpha}")


class _Quantizer:
    """One float IR, its layers and held-out reference: NNCF runs under ignored scopes, and the guard."""

    def __init__(self, nncf, model, recipe: Recipe, data: CalibrationSet, layers: dict, max_drop: float):
        self.nncf, self.model, self.recipe, self.data, self.max_drop = nncf, model, recipe, data, max_drop
        ops = {op.get_friendly_name(): op for op in model.get_ordered_ops()}
        missing = [n for n in layers if n not in ops]
        if missing:
            raise CalibrationError(f"layers not in the {data.graph} graph: {', '.join(missing[:3])}")
        # quantizable nodes outside our linear layers (patch embedding, projections, heads) stay float
        self.others = [n for n, op in ops.items() if op.get_type_name() in QUANTIZABLE and n not in layers]
        self.by_layer: dict[str, list[str]] = {}
        self.speed_float: list[str] = []  # layers kept float because INT8 is no faster for them here
        for node, layer in layers.items():
            if ops[node].get_type_name() in FLOAT_FOR_SPEED:
                self.others.append(node)
                self.speed_float.append(layer)
            else:
                self.by_layer.setdefault(layer, []).append(node)
        if not self.by_layer:
            raise CalibrationError(f"the {data.graph} graph has no layer INT8 makes faster on OpenVINO "
                                   f"(only {', '.join(FLOAT_FOR_SPEED)}); export fp16 or fp32")
        self.run = runner(data.outputs)
        self.reference = self.run(model, data.held_out)

    def float_for_speed_report(self) -> dict:
        return {"float_for_speed": {"ops": list(FLOAT_FOR_SPEED), "layers": len(set(self.speed_float))}} \
            if self.speed_float else {}

    def default_precision_check(self, quant) -> dict:
        """Whether the INT8 IR also holds the bound at OpenVINO's default precision here (bf16 on CPUs
        with bf16): {"inference_precision": the one the artifact asks for, ...}. f32 (pinned in the
        manifest) unless that default was measured and kept the bound: an IR whose float remainder
        and requantization run in bf16 can fail even when the f32 IR passes (MobileCLIP-S1 with INT8
        depthwise convs: image cosine 0.04), and an IR never measured in bf16 must not run in it."""
        from ..runtime.backends.openvino import default_precision

        default = default_precision()
        out = {"inference_precision": "f32"}
        if default == "f32":
            return out
        d = self.data
        got = runner(d.outputs, default)(quant, d.held_out)
        drop = guard_measure(got, self.reference, d.output, d.heads, self.max_drop, d.min_agreement)
        out[f"cosine_drop_{default}"] = drop
        if drop <= self.max_drop:
            out["inference_precision"] = "default"
        return out

    def nodes(self, exclude) -> list[str]:
        """The IR nodes of the layers in `exclude` (the guard hands a set: sorted, so the order never
        depends on PYTHONHASHSEED)."""
        return [n for layer in sorted(exclude) for n in self.by_layer[layer]]

    def ignored(self, exclude):
        # NNCF writes the ignored names, in the order given, into the IR's rt_info: a sorted list keeps
        # the xml byte-identical from run to run
        return self.nncf.IgnoredScope(names=sorted(self.others + self.nodes(exclude)),
                                      types=["ScaledDotProductAttention"], validate=False)

    def drop(self, candidate) -> float:
        d = self.data
        return guard_measure(self.run(candidate, d.held_out), self.reference, d.output, d.heads, self.max_drop,
                             d.min_agreement)

    def _guard(self, quantize_fn):
        d = self.data
        return guard(self.model, quantize_fn, list(self.by_layer), d.held_out, d.output, self.max_drop,
                     drop_fn=self.drop)

    def weights_only(self):
        """int8 weights only; float activations and arithmetic. (model, guard result, drop, float layers)"""
        nncf = self.nncf

        def quantize_fn(exclude):
            with _quiet():
                return nncf.compress_weights(self.model.clone(), mode=nncf.CompressWeightsMode.INT8_ASYM,
                                             ignored_scope=self.ignored(exclude))

        quant, g = self._guard(quantize_fn)
        return quant, g, g.drop, list(g.float_layers)

    def static(self, observer: str, alpha: float):
        """Calibrated int8 activations and weights. (model, guard result, drop, float layers)"""
        nncf, batches = self.nncf, self.data.batches
        dataset = nncf.Dataset(batches)
        params = _advanced(nncf, self.recipe, alpha, observer)

        def nncf_quantize(exclude):
            with _quiet():  # NNCF draws progress bars on stdout
                return nncf.quantize(self.model.clone(), dataset, model_type=nncf.ModelType.TRANSFORMER,
                                     preset=nncf.QuantizationPreset.MIXED, subset_size=len(batches),
                                     ignored_scope=self.ignored(exclude), advanced_parameters=params)

        # one NNCF run; the guard's probes strip layers from it rather than re-running NNCF per probe
        full = nncf_quantize(set())
        quant, g = self._guard(lambda exclude: strip(full, self.model, self.nodes(exclude),
                                                     restore_weights=not self.recipe.smoothquant))
        float_layers, drop = list(g.float_layers), g.drop
        if float_layers:  # the written model is NNCF's own, with those layers ignored: measure it
            quant, drop = self._requantize(nncf_quantize, g, float_layers)
        return quant, g, drop, float_layers

    def _requantize(self, nncf_quantize, g, float_layers: list):
        """NNCF's model with `float_layers` ignored, adding the next most sensitive layer (in place)
        while it misses the bound; raises ValidationError when it still does. (model, drop)"""
        order = [k for k, _ in sorted(g.sensitivity.items(), key=lambda kv: -kv[1])]
        for _ in range(MAX_REQUANTIZE):
            quant = nncf_quantize(set(float_layers))
            drop = self.drop(quant)
            rest = [k for k in order if k not in float_layers]
            if drop <= self.max_drop or len(rest) <= 1:
                break
            float_layers.append(rest[0])
        if drop > self.max_drop:
            d = self.data
            raise ValidationError(
                f"OpenVINO INT8 of the {d.graph} graph misses the accuracy bound: cosine drop {drop:.4f} > "
                f"{self.max_drop} with {len(float_layers)} layer(s) in float; try --recipe int8-smoothquant, "
                "w8a16 or --precision fp16",
                failures=[{"output": d.output, "cosine_drop": drop, "bound": self.max_drop,
                           "float_layers": float_layers}])
        return quant, drop


def _quiet():
    return contextlib.redirect_stdout(io.StringIO())


def _advanced(nncf, recipe, alpha, observer):
    from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters, AdvancedSmoothQuantParameters

    kw = {"smooth_quant_alphas": AdvancedSmoothQuantParameters(matmul=alpha if recipe.smoothquant else -1)}
    if observer == "percentile":
        from nncf.quantization.range_estimator import RangeEstimatorParametersSet

        # NNCF renamed its quantile set (QUANTILE -> MEAN_QUANTILE); take whichever this version has
        kw["activations_range_estimator_params"] = getattr(RangeEstimatorParametersSet, "QUANTILE", None) or \
            RangeEstimatorParametersSet.MEAN_QUANTILE
    return AdvancedQuantizationParameters(**kw)


def _is_fq(node) -> bool:
    return node.get_type_name() == "FakeQuantize"


# ops NNCF looks through when it places an activation FakeQuantize (they move data, not values)
_PASS_THROUGH = {"Reshape", "Transpose", "Squeeze", "Unsqueeze", "Gather", "GatherElements", "StridedSlice",
                 "Slice", "VariadicSplit", "Split"}


def activation_fq(op):
    """(FakeQuantize feeding `op`'s activation input, the input to reroute) or (None, None).

    The input is `op.input(0)` when the FakeQuantize feeds it directly, else the first input of the
    single-consumer data-movement chain between them."""
    port, node = op.input(0), op.input_value(0).get_node()
    for _ in range(4):
        if _is_fq(node):
            return node, port
        if node.get_type_name() not in _PASS_THROUGH or len(node.output(0).get_target_inputs()) != 1:
            return None, None
        port, node = node.input(0), node.input_value(0).get_node()
    return None, None


def strip(quantized, float_model, names, restore_weights: bool = True):
    """A copy of `quantized` with the layers `names` back in float: the FakeQuantize in front of
    their activations bypassed, and (`restore_weights`) the float weights of `float_model` put back."""
    ov = _ov()
    if not names:
        return quantized
    m = quantized.clone()
    ops = {op.get_friendly_name(): op for op in m.get_ordered_ops()}
    float_ops = {op.get_friendly_name(): op for op in float_model.get_ordered_ops()}
    for name in names:
        op = ops[name]
        fq, port = activation_fq(op)
        if fq is not None:
            port.replace_source_output(fq.input_value(0))
        if restore_weights:
            w = weight_source(float_ops[name])
            if w is not None and op.input_value(1).get_node().get_type_name() != "Constant":
                op.input(1).replace_source_output(ov.op.Constant(w.get_data().copy()).output(0))
    m.validate_nodes_and_infer_types()
    return m


def quantized_layers(model, layers: dict) -> set:
    """Layers whose op runs in INT8: a FakeQuantize feeds its activations, or its weights are int8."""
    done = set()
    for op in model.get_ordered_ops():
        layer = layers.get(op.get_friendly_name())
        if layer is None:
            continue
        if activation_fq(op)[0] is not None or _int8_weights(op):
            done.add(layer)
    return done


def conv_layers(model, layers: dict) -> set:
    """The layers of `layers` that are convolutions (Convolution or GroupConvolution ops)."""
    return {layers[op.get_friendly_name()] for op in model.get_ordered_ops()
            if op.get_friendly_name() in layers and op.get_type_name() in ("Convolution", "GroupConvolution")}


def _int8_weights(op) -> bool:
    """Weights stored as int8/uint8 (Constant -> Convert -> [Subtract] -> Multiply [-> Convert])."""
    node = op.input_value(1).get_node()
    for _ in range(6):
        if node.get_type_name() == "Constant":
            return str(node.get_element_type()) in ("<Type: 'int8_t'>", "<Type: 'uint8_t'>") or \
                node.get_element_type().get_type_name() in ("i8", "u8")
        if node.get_input_size() == 0:
            return False
        node = node.input_value(0).get_node()
    return False
