"""SmoothQuant scale migration on our ONNX graphs (Xiao et al., 2023).

Real CLIP towers have a few LayerNorm output channels with huge magnitudes; one per-tensor INT8
scale for such an activation leaves the other channels a handful of levels. SmoothQuant divides
each input channel j of a LayerNorm -> MatMul pair by s_j = max|X_j|^a / max|W_j|^(1-a) and
multiplies row j of the weight by s_j: the float function is unchanged, the outliers move into the
weights, which are quantized per output channel and absorb them easily. The division is folded
into the LayerNorm's scale and bias, so the graph gains no node.
"""
from __future__ import annotations

import numpy as np

from .._lazy import require
from .qdq import probe_session


def _producers(graph) -> dict:
    return {o: n for n in graph.node for o in n.output}


PASS_THROUGH = ("Gather", "GatherElements")  # select tokens, keep channels: scaling commutes
LN_PARAMS = {"LayerNormalization": (1, 2), "SkipLayerNormalization": (2, 3)}  # (scale, bias) inputs


def _token_slice(model, node) -> bool:
    """A Slice over the token axis only ((B, L, W) tensors: axis 1 or -2): channel scaling commutes."""
    if node.op_type != "Slice" or len(node.input) < 4:
        return False
    from onnx import numpy_helper

    axes = next((numpy_helper.to_array(i) for i in model.graph.initializer if i.name == node.input[3]), None)
    if axes is None:
        for n in model.graph.node:
            if n.op_type == "Constant" and n.output[0] == node.input[3]:
                axes = numpy_helper.to_array(n.attribute[0].t)
    return axes is not None and all(int(a) in (1, -2) for a in np.ravel(axes))


def smoothable_pairs(model, targets) -> dict:
    """{LayerNorm node name: [targets reading its output]} for LNs with initializer scale/bias whose
    output reaches nothing but target MatMuls (directly or through token-selecting Gathers and Slices); the first
    target in each list reads the LN output itself, so its activation gives the channel ranges."""
    inits = {i.name for i in model.graph.initializer}
    by_input: dict[str, list] = {}
    for n in model.graph.node:
        for i in n.input:
            by_input.setdefault(i, []).append(n)
    target_of = {t.node: t for t in targets}
    pairs = {}
    for ln in model.graph.node:
        if ln.op_type not in LN_PARAMS:
            continue
        si, bi = LN_PARAMS[ln.op_type]
        if len(ln.input) <= bi or not {ln.input[si], ln.input[bi]} <= inits:
            continue
        found, ok, frontier = [], True, [ln.output[0]]
        while frontier and ok:
            tensor = frontier.pop()
            for reader in by_input.get(tensor, []):
                if reader.name in target_of and reader.input[0] == tensor:
                    found.append(target_of[reader.name])
                elif reader.input[0] == tensor and (reader.op_type in PASS_THROUGH or
                                                     _token_slice(model, reader)):
                    frontier.append(reader.output[0])
                else:
                    ok = False
        direct = [t for t in found if t.activation == ln.output[0]]
        if ok and direct:
            pairs[ln.name] = direct + [t for t in found if t not in direct]
    return pairs


def channel_absmax(model, activations, batches) -> dict:
    """Per-channel max |x| (over all but the last axis) of the named tensors on calibration batches."""
    sess = probe_session(model, activations)
    out: dict[str, np.ndarray] = {}
    for feeds in batches:
        for name, v in zip(activations, sess.run(list(activations), feeds)):
            m = np.abs(v).reshape(-1, v.shape[-1]).max(axis=0)
            out[name] = m if name not in out else np.maximum(out[name], m)
    return out


def smooth(model, targets, batches, alpha: float = 0.5):
    """A copy of `model` with SmoothQuant scales folded in; the float function is unchanged."""
    onnx = require("onnx", "SmoothQuant")
    from onnx import numpy_helper

    m = onnx.ModelProto()
    m.CopyFrom(model)
    pairs = smoothable_pairs(m, targets)
    if not pairs:
        return m
    nodes = {n.name: n for n in m.graph.node}
    inits = {i.name: i for i in m.graph.initializer}
    acts = [ts[0].activation for ts in pairs.values()]
    xmax = channel_absmax(m, acts, batches)
    shared = _shared_initializers(m)
    for ln_name, ts in pairs.items():
        ln = nodes[ln_name]
        weights = [numpy_helper.to_array(inits[t.weight]) for t in ts]  # (K, N) each
        wmax = np.max([np.abs(w).max(axis=1) for w in weights], axis=0)
        s = np.power(np.maximum(xmax[ts[0].activation], 1e-5), alpha) / np.power(np.maximum(wmax, 1e-5), 1 - alpha)
        s = np.clip(s, 1e-5, 1e5).astype(np.float32)
        for t, w in zip(ts, weights):
            _replace(m, inits, shared, t.weight, w * s[:, None])
        for idx in LN_PARAMS[ln.op_type]:  # LayerNorm scale and bias
            name = ln.input[idx]
            _replace(m, inits, shared, name, numpy_helper.to_array(inits[name]) / s, node=ln, index=idx)
    return m


def _shared_initializers(model) -> set:
    seen, shared = set(), set()
    for n in model.graph.node:
        for i in n.input:
            (shared if i in seen else seen).add(i)
    return shared


def _replace(model, inits, shared, name, value, node=None, index=None) -> None:
    """Overwrite an initializer, or give `node` a private copy when other nodes read it too."""
    from onnx import numpy_helper

    if name in shared and node is not None:
        new = f"{name}_smooth_{node.name}"
        model.graph.initializer.append(numpy_helper.from_array(value.astype(np.float32), new))
        node.input[index] = new
        return
    inits[name].CopyFrom(numpy_helper.from_array(value.astype(np.float32), name))
