"""Static INT8 by QuantizeLinear/DequantizeLinear (QDQ) insertion on our exported ONNX graphs.

Only layers with constant weights are quantized: MatMuls with a 2-D initializer and Convs with a 4-D
one; weights per output channel, symmetric int8; activations per tensor from an observer's range.
LayerNorm, softmax, GELU, residual adds and attention's activation x activation products stay float.
ONNX Runtime fuses each `DQ(x) -> MatMul <- DQ(W)` into one MatMulIntegerToFloat kernel. A Conv needs
more for its int8 kernel: ORT 1.32 fuses `DQ(x) -> Conv <- DQ(W), DQ(int32 bias) -> Q` into
QLinearConv, and leaves a Conv without the Q on its output as DequantizeLinear + float Conv (the
weights dequantized on every call: slower than float). So a static conv also quantizes its output,
with the same observer; a conv that reads another int8 conv's output shares that Q/DQ pair.

Kinds of target (`QuantTarget.kind`) and who quantizes them, as measured with ORT 1.32 on CPU:
"matmul" and dense "conv" (groups 1) everywhere; "depthwise" (groups = channels) static and
weights-only; "grouped" convs with a channel multiplier (MCi's downsampling 7x7, groups = C_in,
C_out = 2 C_in) weights-only, since QLinearConv runs them 20-70x slower than the float Conv;
int8-dynamic leaves every conv float (ConvInteger takes only per-tensor weight zero points and ran
5-50x slower than the float Conv).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .._lazy import require
from ..onnxgraph import MS, Graph, attention_bias_to_gemms, copy_model, ensure_opset, remove_dead, replace, toposort
from .observers import make_observer, quantize_weight_per_channel, scale_zero_point


@dataclass(frozen=True)
class QuantTarget:
    node: str        # ONNX node name
    activation: str  # input tensor quantized per tensor
    weight: str      # initializer quantized per output channel
    layer: str       # module path from the exporter's name scopes, e.g. visual.blocks.3.mlp.fc1
    kind: str = "matmul"  # "matmul" | "conv" (groups 1) | "depthwise" | "grouped" (channel multiplier > 1)
    #                       | "gather" (a table read by index: the token embedding) | "table" (a constant
    #                       table added to activations: positional embeddings)
    output: str = ""      # a conv's output tensor (static INT8 quantizes it too)
    bias: str = ""        # a conv's bias initializer, "" when it has none

    @property
    def is_conv(self) -> bool:
        return self.kind in CONV_KINDS

    @property
    def is_table(self) -> bool:
        return self.kind in TABLE_KINDS


CONV_KINDS = ("conv", "depthwise", "grouped")
TABLE_KINDS = ("gather", "table")   # stored int8 (or 4-bit) by every recipe, read as weights: no activation
STATIC_KINDS = ("matmul", "conv", "depthwise")     # calibrated activations: the int8 kernels ORT runs well
DYNAMIC_KINDS = ("matmul",)                        # ranges per call: DynamicQuantizeMatMul only
WEIGHT_KINDS = ("matmul", "conv", "depthwise", "grouped")  # weights only: folded at load, any conv


def _int8_weight(w: np.ndarray, base: str, axis: int = 1) -> list:
    """Initializers `{base}_int`, `{base}_scale`, `{base}_zp`: symmetric int8 per output channel
    (axis 1 of a (K, N) MatMul weight, axis 0 of a Conv's (C_out, C_in/groups, kH, kW))."""
    from onnx import numpy_helper

    q, scale = quantize_weight_per_channel(w, axis=axis)
    return [numpy_helper.from_array(q, f"{base}_int"),
            numpy_helper.from_array(scale.astype(np.float32), f"{base}_scale"),
            numpy_helper.from_array(np.zeros_like(scale, dtype=np.int8), f"{base}_zp")]


def _layer_name(node) -> str:
    for p in node.metadata_props:
        if p.key == "pkg.torch.onnx.name_scopes":
            scopes = [s.strip(" '\"") for s in p.value.strip("[]").split(",")]
            named = [s for s in scopes if "." in s or s in ("visual", "text")]
            return named[-1] if named else node.name
    return node.name


def default_quantizable(path: str) -> bool:
    """The layers INT8 quantizes unless told otherwise: linear layers inside the transformer blocks and
    those of adapter heads.

    The patch embedding, the final projections and the baked zero-shot head stay float (numerically
    sensitive, and a negligible share of the compute). Adapter heads are layers like any other: a
    16-shot Tip-Adapter cache over 1000 classes is a 512 x 17000 product, 4x less to read in int8,
    and the guard keeps each head's top-1 agreement."""
    return ".blocks." in path or path.startswith("heads.")


def find_targets(model, quantizable=None, tables: bool = False) -> list[QuantTarget]:
    """Layers with constant weights (MatMuls with a 2-D initializer as second input, Convs with a 4-D
    initializer weight and no bias or an initializer bias) whose module path `quantizable(path)`
    accepts (default: `default_quantizable`), in graph order.

    `tables`: also the weights that dominate an artifact's size outside those layers: the towers' end
    MatMuls (`is_end_layer`: patch projection, final projections), the token embedding ("gather") and
    positional tables ("table"). Every recipe stores them in int8 (4-bit recipes: narrower), under the
    same guard."""
    keep = default_quantizable if quantizable is None else quantizable
    inits = {i.name: i for i in model.graph.initializer}
    out = []
    for n in model.graph.node:
        if n.op_type == "MatMul" and len(n.input) == 2 and n.input[1] in inits and len(inits[n.input[1]].dims) == 2:
            layer = _layer_name(n)
            if keep(layer) or (tables and is_end_layer(layer)):
                out.append(QuantTarget(n.name, n.input[0], n.input[1], layer))
        elif n.op_type == "Conv":
            t = _conv_target(n, inits)
            if t is not None and keep(t.layer):
                out.append(t)
    if tables:
        out += table_targets(model, inits)
    return out


TABLE_MIN_ELEMENTS = 1024  # smaller constants (class embeddings, biases, scales) stay float


REPEATED = (".blocks.", ".stages.", ".transformer.", ".layers.")  # the towers' repeated blocks


def is_end_layer(layer: str) -> bool:
    """A tower layer outside its repeated blocks (patch projection, final projection, MCi's head.fc):
    stored int8 by every recipe whatever the quantizable rule says of the blocks."""
    return in_tower(layer) and not any(r in f".{layer}." for r in REPEATED)


def in_tower(layer: str) -> bool:
    """A layer of the image or text tower (not a baked zero-shot head, not an adapter head)."""
    return layer.split(".")[0] in ("visual", "text")


def table_targets(model, inits=None) -> list[QuantTarget]:
    """The token embedding (a Gather of a 2-D initializer by the graph's ids) and constant tables of
    rank >= 2 that other ops read as data (positional embeddings, added or sliced then added), inside
    the towers and of at least TABLE_MIN_ELEMENTS entries."""
    inits = inits if inits is not None else {i.name: i for i in model.graph.initializer}
    readers: dict[str, list] = {}
    for n in model.graph.node:
        for i, name in enumerate(n.input):
            if name in inits:
                readers.setdefault(name, []).append((n, i))
    out = []
    for name, uses in readers.items():
        dims = list(inits[name].dims)
        if len(dims) < 2 or int(np.prod(dims)) < TABLE_MIN_ELEMENTS or inits[name].data_type != 1:  # float32
            continue
        n, i = uses[0]
        layer = _layer_name(n)
        if not in_tower(layer):
            continue
        if len(uses) == 1 and n.op_type == "Gather" and i == 0 and len(dims) == 2 and \
                all(a.i == 0 for a in n.attribute if a.name == "axis"):
            out.append(QuantTarget(n.name, n.input[1], name, layer, "gather", n.output[0]))
        elif all(u.op_type in ("Add", "Slice", "Concat", "Expand") and j == 0 or u.op_type == "Add"
                 for u, j in uses):
            out.append(QuantTarget(n.name, "", name, name if "." in name else f"{layer}.{name}", "table"))
    return out


def _conv_target(n, inits) -> QuantTarget | None:
    """The target for Conv node `n` when its weight is a 4-D initializer and its bias (if any) one too."""
    if len(n.input) < 2 or n.input[1] not in inits or len(inits[n.input[1]].dims) != 4:
        return None
    bias = n.input[2] if len(n.input) > 2 else ""
    if bias and bias not in inits:
        return None
    groups = next((a.i for a in n.attribute if a.name == "group"), 1)
    c_out, per_group = inits[n.input[1]].dims[:2]
    kind = "conv" if groups == 1 else "depthwise" if per_group == 1 and c_out == groups else "grouped"
    return QuantTarget(n.name, n.input[0], n.input[1], _layer_name(n), kind, n.output[0], bias)


def activation_tensors(targets) -> list[str]:
    """The tensors static INT8 quantizes per tensor (and so calibrates): every target's input and
    each conv's output."""
    names = {t.activation for t in targets if t.kind in STATIC_KINDS}
    names.update(t.output for t in targets if t.is_conv and t.kind in STATIC_KINDS)
    return sorted(names)


def probe_session(model, names):
    """An ORT session over a copy of `model` that also outputs the intermediate tensors `names`."""
    onnx = require("onnx", "INT8 calibration")
    ort = require("onnxruntime", "INT8 calibration")
    probe = copy_model(model)
    existing = {o.name for o in probe.graph.output}
    for name in names:
        if name not in existing:
            probe.graph.output.append(onnx.ValueInfoProto(name=name))
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # keep every tensor visible
    return ort.InferenceSession(probe.SerializeToString(), so, providers=["CPUExecutionProvider"])


def collect_ranges(model, targets, batches, observer: str = "minmax", **observer_kw) -> dict:
    """Run the float graph on calibration batches; {activation tensor: (lo, hi)}."""
    names = activation_tensors(targets)
    sess = probe_session(model, names)
    observers = {n: make_observer(observer, **observer_kw) for n in names}
    for feeds in batches:
        outs = sess.run(names, feeds)
        for n, v in zip(names, outs):
            observers[n].observe(v)
    return {n: o.range() for n, o in observers.items()}


FORMS = ("ort", "tensorrt")


def quantize(model, targets, ranges: dict, act_type: str = "uint8", exclude=(), form: str = "ort"):
    """A QDQ copy of `model`; targets whose layer (or node) is in `exclude` stay float, and so do
    targets of kinds static INT8 leaves float (`STATIC_KINDS`).

    `form`: "ort" (above: a conv's output quantized too, its bias int32) or "tensorrt" (TensorRT's
    explicit quantization: Q/DQ only on the inputs of MatMul/Conv, bias left float; pass
    act_type="int8" for its symmetric activations)."""
    require("onnx", "INT8 quantization")
    from onnx import helper

    m = copy_model(model)
    inits = {i.name: i for i in m.graph.initializer}
    nodes = {n.name: n for n in m.graph.node}
    todo = [t for t in targets if t.kind in STATIC_KINDS and t.layer not in exclude and t.node not in exclude]
    q = _QdqBuilder(ranges, act_type)
    ort_convs = form == "ort"
    # A conv's output pair first, so that a conv reading it shares the pair instead of quantizing twice.
    for t in todo:
        if ort_convs and t.is_conv and t.output not in q.done_acts:
            node = nodes[t.node]
            node.output[0] = f"{t.output}_float"
            q.activation(t.output, source=node.output[0], out=t.output)
    for t in todo:
        node = nodes[t.node]
        x = q.activation(t.activation)
        if t.weight not in q.done_weights:
            base = f"{t.weight}_q"
            q.inits += _int8_weight(_array(inits[t.weight]), base, axis=0 if t.is_conv else 1)
            q.nodes.append(helper.make_node("DequantizeLinear", [f"{base}_int", f"{base}_scale", f"{base}_zp"],
                                            [f"{base}_dq"], name=f"{base}_DQ", axis=0 if t.is_conv else 1))
            q.done_weights[t.weight] = f"{base}_dq"
        node.input[0], node.input[1] = x, q.done_weights[t.weight]
        if t.bias and ort_convs:
            node.input[2] = q.conv_bias(t, _array(inits[t.bias]), _array(inits[t.weight]))
    m.graph.initializer.extend(q.inits)
    # QDQ nodes go first; ONNX wants a topological order, so re-sort the whole graph.
    toposort(m.graph, q.nodes)
    if form == "ort":
        quantize_tables(m, _kept(targets, exclude, TABLE_KINDS))
    used = {i for n in m.graph.node for i in n.input}
    keep = [i for i in m.graph.initializer if i.name in used]
    del m.graph.initializer[:]
    m.graph.initializer.extend(keep)
    return m


def _array(init) -> np.ndarray:
    from onnx import numpy_helper

    return numpy_helper.to_array(init)


class _QdqBuilder:
    """The initializers and Q/DQ nodes of one `quantize` call, each activation pair made once."""

    def __init__(self, ranges: dict, act_type: str):
        from onnx import TensorProto

        self.ranges, self.act_type = ranges, act_type
        self.zp_type = TensorProto.UINT8 if act_type == "uint8" else TensorProto.INT8
        self.nodes, self.inits, self.done_acts, self.done_weights, self.scales = [], [], {}, {}, {}

    def activation(self, tensor: str, source: str | None = None, out: str | None = None) -> str:
        """The dequantized name of `tensor` quantized per tensor with its calibrated range: a
        QuantizeLinear of `source` (default: the tensor) and a DequantizeLinear writing `out`
        (default `{tensor}_q_dq`)."""
        if tensor in self.done_acts:
            return self.done_acts[tensor]
        from onnx import helper, numpy_helper

        lo, hi = self.ranges[tensor]
        scale, zp = scale_zero_point(lo, hi, self.act_type)
        base = f"{tensor}_q"
        dq = out or f"{base}_dq"
        self.inits += [numpy_helper.from_array(np.array(scale, np.float32), f"{base}_scale"),
                       helper.make_tensor(f"{base}_zp", self.zp_type, [], [zp])]
        self.nodes += [
            helper.make_node("QuantizeLinear", [source or tensor, f"{base}_scale", f"{base}_zp"], [f"{base}_int"],
                             name=f"{base}_Q"),
            helper.make_node("DequantizeLinear", [f"{base}_int", f"{base}_scale", f"{base}_zp"], [dq],
                             name=f"{base}_DQ"),
        ]
        self.done_acts[tensor], self.scales[tensor] = dq, np.float32(scale)
        return dq

    def conv_bias(self, t: QuantTarget, bias: np.ndarray, weight: np.ndarray) -> str:
        """A conv's bias as int32 with scale x_scale * w_scale per output channel, zero point 0: the
        form ORT's QDQ Conv (QLinearConv) takes."""
        from onnx import helper, numpy_helper

        _, w_scale = quantize_weight_per_channel(weight, axis=0)
        scale = (self.scales[t.activation] * w_scale).astype(np.float32)
        q = np.clip(np.rint(bias.astype(np.float64) / scale), -2**31, 2**31 - 1).astype(np.int32)
        base = f"{t.node}_bias_q"
        self.inits += [numpy_helper.from_array(q, f"{base}_int"), numpy_helper.from_array(scale, f"{base}_scale"),
                       numpy_helper.from_array(np.zeros_like(q), f"{base}_zp")]
        self.nodes.append(helper.make_node("DequantizeLinear", [f"{base}_int", f"{base}_scale", f"{base}_zp"],
                                           [f"{base}_dq"], name=f"{base}_DQ", axis=0))
        return f"{base}_dq"


def _replace_linear(model, targets, exclude, make) -> int:
    """Replace each target MatMul (and its bias Add, when it has one) by the nodes `make` returns.

    make(target, weight (K, N) array, bias name or None, input, output) -> (nodes, initializers)."""
    from onnx import numpy_helper

    g = Graph(model.graph)
    nodes = {n.name: n for n in model.graph.node}
    count = 0
    for t in targets:
        if t.layer in exclude or t.node in exclude:
            continue
        mm = nodes[t.node]
        w = numpy_helper.to_array(g.inits[t.weight])
        add, bias = g.bias_add(mm.output[0], width=w.shape[1])
        drop = [mm] if add is None else [mm, add]
        new_nodes, new_inits = make(t, w, bias, mm.input[0], drop[-1].output[0])
        for n in new_nodes:
            n.metadata_props.extend(mm.metadata_props)
        replace(model, drop[-1], new_nodes, drop)
        model.graph.initializer.extend(new_inits)
        count += 1
    if count:
        ensure_opset(model, MS)
        remove_dead(model)
    return count


def quantize_dynamic(model, targets, exclude=()):
    """INT8 weights per output channel; activations quantized per tensor at run time from their own
    range (ONNX Runtime's `DynamicQuantizeMatMul`). Needs no calibration data. Convs stay float
    (`DYNAMIC_KINDS`): ORT's ConvInteger is the only dynamic conv path and runs slower than float."""
    require("onnx", "INT8 quantization")
    from onnx import helper

    m = copy_model(model)

    def make(t, w, bias, x, out):
        base = f"{t.weight}_dq"
        inits = _int8_weight(w, base)
        ins = [x, f"{base}_int", f"{base}_scale", f"{base}_zp"] + ([bias] if bias else [])
        return [helper.make_node("DynamicQuantizeMatMul", ins, [out], name=f"{t.node}_dyn",
                                 domain="com.microsoft")], inits

    _replace_linear(m, [t for t in targets if t.kind in DYNAMIC_KINDS], exclude, make)
    attention_bias_to_gemms(m)
    quantize_tables(m, _kept(targets, exclude, TABLE_KINDS))
    return m


def quantize_weights(model, targets, exclude=()):
    """Weights only ("w8a16"): int8 weights per output channel stored as `DequantizeLinear -> MatMul`,
    activations and arithmetic stay float. About 4x smaller linear weights on disk and in downloads;
    ONNX Runtime folds the dequantization once at load when the session sets
    `session.disable_quant_qdq=1` (the manifest asks for it), and then runs at FP32 speed. Conv
    weights of any groups become `DequantizeLinear(int8, axis 0) -> Conv` the same way."""
    require("onnx", "weight quantization")
    m = copy_model(model)
    _replace_linear(m, [t for t in targets if t.kind == "matmul"], exclude, _w8_linear)
    _conv_weights_only(m, _kept(targets, exclude, CONV_KINDS))
    quantize_tables(m, _kept(targets, exclude, TABLE_KINDS))
    return m


def onnx_float() -> int:
    from onnx import TensorProto

    return TensorProto.FLOAT


def _w8_linear(t, w, bias, x, out):
    """`_replace_linear`'s maker for weights-only int8: DequantizeLinear(int8 per output channel) ->
    MatMul [-> Add bias]."""
    from onnx import helper

    base = f"{t.weight}_w8"
    mm_out = f"{out}_w8mm" if bias else out
    nodes = [helper.make_node("DequantizeLinear", [f"{base}_int", f"{base}_scale", f"{base}_zp"], [f"{base}_f"],
                              name=f"{t.node}_w8_DQ", axis=1),
             helper.make_node("MatMul", [x, f"{base}_f"], [mm_out], name=f"{t.node}_w8")]
    if bias:
        nodes.append(helper.make_node("Add", [mm_out, bias], [out], name=f"{t.node}_w8_bias"))
    return nodes, _int8_weight(w, base)


def _kept(targets, exclude, kinds) -> list:
    return [t for t in targets if t.kind in kinds and t.layer not in exclude and t.node not in exclude]


def _pow2_block(width: int, at_most: int) -> int:
    """The largest power of two <= `at_most` (and >= 16) dividing `width`; 0 when there is none."""
    b = 1 << (max(int(at_most), 16).bit_length() - 1)
    while b >= 16 and width % b:
        b //= 2
    return b if b >= 16 else 0


def block_quantize(w: np.ndarray, bits: int, block: int, search: bool = True):
    """Symmetric block-wise quantization along the last axis of `w` (R, K): (codes uint8 (R, K) offset by
    2**(bits-1), the zero point ONNX Runtime's MatMulNBits/GatherBlockQuantized assume when none is
    given; scales float32 (R, K // block)). K must be a multiple of `block`.

    Each block's scale maps its largest-magnitude weight to the code -2**(bits-1) (the scale takes that
    weight's sign), so every code is used; `search` then tries that scale shrunk by up to 30 %
    (clipping the largest weights) and keeps, per block, the one with the least squared error."""
    rows, k = w.shape
    lo, hi = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    blocks = w.astype(np.float32).reshape(rows, k // block, block)
    peak = np.take_along_axis(blocks, np.abs(blocks).argmax(-1)[..., None], -1)
    base = np.where(peak != 0, peak / lo, 1.0).astype(np.float32)
    best_q, best_s, best_e = None, None, None
    for ratio in (np.linspace(1.0, 0.7, 7) if search and bits < 8 else (1.0,)):
        scale = (base * ratio).astype(np.float32)
        q = np.clip(np.rint(blocks / scale), lo, hi)
        err = np.square(q * scale - blocks).sum(-1, keepdims=True)
        if best_e is None:
            best_q, best_s, best_e = q, scale, err
        else:
            better = err < best_e
            best_q, best_s, best_e = np.where(better, q, best_q), np.where(better, scale, best_s), np.minimum(err, best_e)
    return (best_q - lo).astype(np.uint8).reshape(rows, k), best_s.reshape(rows, k // block)


def pack_codes(q: np.ndarray, bits: int) -> np.ndarray:
    """Codes (R, K) packed along K: 8 bits as is, 4 bits two to a byte (the first in the low nibble)."""
    if bits == 8:
        return q
    return (q[:, 0::2] | (q[:, 1::2] << 4)).astype(np.uint8)


def quantize_tables(model, targets, bits=8, block: int = 32) -> int:
    """In place: each "gather" target (token embedding) becomes ONNX Runtime's GatherBlockQuantized over
    uint8 codes (`bits` 8: one scale per row, or per largest power-of-two block dividing the width;
    4: per `block`), each "table" target a DequantizeLinear of int8 rows writing the tensor the graph
    already reads. `bits`: one width, or {layer: bits} (32 keeps a table float). Returns how many."""
    from onnx import helper, numpy_helper

    g = Graph(model.graph)
    nodes = {n.name: n for n in model.graph.node}
    done = 0
    for t in targets:
        b = bits.get(t.layer, 8) if isinstance(bits, dict) else bits
        if b >= 16 or t.weight not in g.inits:
            continue
        w = numpy_helper.to_array(g.inits[t.weight])
        if t.kind == "gather":
            size = _pow2_block(w.shape[1], w.shape[1] if b == 8 else block)
            if not size:
                continue
            q, scale = block_quantize(w, b, size)
            base = f"{t.weight}_q{b}"
            # float16 scales halve their bytes (a vocabulary of 49408 rows: 99 KB); the gathered rows are
            # dequantized in float16 (relative error 5e-4, a tenth of an int8 step) and cast back
            half = bool(np.all((np.abs(scale) > 1e-4) & (np.abs(scale) < 6e4)))
            model.graph.initializer.extend([numpy_helper.from_array(pack_codes(q, b), f"{base}_codes"),
                                            numpy_helper.from_array(scale.astype(np.float16) if half else scale,
                                                                    f"{base}_scale")])
            node = nodes[t.node]
            out = f"{node.output[0]}_f16" if half else node.output[0]
            new = [helper.make_node("GatherBlockQuantized", [f"{base}_codes", node.input[1], f"{base}_scale"],
                                    [out], name=f"{t.node}_q{b}", domain=MS, bits=b, block_size=size,
                                    gather_axis=0, quantize_axis=1)]
            if half:
                new.append(helper.make_node("Cast", [out], [node.output[0]], name=f"{t.node}_q{b}_f32",
                                            to=onnx_float()))
            for n in new:
                n.metadata_props.extend(node.metadata_props)
            replace(model, node, new, [node])
        else:
            flat = w.reshape(w.shape[0], -1)
            q, scale = quantize_weight_per_channel(flat, axis=0)
            base = f"{t.weight}_q8"
            model.graph.initializer.extend([
                numpy_helper.from_array(q.reshape(w.shape), f"{base}_int"),
                numpy_helper.from_array(scale.astype(np.float32), f"{base}_scale"),
                numpy_helper.from_array(np.zeros_like(scale, dtype=np.int8), f"{base}_zp")])
            dq = helper.make_node("DequantizeLinear", [f"{base}_int", f"{base}_scale", f"{base}_zp"], [t.weight],
                                  name=f"{base}_DQ", axis=0)
            model.graph.initializer.remove(g.inits[t.weight])
            toposort(model.graph, [dq])
        done += 1
    if done:
        ensure_opset(model, MS)
        remove_dead(model)
    return done


NBITS_LEVELS = {0: "unset", 1: "fp32", 2: "fp16", 3: "bf16", 4: "int8"}


def quantize_nbits(model, targets, bits: dict, block: int = 32, level: int = 1, cache: dict | None = None,
                   hessians: dict | None = None):
    """Block-wise weights ("w4a16"/"w4a8"): a copy of `model` where each target gets `bits[layer]`
    (default 4; 32 keeps it float). MatMuls at 4 bits become ONNX Runtime's MatMulNBits (symmetric,
    one float32 scale per `block` input rows, computed at `accuracy_level` `level`: 1 fp32 ... 4
    int8 activations); at 8 bits, MatMulNBits too when `level` is 4 (its int8 kernel), else int8
    weights behind DequantizeLinear (`quantize_weights`' form, folded at load). Convs store int8
    weights (DequantizeLinear); the token embedding 4 or 8 bits (GatherBlockQuantized), positional
    tables int8. `cache` ({}) keeps packed weights between the guard's candidates. `hessians`
    ({activation tensor: X^T X}, `calibration.gptq.input_hessians`): 4-bit MatMul weights are rounded
    with GPTQ's error compensation instead of to the nearest code."""
    require("onnx", "4-bit weight quantization")
    from onnx import helper, numpy_helper

    m = copy_model(model)
    cache = {} if cache is None else cache
    width = {t.layer: bits.get(t.layer, 4) for t in targets}

    def nbits(t, w, bias, x, out):
        b = width[t.layer]
        key = (t.weight, b, block)
        if key not in cache:
            k, n = w.shape
            size = block if k % block == 0 else _pow2_block(k, block)
            h = (hessians or {}).get(t.activation) if b == 4 else None
            if h is not None:
                from .gptq import gptq_quantize

                q, scale = gptq_quantize(w, h, b, size)
            else:
                q, scale = block_quantize(w.T, b, size)
            packed = pack_codes(q, b).reshape(n, k // size, size * b // 8)
            cache[key] = (packed, scale.reshape(-1), size)
        packed, scale, size = cache[key]
        base = f"{t.weight}_nb{b}"
        inits = [numpy_helper.from_array(packed, f"{base}_B"), numpy_helper.from_array(scale, f"{base}_scale")]
        ins = [x, f"{base}_B", f"{base}_scale"] + (["", "", bias] if bias else [])
        return [helper.make_node("MatMulNBits", ins, [out], name=f"{t.node}_nb{b}", domain=MS, K=w.shape[0],
                                 N=w.shape[1], bits=b, block_size=size, accuracy_level=level)], inits

    def blockable(t):
        k = _init_dims(m, t.weight)[0]
        return k % block == 0 or _pow2_block(k, block)

    mm = [t for t in targets if t.kind == "matmul" and width[t.layer] < 16]
    four = [t for t in mm if (width[t.layer] == 4 or level == 4) and blockable(t)]
    _replace_linear(m, four, (), nbits)
    _replace_linear(m, [t for t in mm if t not in four], (), _w8_linear)
    _conv_weights_only(m, [t for t in targets if t.is_conv and width[t.layer] < 16])
    quantize_tables(m, [t for t in targets if t.is_table], {t.layer: width[t.layer] for t in targets}, block)
    ensure_opset(m, MS)
    return m


def weight_count(model, name: str) -> int:
    """How many weights the initializer `name` holds."""
    return int(np.prod(_init_dims(model, name)))


def _init_dims(model, name: str) -> list:
    return next(list(i.dims) for i in model.graph.initializer if i.name == name)


def _conv_weights_only(model, targets) -> None:
    """Each target conv reads its weight through `DequantizeLinear(int8 per output channel)`, in place."""
    from onnx import helper

    inits = {i.name: i for i in model.graph.initializer}
    nodes = {n.name: n for n in model.graph.node}
    new_nodes, done = [], {}
    for t in targets:
        if t.weight not in done:
            base = f"{t.weight}_w8"
            model.graph.initializer.extend(_int8_weight(_array(inits[t.weight]), base, axis=0))
            new_nodes.append(helper.make_node("DequantizeLinear", [f"{base}_int", f"{base}_scale", f"{base}_zp"],
                                              [f"{base}_f"], name=f"{t.node}_w8_DQ", axis=0))
            done[t.weight] = f"{base}_f"
        nodes[t.node].input[1] = done[t.weight]
    if new_nodes:
        toposort(model.graph, new_nodes)
        remove_dead(model)
