"""INT8 for OpenVINO IR through NNCF, under edgeclip's recipes, calibration data and accuracy guard.

    model, report = quantize_ir(float_ir, get_recipe("int8"), calibration_set, layers, tables=tables)

`layers` maps the IR's MatMul, Convolution and GroupConvolution nodes (friendly names) to our module
paths ("visual.blocks.0.mlp.fc1", "visual.stages.2.blocks.0.mlp.fc1"). As for ONNX, only the layers
the towers call quantizable are; `tables` maps the towers' tables and end layers (the token embedding
Gather, the MatMuls outside the blocks: final projections, a patch projection traced as a MatMul),
which every recipe stores as int8 weights (NNCF weight compression, never int8 activations: `w4a16`
narrower), guarded like the layers. Everything else (attention itself, convolutional stems, heads)
becomes an NNCF ignored scope, and so do the layers the guard returns to float. What NNCF runs for a
recipe (nncf.quantize, nncf.compress_weights, or nothing: an error) is the recipe's `openvino` entry.

The guard ranks layers on cheap probes: for static INT8 the all-INT8 model with the quantization of
some layers stripped again (their activation FakeQuantize bypassed, their float weights put back); for
4-bit weights, the float model with each layer's weight read through the decompression subgraph of an
all-4-bit or all-int8 NNCF model (`_graft`: what NNCF writes for those widths, constant for constant).
The model written is always NNCF's own output for the chosen ignored scopes and widths, measured once
more.
"""
from __future__ import annotations

import contextlib
import io
import logging

import numpy as np

from .._lazy import require
from ..errors import CalibrationError, ValidationError
from .guard import guard, guard_chain, guard_measure
from .recipes import NBIT_BLOCK, CalibrationSet, Recipe, final_figures, guard_report

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
WEIGHTED = QUANTIZABLE + ("Gather",)  # ops NNCF may store compressed weights for (Gather: embeddings)
FOUR_BIT_OPS = ("MatMul", "Gather")   # NNCF's INT4 modes; other ops asked for 4 bits get int8


def _ov():
    return require("openvino", "the OpenVINO target")


def _nncf():
    nncf = require("nncf", "INT8 for the OpenVINO target")
    nncf.set_log_level(logging.ERROR)
    return nncf


def weight_port(op) -> int:
    """The input holding `op`'s weights: a Gather's table (0), a MatMul's or convolution's second (1)."""
    return 0 if op.get_type_name() == "Gather" else 1


def weight_source(op):
    """The Constant behind a MatMul's or convolution's weight input, or a Gather's table (through
    Convert), else None."""
    node = op.input_value(weight_port(op)).get_node()
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


def quantize_ir(model, recipe: Recipe, data: CalibrationSet, layers: dict, *, tables: dict | None = None,
                observer: str = "minmax", alpha: float = 0.5, max_drop: float = 0.005,
                block_size: int = NBIT_BLOCK):
    """(quantized ov.Model, report for the manifest), the report shaped as the ONNX target's.

    `tables`: {node: module path} of the tables and end layers, stored as int8 weights by every recipe
    (see the module docstring); the report counts them apart from the quantizable `layers`
    (`int8_tables`: token embeddings, `int8_end_layers`, `float_tables`), and `bits` holds every one.
    `block_size`: the 4-bit recipes' input rows per weight scale."""
    nncf = _nncf()
    _check_request(recipe, data, layers, observer, alpha, max_drop)
    q = _Quantizer(nncf, model, recipe, data, layers, max_drop, tables, block_size)
    report = {"recipe": recipe.name, "activations": recipe.activations, "data": data.info,
              "quantizable_layers": len(q.quantizable), "quantizer": f"nncf {nncf.__version__}"}
    quant, g, drop, float_layers = recipe.openvino.quantize(q, recipe, observer, alpha, report)
    report.update(q.layer_report(quant, g, drop, float_layers))
    report.update(final_figures(q.run(quant, data.held_out), q.reference, data))
    report.update(q.float_for_speed_report(), **q.default_precision_check(quant))
    if recipe.activations == "float":
        report.update(dynamic_quantization_report())
    return quant, report


