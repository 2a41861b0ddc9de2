#!/usr/bin/env python
"""Held-out top-1 of every head kind vs shots per class on the built-in digits (README table).

    python scripts/heads_table.py [--shots 1,4,16] [--seeds 0,1,2,3,4]

Shots come from `builtin.fewshot_dir()` (training split), accuracy from `builtin.heldout_dir()`
(360 images never used for training or fitting). Every fit is seeded; hyperparameters are chosen by
cross-validation over the shots only. Prints a Markdown table: seed 0, and the mean over the seeds.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO / "src") not in sys.path:
    sys.path.insert(0, str(REPO / "src"))

from edgeclip import heads as H  # noqa: E402
from edgeclip.builtin import digit_labels, fewshot_dir, heldout_dir, prompt_templates  # noqa: E402

KINDS = ("linear", "tip", "gda")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shots", default="1,4,16")
    ap.add_argument("--seeds", default="0,1,2,3,4")
    ap.add_argument("--augment", type=int, default=4)
    args = ap.parse_args(argv)
    shots = [int(s) for s in args.shots.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]
    labels = digit_labels()
    enc = H.encoder_for("builtin:tiny")
    zs = H.zero_shot_head(enc.text, labels, prompt_templates(), enc.scale)
    ev = H.encode_folder(enc.image, heldout_dir(), labels=labels, what="--eval")
    feats, truth = ev.feats[:, 0], ev.labels
    zs_top1 = H.top1(zs, feats, truth)
    acc = {(k, kind): [] for k in shots for kind in KINDS}
    for k in shots:
        for seed in seeds:
            data = H.encode_folder(enc.image, fewshot_dir(), labels=labels, shots=k, seed=seed, augment=args.augment)
            for kind in KINDS:
                acc[(k, kind)].append(H.top1(H.fit(kind, data, zs.arrays["text_weights"], enc.scale), feats, truth))
    print(f"held-out top-1 on {len(truth)} digits; zero-shot (no shots) {100 * zs_top1:.2f} %\n")
    print("| head | " + " | ".join(f"K = {k}" for k in shots) + " |")
    print("|---|" + "---|" * len(shots))
    print("| zero-shot | " + " | ".join(f"{100 * zs_top1:.2f}" for _ in shots) + " |")
    for kind in KINDS:
        cells = [f"{100 * acc[(k, kind)][0]:.2f} ({100 * np.mean(acc[(k, kind)]):.2f})" for k in shots]
        print(f"| {kind} | " + " | ".join(cells) + " |")
    print(f"\ncells: seed {seeds[0]} (mean over seeds {', '.join(map(str, seeds))})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
