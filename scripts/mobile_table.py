"""ONNX Runtime's mobile usability analysis of the `ort-mobile` graphs, as the manifests record it.

    python scripts/mobile_table.py builtin:tiny random:ViT-B-32 random:MobileCLIP-S1

Exports each model to `--target ort-mobile` in FP32 and INT8 (default EPs, batch 1, full context)
into a temporary folder and prints, per graph and EP, supported nodes / nodes and partitions, with
the file sizes and the fidelity the export measured against the torch reference.
"""
from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import edgeclip


def main(models: list[str]) -> None:
    print("| model | precision | graph | NNAPI | Core ML (ML Program) | XNNPACK | MB | max abs vs torch |")
    print("|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for uri in models:
            model = edgeclip.load_model(uri, seed=0)
            for precision in ("fp32", "int8"):
                art = edgeclip.export(model, target="ort-mobile", precision=precision,
                                      out=Path(tmp) / f"{uri.replace(':', '_')}-{precision}")
                m = art.manifest
                for graph, report in m["ort-mobile"]["usability"].items():
                    cells = [f"{e['supported']}/{e['nodes']} ({e['share'] * 100:.1f} %), {e['partitions']} "
                             f"partition{'s' * (e['partitions'] != 1)}" for e in report.values()]
                    fid = m["fidelity"][f"{graph}_embeds"]["max_abs"]
                    size = m["sizes"][graph]["bytes"] / 1e6
                    print(f"| {uri} | {precision} | {graph} | " + " | ".join(cells) + f" | {size:.1f} | {fid:.2g} |")


if __name__ == "__main__":
    main(sys.argv[1:] or ["builtin:tiny", "random:ViT-B-32", "random:MobileCLIP-S1"])