def dynamic_quantization_report() -> dict:
    """OpenVINO's CPU plugin quantizes the activations of layers with compressed weights to int8, per
    group of this many inputs (0: it does not), by default and at f32 too: the guard measured the
    weights-only IR as it runs here, not with float activations."""
    return {"cpu_dynamic_quantization_group_size":
            int(_ov().Core().get_property("CPU", "DYNAMIC_QUANTIZATION_GROUP_SIZE"))}


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

    def __init__(self, nncf, model, recipe: Recipe, data: CalibrationSet, layers: dict, max_drop: float,
                 tables: dict | None = None, block: int = NBIT_BLOCK):
        self.nncf, self.model, self.recipe, self.data, self.max_drop = nncf, model, recipe, data, max_drop
        self.block, tables = block, tables or {}
        self.ops = ops = {op.get_friendly_name(): op for op in model.get_ordered_ops()}
        missing = [n for n in (*layers, *tables) if n not in ops]
        if missing:
            raise CalibrationError(f"layers not in the {data.graph} graph: {', '.join(missing[:3])}")
        # weighted nodes outside our layers and tables (convolutional stems, heads) stay float; so does
        # an embedding Gather nobody named (nncf.quantize and compress_weights would store it int8)
        self.others = [n for n, op in ops.items() if n not in layers and n not in tables and (
            op.get_type_name() in QUANTIZABLE or op.get_type_name() == "Gather" and weight_source(op) is not None)]
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
        self.quantizable = list(self.by_layer)  # the towers' quantizable layers; the tables follow
        for node, layer in tables.items():
            self.by_layer.setdefault(layer, []).append(node)
        self.tables = set(self.by_layer) - set(self.quantizable)
        self.gathers = {layer for node, layer in tables.items() if ops[node].get_type_name() == "Gather"}
        self.run = runner(data.outputs)
        self.reference = self.run(model, data.held_out)

    def float_for_speed_report(self) -> dict:
        return {"float_for_speed": {"ops": list(FLOAT_FOR_SPEED), "layers": len(set(self.speed_float))}} \
            if self.speed_float else {}

    def layer_report(self, quant, g, drop: float, float_layers: list) -> dict:
        """The guard's figures and what `quant` stores: the quantizable layers (`int8_layers`,
        `float_layers`), the tables and end layers apart, and the `bits` of every layer as written
        (4, 8; 32: float)."""
        ops = {op.get_friendly_name(): op for op in quant.get_ordered_ops()}
        bits = {layer: max(weight_bits(ops[n]) for n in nodes) for layer, nodes in self.by_layer.items()}
        done = quantized_layers(quant, {n: layer for layer, nodes in self.by_layer.items() for n in nodes})
        layers = done - self.tables
        convs = conv_layers(self.model, {n: layer for layer in self.quantizable for n in self.by_layer[layer]})
        out = guard_report(g, self.max_drop, drop, [k for k in float_layers if k not in self.tables], len(layers))
        out.update({"int8_conv_layers": len(layers & convs), "int8_matmul_layers": len(layers - convs),
                    "int8_tables": len(done & self.gathers),
                    "int8_end_layers": len((done & self.tables) - self.gathers),
                    "float_tables": [k for k in float_layers if k in self.tables], "bits": bits})
        return out

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

    def compress(self, model, layers, **kw):
        """nncf.compress_weights(`model`, **kw) on the nodes of `layers` alone (in place, returned)."""
        if not layers:
            return model
        with _quiet():
            return self.nncf.compress_weights(model, ignored_scope=self.ignored(set(self.by_layer) - set(layers)),
                                              **kw)

    def int8_weights(self, model, layers):
        """`layers` stored as int8 weights (asymmetric per output channel: w8a16's form), in place."""
        return self.compress(model, layers, mode=self.nncf.CompressWeightsMode.INT8_ASYM)

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
        quant, g = self._guard(lambda exclude: self.int8_weights(self.model.clone(), set(self.by_layer) - exclude))
        return quant, g, g.drop, list(g.float_layers)

    def weights_int4(self, report: dict):
        """4-bit weights per block (NNCF INT4_SYM, one scale per `block` input rows: `at_bits`), the
        layers the guard moves int8 (w8a16's form), then float (`guard_chain`, most drop per weight
        first). Probes graft the all-4-bit and all-int8 models' weights into the float model (`_graft`);
        the model written is NNCF's own for the chosen widths, measured again. (model, chain report,
        drop, float layers)"""
        d = self.data
        report["block_size"] = self.block
        every, nodes = list(self.by_layer), set(self.nodes(self.by_layer))
        full = {b: self.at_bits(dict.fromkeys(every, b)) for b in (4, 8)}
        sources = {b: {op.get_friendly_name(): op.input_value(weight_port(op)) for op in m.get_ordered_ops()
                       if op.get_friendly_name() in nodes} for b, m in full.items()}
        _, g = guard_chain(self.model, lambda bits: self._graft(sources, bits), every, d.held_out, d.output,
                           (4, 8), self.max_drop, drop_fn=self.drop, cost=self.weight_counts())
        quant = self.at_bits(g.bits)
        drop = self.drop(quant)
        if drop > self.max_drop:  # the probes are NNCF's weights constant for constant: not expected
            raise ValidationError(
                f"OpenVINO 4-bit weights of the {d.graph} graph miss the accuracy bound: cosine drop "
                f"{drop:.4f} > {self.max_drop} for the widths its probes chose; try --recipe w8a16",
                failures=[{"output": d.output, "cosine_drop": drop, "bound": self.max_drop, "bits": g.bits}])
        return quant, g, drop, list(g.float_layers)

    def weight_counts(self) -> dict:
        """{layer: weights it stores}: the guard chain widens the layers with the most drop per weight."""
        return {layer: sum(int(np.prod(list(weight_source(self.ops[n]).get_output_shape(0)))) for n in nodes)
                for layer, nodes in self.by_layer.items()}

    def four_bit(self, layer: str) -> bool:
        """Whether NNCF's INT4 modes take `layer` at this block: MatMuls and Gathers whose input width
        (the axis a block runs along) is a multiple of it. Others asked for 4 bits get int8."""
        ops = [self.ops[n] for n in self.by_layer[layer]]
        return all(op.get_type_name() in FOUR_BIT_OPS and _reduction_width(op) % self.block == 0 for op in ops)

    def at_bits(self, bits: dict):
        """NNCF's model with each layer at `bits[layer]` (4, 8; 32 float): INT4_SYM per block over the
        4-bit MatMuls, INT4_ASYM per block over 4-bit token embeddings, then INT8_ASYM over the int8
        layers, each pass with every other node ignored.

        Embeddings take a zero point per block: NNCF's symmetric 4 bits scale a block by max|w| / 8 and
        clip its largest positive weight to 7/8 of it, and the held-out captions read only the few
        rows of the table their tokens pick, so the guard cannot see that error on the rest. builtin:tiny,
        every layer 4-bit, export validation (random ids, 75 tokens): cosine 0.975 with a symmetric
        table, 0.990 asymmetric, 0.992 with an int8 table (the bound is 0.98)."""
        modes = self.nncf.CompressWeightsMode
        width = {k: 8 if b == 4 and not self.four_bit(k) else b for k, b in bits.items()}
        four = sorted(k for k, b in width.items() if b == 4)
        m = self.model.clone()
        for layers, mode in (([k for k in four if k not in self.gathers], modes.INT4_SYM),
                             ([k for k in four if k in self.gathers], modes.INT4_ASYM)):
            m = self.compress(m, layers, mode=mode, group_size=self.block, ratio=1.0, all_layers=True)
        return self.int8_weights(m, sorted(k for k, b in width.items() if b == 8))

    def _graft(self, sources: dict, bits: dict):
        """The float model with each layer's weight input read from `sources[bits]` (the decompression
        subgraph of NNCF's all-4-bit or all-int8 model; 32 keeps the float weight): the numbers
        `at_bits(bits)` would write, without an NNCF run per probe."""
        m = self.model.clone()
        ops = {op.get_friendly_name(): op for op in m.get_ordered_ops()}
        for layer in sorted(bits):
            if bits[layer] < 32:
                for n in self.by_layer[layer]:
                    ops[n].input(weight_port(ops[n])).replace_source_output(sources[bits[layer]][n])
        m.validate_nodes_and_infer_types()
        return m

    def static(self, observer: str, alpha: float):
        """Calibrated int8 activations and weights; the tables and end layers int8 weights only.
        (model, guard result, drop, float layers)"""
        nncf, batches = self.nncf, self.data.batches
        dataset = nncf.Dataset(batches)
        params = _advanced(nncf, self.recipe, alpha, observer)

        def nncf_quantize(exclude):
            with _quiet():  # NNCF draws progress bars on stdout
                q = nncf.quantize(self.model.clone(), dataset, model_type=nncf.ModelType.TRANSFORMER,
                                  preset=nncf.QuantizationPreset.MIXED, subset_size=len(batches),
                                  ignored_scope=self.ignored(set(exclude) | self.tables), advanced_parameters=params)
            return self.int8_weights(q, self.tables - set(exclude))

        # one NNCF run; the guard's probes strip layers from it rather than re-running NNCF per probe.
        # SmoothQuant rescaled the quantized layers' weights (never the tables'): theirs stay as they are
        full = nncf_quantize(set())
        smooth = self.recipe.smoothquant

        def probe(exclude):
            return strip(full, self.model, self.nodes(exclude),
                         restore=self.nodes(exclude & self.tables if smooth else exclude))

        quant, g = self._guard(probe)
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


