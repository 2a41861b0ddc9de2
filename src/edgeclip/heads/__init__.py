"""Adapter heads as data: zero-shot prompt ensembles, linear probes, residual adapters (CLIP-Adapter),
Tip-Adapter caches and GDA. Fit them on CPU (`heads.fit`), import trained ones (`heads.importers`),
save/load them as .npz (numpy only), and export them inside an artifact's image graph.

    from edgeclip import heads
    enc = heads.encoder_for("builtin:tiny")
    data = heads.encode_folder(enc.image, "train/", shots=16, augment=4)
    head = heads.fit("tip", data, zs.arrays["text_weights"], enc.scale)
    head.save("tip.npz")

Labels are lists of strings (`parse_labels`); files and the CLI's comma form are read explicitly
(`read_labels_file`, `split_labels`). Head files are untrusted: `load_head` checks every field.
"""
from .base import KINDS, Head, HeadKind, get_kind, load_head, register_kind  # noqa: F401
from .fit import FIT_KINDS, Encoder, FitData, encode_folder, encoder_for, fit, top1  # noqa: F401
from .zero_shot import (DEFAULT_TEMPLATES, check_templates, class_embeddings, parse_labels,  # noqa: F401
                        read_labels_file, resolve_templates, split_labels, zero_shot_head)
from . import kinds as _kinds  # noqa: F401,E402  (registers the built-in kinds)