def strip(quantized, float_model, names, restore=None):
    """A copy of `quantized` with the layers `names` back in float: the FakeQuantize in front of
    their activations bypassed, and the float weights of `float_model` put back for the nodes in
    `restore` (default: all of `names`)."""
    ov = _ov()
    if not names:
        return quantized
    restore = set(names if restore is None else restore)
    m = quantized.clone()
    ops = {op.get_friendly_name(): op for op in m.get_ordered_ops()}
    float_ops = {op.get_friendly_name(): op for op in float_model.get_ordered_ops()}
    for name in names:
        op = ops[name]
        fq, port = activation_fq(op) if op.get_type_name() != "Gather" else (None, None)
        if fq is not None:
            port.replace_source_output(fq.input_value(0))
        w, i = weight_source(float_ops[name]), weight_port(op)
        if name in restore and w is not None and op.input_value(i).get_node().get_type_name() != "Constant":
            op.input(i).replace_source_output(ov.op.Constant(w.get_data().copy()).output(0))
    m.validate_nodes_and_infer_types()
    return m


def quantized_layers(model, layers: dict) -> set:
    """Layers whose op runs in INT8 or stores compressed weights: a FakeQuantize feeds its activations,
    or its weights are 4- or 8-bit integers."""
    done = set()
    for op in model.get_ordered_ops():
        layer = layers.get(op.get_friendly_name())
        if layer is None:
            continue
        if (op.get_type_name() != "Gather" and activation_fq(op)[0] is not None) or weight_bits(op) < 32:
            done.add(layer)
    return done


def conv_layers(model, layers: dict) -> set:
    """The layers of `layers` that are convolutions (Convolution or GroupConvolution ops)."""
    return {layers[op.get_friendly_name()] for op in model.get_ordered_ops()
            if op.get_friendly_name() in layers and op.get_type_name() in ("Convolution", "GroupConvolution")}


INT_BITS = {"i4": 4, "u4": 4, "i8": 8, "u8": 8}


def weight_bits(op) -> int:
    """Bits per stored weight of `op` (32: float): the integer Constant at the start of its weights'
    decompression (Constant -> Convert -> [Subtract] -> Multiply [-> Reshape] [-> Convert])."""
    node = op.input_value(weight_port(op)).get_node()
    for _ in range(8):
        if node.get_type_name() == "Constant":
            return INT_BITS.get(node.get_element_type().get_type_name(), 32)
        if node.get_input_size() == 0:
            return 32
        node = node.input_value(0).get_node()
    return 32


def _reduction_width(op) -> int:
    """The input width a weight block runs along: a MatMul's K (its weight's last axis when transposed),
    a Gather table's row width."""
    shape = list(weight_source(op).get_output_shape(0)) if weight_source(op) is not None else [0]
    if op.get_type_name() == "MatMul" and not op.get_attributes().get("transpose_b", False):
        return int(shape[-2]) if len(shape) >= 2 else 0
    return int(shape[-1])
