"""`edgeclip` command line: models | export | run | inspect | verify | bench | heads."""
from __future__ import annotations

import argparse
import math
import os
import shlex
import sys
import time
from pathlib import Path

from . import __version__
from ._files import size_text as _mb
from .errors import EdgeClipError, UsageError


def _print_json(obj) -> None:
    from .runtime.manifest import dumps

    print(dumps(obj, fallback=str))  # never NaN/Infinity: JSON readers reject them


class _Parser(argparse.ArgumentParser):
    """Usage errors as UsageError, so `--json` reports them as JSON like any other error."""

    def error(self, message):
        raise UsageError(f"{self.prog}: {message} (see {self.prog} --help)")


def _bounded_int(lo: int, hi: int | None = None, what: str = "value"):
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{what} must be an integer, got {text!r}") from None
        if v < lo or (hi is not None and v > hi):
            raise argparse.ArgumentTypeError(f"{what} must be from {lo} to {hi}, got {v}" if hi is not None
                                             else f"{what} must be at least {lo}, got {v}")
        return v
    return parse


def _bounded_float(lo: float, hi: float, what: str, open_low: bool = False):
    def parse(text: str) -> float:
        try:
            v = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{what} must be a number, got {text!r}") from None
        if not math.isfinite(v) or v < lo or v > hi or (open_low and v == lo):
            raise argparse.ArgumentTypeError(f"{what} must be a finite number in {'(' if open_low else '['}{lo}, "
                                             f"{hi}], got {text}")
        return v
    return parse


def _threads(text: str) -> int:
    from .runtime.pipeline import check_threads

    try:
        return check_threads(_bounded_int(1, what="--threads")(text))
    except EdgeClipError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _labels(value: str | None, file: str | None = None, what: str = "--labels") -> list[str] | None:
    """`--labels a,b,c`, `--labels @FILE` or `--labels-file FILE` (one label per line) as a list."""
    from .heads.zero_shot import read_labels_file, split_labels

    if value is not None and file is not None:
        raise UsageError(f"pass {what} or {what}-file, not both")
    if file is not None:
        return read_labels_file(file)
    if value is None:
        return None
    return read_labels_file(value[1:]) if value.startswith("@") else split_labels(value)


def _step(msg: str, quiet: bool = False) -> float:
    if not quiet:
        print(f"• {msg}", file=sys.stderr, flush=True)
    return time.perf_counter()


# ------------------------------------------------------------------------------------------ models

def _tower_text(t, std: str) -> str:
    """"12x768" for the standard towers; other kinds by name ("mci1", ...)."""
    return f"{t.layers}x{t.width}" if t.kind == std else t.kind


def cmd_models(args) -> int:
    from .specs import get_spec, list_specs

    rows = []
    for name in list_specs():
        s = get_spec(name)
        rows.append({"name": s.name, "family": s.family, "image_size": s.vision.image_size,
                     "patch_size": s.vision.patch_size, "vision": _tower_text(s.vision, "vit"),
                     "text": _tower_text(s.text, "transformer"), "context": s.text.context_length,
                     "embed_dim": s.embed_dim, "act": s.vision.act, "tokenizer": s.tokenizer_config()["kind"],
                     "description": s.description})
    if args.json:
        _print_json(rows)
        return 0
    cols = ["name", "family", "image_size", "patch_size", "vision", "text", "context", "embed_dim", "act", "tokenizer"]
    widths = {c: max(len(c), *(len(str(r[c])) for r in rows)) for c in cols}
    print("  ".join(c.ljust(widths[c]) for c in cols))
    for r in rows:
        print("  ".join(str(r[c]).ljust(widths[c]) for c in cols))
    from .exporter import targets

    print(f"\nExport targets: {', '.join(targets())}")
    print("Load with: builtin:tiny (trained, shipped) | random:NAME | hf:DIR | openai:FILE | "
          "open_clip:NAME --checkpoint FILE | apple:NAME --checkpoint FILE (ml-mobileclip)")
    return 0


# ------------------------------------------------------------------------------------------ export

def cmd_export(args) -> int:
    import edgeclip

    from .exporter.artifact import check_out

    quiet = args.json
    check_out(args.out, args.overwrite)  # a bad --out or --target fails before the model loads
    _check_target(args.target)
    labels = _labels(args.labels, args.labels_file) or []
    t0 = _step(f"loading {args.model}", quiet)
    kw = {}
    if args.checkpoint:
        kw["checkpoint"] = args.checkpoint
    if args.spec:
        kw["spec"] = args.spec
    if args.model.startswith("random:"):
        kw["seed"] = args.seed
    model = edgeclip.load_model(args.model, **kw)
    t1 = _step(f"exporting {model.spec.name} -> {args.target} {args.precision or '(default precision)'} (loaded in {time.perf_counter() - t0:.1f} s)", quiet)
    art = edgeclip.export(
        model, target=args.target, precision=args.precision, out=args.out,
        labels=labels, templates=args.templates, heads=args.head or [], trim_text=not args.no_trim,
        pooled_only_last=not args.no_pooled_last, validate=not args.no_validate, overwrite=args.overwrite,
        fuse=not args.no_fuse, **_int8_options(args), **_coreml_options(args), **_tensorrt_options(args),
        **_mobile_options(args),
    )
    elapsed = time.perf_counter() - t1
    if args.json:
        _print_json({"path": str(art.path), "digest": art.digest, "seconds": elapsed, **_summary(art.manifest)})
        return 0
    print(f"\nwrote {art.path}  ({_mb(art.size_bytes())}, {elapsed:.1f} s)")
    print(f"digest {art.digest}  (pin it: Pipeline.load(dir, digest=...) or edgeclip run --digest)")
    _print_quantization(art.manifest)
    _print_fidelity(art.manifest)
    _print_heads(art.manifest)
    return 0


def _check_target(name: str) -> None:
    from .exporter import get_target

    try:
        get_target(name)
    except EdgeClipError as e:
        raise UsageError(f"--target: {e}") from None


def _print_heads(m: dict) -> None:
    for name, h in (m.get("heads") or {}).items():
        v = h.get("validation") or {}
        agree = f", INT8 top-1 agreement {h['int8_top1_agreement']:.4f}" if "int8_top1_agreement" in h else ""
        fit = (h.get("info") or {}).get("heldout")
        fitted = f", fitted: held-out top-1 {fit['top1']:.4f} (zero-shot {fit['zero_shot_top1']:.4f})" if fit else ""
        print(f"head {name}: {h['kind']}, {len(h['classes'])} classes -> {h['output']}"
              + (f" + {h['mcm_output']}" if h.get("mcm_output") else "")
              + (f", max abs {v['max_abs']:.2g} vs reference" if v else "") + agree + fitted)


def _coreml_options(args) -> dict:
    """Core ML flags, passed only when given (other targets reject them)."""
    kw = {"compress": args.compress, "min_ios": args.min_ios}
    return {k: v for k, v in kw.items() if v is not None}


def _tensorrt_options(args) -> dict:
    """TensorRT flags, passed only when given. `--profile batch=1,8,64` (repeatable)."""
    kw = {"trt_version": args.trt_version} if args.trt_version else {}
    if args.profile:
        prof = {}
        for item in args.profile:
            name, _, rng = item.partition("=")
            try:
                prof[name.strip()] = tuple(int(v) for v in rng.split(","))
            except ValueError:
                raise UsageError(f"--profile {item!r}: expected NAME=MIN,OPT,MAX (e.g. batch=1,8,64)") from None
        kw["profiles"] = prof
    return kw


def _int8_options(args) -> dict:
    """INT8 flags, passed only when given so that other precisions can reject them clearly."""
    kw = {"recipe": args.recipe, "calib": args.calib, "calib_captions": args.calib_captions}
    kw = {k: v for k, v in kw.items() if v is not None}
    if args.precision == "int8":
        kw.update(calib_size=args.calib_size, observer=args.observer, smoothquant_alpha=args.smoothquant_alpha)
        if args.max_cosine_drop is not None:
            kw["max_cosine_drop"] = args.max_cosine_drop
        if args.block_size is not None:
            kw["block_size"] = args.block_size
    return kw


def _summary(m: dict) -> dict:
    return {"model": m["model"]["name"], "target": m["target"], "precision": m["precision"],
            "files": {k: v["size"] for k, v in m["files"].items()}, "text_trim": m["text"]["trim"],
            "head": m.get("head"), "fidelity": m.get("fidelity"), "quantization": m.get("quantization"),
            "options": m.get("options")}


def _print_quantization(m: dict) -> None:
    q = m.get("quantization")
    if not q:
        return
    print(f"quantization: recipe {q['recipe']}, accuracy guard: cosine drop ≤ {q['max_cosine_drop']} "
          "on held-out calibration samples")
    for name, r in q["graphs"].items():
        data = r.get("data", {})
        held = f"{data.get('held_out', '?')} held-out of {data.get('source', '?')}"
        skipped = f", {data['skipped']} file(s) skipped (links, non-regular or unreadable)" if data.get("skipped") else ""
        floats = r["float_layers"]
        kept = f"; kept in float: {', '.join(floats)}" if floats else ""
        widths = sorted(b for b in (r.get("bits") or {}).values() if b < 32)
        if widths and widths[0] < 8:  # a 4-bit recipe: its layers by width
            n4 = widths.count(4)
            done = f"{len(widths)}/{r['quantizable_layers']} layers quantized ({n4} 4-bit, {len(widths) - n4} 8-bit)"
            narrowest = "all-4-bit"
        else:
            done, narrowest = f"{r['int8_layers']}/{r['quantizable_layers']} layers int8", "all-int8"
        print(f"  {name:<5} {done}, min cosine {r['min_cosine']:.5f} ({held}{skipped}); {narrowest} drop "
              f"{r['cosine_drop_all_int8']:.5f}{kept}")


def _print_fidelity(m: dict) -> None:
    fid = m.get("fidelity") or {}
    if not fid:
        return
    print("fidelity vs the float32 torch reference:")
    for name, r in fid.items():
        mark = "ok" if r["ok"] else "FAIL"
        print(f"  {name:<13} max abs {r['max_abs']:.2e} (≤ {r['max_abs_bound']:.1e})   "
              f"min cosine {r['min_cosine']:.6f} (≥ {r['min_cosine_bound']})   {mark}")


# ------------------------------------------------------------------------------------------ run

def cmd_run(args) -> int:
    from .runtime import Pipeline

    labels = _labels(args.labels, args.labels_file)
    p = Pipeline.load(args.artifact, backend=args.backend, threads=args.threads,
                      inference_precision=args.inference_precision, digest=args.digest,
                      providers=args.providers.split(",") if args.providers else None)
    result = {"artifact": str(args.artifact), "digest": p.digest, "images": []}
    if args.image:
        if labels is not None or p.head is not None or args.head or p.heads:
            preds = p.classify(list(args.image), labels=labels, head=args.head)
            for path, pred in zip(args.image, preds):
                result["images"].append({"image": path, **pred.to_dict(args.top_k)})
        else:
            emb = p.encode_image(list(args.image))
            for path, e in zip(args.image, emb):
                result["images"].append({"image": path, "embedding": [round(float(x), 6) for x in e]})
    if args.text:
        emb = p.encode_text(list(args.text), truncate=args.truncate)
        result["texts"] = [{"text": t, "embedding": [round(float(x), 6) for x in e]} for t, e in zip(args.text, emb)]
        if args.image:
            sims = p.encode_image(list(args.image)) @ emb.T
            result["similarity"] = [[round(float(x), 6) for x in row] for row in sims]
    if args.json:
        _print_json(result)
        return 0
    for r in result["images"]:
        if "label" in r:
            others = ", ".join(f"{t['label']} {t['score']:.3f}" for t in r["top"][1:])
            ood = "  ood: " + ", ".join(f"{k} {v:.3f}" for k, v in r["ood"].items()) if r.get("ood") else ""
            print(f"{r['image']}: {r['label']} ({r['score']:.3f})" + (f"   [{others}]" if others else "") + ood)
        else:
            print(f"{r['image']}: embedding[{len(r['embedding'])}] {r['embedding'][:4]}…")
    if "similarity" in result:
        for img, row in zip(args.image, result["similarity"]):
            print(f"{img}: " + ", ".join(f"{t!r} {s:.4f}" for t, s in zip(args.text, row)))
    elif args.text:
        for t in result["texts"]:
            print(f"{t['text']!r}: embedding[{len(t['embedding'])}] {t['embedding'][:4]}…")
    return 0


# ------------------------------------------------------------------------------------------ inspect

def cmd_inspect(args) -> int:
    from .runtime.manifest import load_manifest

    m, digest = load_manifest(args.artifact, verify=True, digest=args.digest)
    if args.json:
        _print_json({"digest": digest, **m})
        return 0
    s = m["model"]["spec"]
    print(f"artifact   {args.artifact}   (format v{m['format_version']}, created {m.get('created')}, checksums ok)")
    print(f"digest     {digest}")
    print(f"model      {m['model']['name']} ({m['model']['family']}), embed {m['model']['embed_dim']}, "
          f"image {s['vision']['image_size']} px"
          + (f" / patch {s['vision']['patch_size']}" if s["vision"].get("patch_size") else "")
          + f" ({s['vision'].get('kind', 'vit')}), "
          f"text context {s['text']['context_length']}")
    print(f"target     {m['target']} {m['precision']}  (backend {m.get('backend')})")
    for name, g in m["graphs"].items():
        ins = ", ".join(f"{k}{v['shape']}" for k, v in g["inputs"].items())
        outs = ", ".join(f"{k}{v['shape']}" for k, v in g["outputs"].items())
        print(f"graph      {name}: {g['file']}  {ins} -> {outs}")
    print(f"text       trim after end token: {m['text']['trim']}; pooled-only last block: "
          f"{m.get('options', {}).get('pooled_only_last')}")
    if m.get("head"):
        h = m["head"]
        print(f"head       zero-shot, {len(h['labels'])} labels ({', '.join(h['labels'][:8])}"
              f"{'…' if len(h['labels']) > 8 else ''}), {len(h['templates'])} templates, {h['activation']}")
    print(f"tokenizer  {m['tokenizer']['kind']} ({m['tokenizer'].get('file')})")
    for line in _target_lines(m):
        print(line)
    total = sum(v["size"] for v in m["files"].values())
    print(f"files      {len(m['files'])}, {_mb(total)}: " + ", ".join(f"{k} {_mb(v['size'])}" for k, v in m["files"].items()))
    for line in size_lines(m):
        print(line)
    _print_quantization(m)
    _print_fidelity(m)
    _print_heads(m)
    tools = m.get("tools", {})
    print("tools      " + ", ".join(f"{k} {v}" for k, v in tools.items()))
    return 0


def cmd_verify(args) -> int:
    """Checksums, then the conformance vectors: tokenizer, preprocessing and every graph output against
    the file; exit 2 with the first differing check named (a ConformanceError)."""
    from .runtime.conformance import open_artifact, verify_vectors

    pipe, note = open_artifact(args.artifact, backend=args.backend, digest=args.digest)
    report = verify_vectors(pipe, args.vectors or None, run_graphs=note is None or "replayed" in note)
    report["note"] = note
    if args.json:
        _print_json({"artifact": str(args.artifact), **report})
        return 0
    print(f"artifact   {args.artifact}   checksums ok")
    print(f"vectors    {args.vectors or (pipe.manifest.get('conformance') or {}).get('file')}: expected from "
          f"{report['expected_from']}")
    for name, r in report["checks"].items():
        if "max_abs" in r:
            cos = f", min cosine {r['min_cosine']:.6f}" if r.get("min_cosine_bound", -1) > -1 else ""
            print(f"  ok  {name:<14} max abs error {r['max_abs']:.3g} (bound {r['max_abs_bound']:.3g}){cos}")
        else:
            print(f"  ok  {name:<14} identical")
    if note:
        print(f"  --  {note}")
    return 0


def size_lines(m: dict) -> list[str]:
    """`edgeclip inspect`'s size lines: bytes and bits per weight per tower, and the quantized layers by width."""
    sizes = m.get("sizes") or {}
    lines = []
    if sizes:
        lines.append("size       " + "; ".join(
            f"{g} {_mb(s['bytes'])}, {s['weights'] / 1e6:.2f} M weights"
            + (f", {s['bits_per_weight']:.2f} bits/weight" if s.get("bits_per_weight") else "")
            for g, s in sizes.items()))
    for g, r in ((m.get("quantization") or {}).get("graphs") or {}).items():
        bits = r.get("bits") or {}
        if bits:
            count: dict = {}
            for b in bits.values():
                count[b] = count.get(b, 0) + 1
            lines.append(f"bits       {g}: " + ", ".join(f"{n} layer{'s' * (n != 1)} {'float' if b >= 32 else f'{b}-bit'}"
                                                   for b, n in sorted(count.items())))
    return lines


def _target_lines(m: dict) -> list[str]:
    """The lines of the artifact's target (its own manifest sections); none for a target not installed."""
    from .exporter import get_target

    try:
        return type(get_target(m["target"])).inspect_lines(m)
    except EdgeClipError:
        return []


# ------------------------------------------------------------------------------------------ bench

def cmd_bench(args) -> int:
    if args.report or args.baselines or args.eval or args.model:
        return _full_bench(args)
    from .bench.quick import quick_bench

    rows = [quick_bench(a, batch=b, threads=t, seconds=args.seconds, inference_precision=args.inference_precision)
            for a in args.artifacts for t in args.threads for b in args.batch]
    if args.json:
        _print_json(rows)
        return 0
    print(f"{'artifact':<28} {'graph':<6} {'batch':>5} {'p50 ms':>8} {'p90 ms':>8} {'p99 ms':>8} {'items/s':>9} "
          f"{'size':>9} {'graph':>9} {'bits/w':>6}  ran as")
    for r in rows:
        for g in r["graphs"]:
            s = r["sizes"].get(g["graph"]) or {}  # this graph's bytes and bits per weight (bench/sizes.py)
            bits = f"{s['bits_per_weight']:.1f}" if s.get("bits_per_weight") else "–"
            print(f"{Path(r['artifact']).name[:28]:<28} {g['graph']:<6} {r['batch']:>5} {g['p50_ms']:>8.2f} "
                  f"{g['p90_ms']:>8.2f} {g['p99_ms']:>8.2f} {g['items_per_s']:>9.1f} {_mb(r['size_bytes']):>9} "
                  f"{_mb(s['bytes']) if s else '–':>9} {bits:>6}  {r['backend']} {g['inference_precision']}")
    return 0


def _full_bench(args) -> int:
    """Interleaved latency, load time, memory, size and fidelity (+ baselines); JSON/Markdown/HTML reports."""
    from .bench.report import markdown, write_reports
    from .bench.runner import BenchConfig, run_bench

    cfg = BenchConfig(artifacts=args.artifacts, batches=args.batch, threads=args.threads, seconds=args.seconds,
                      eval_dir=args.eval, labels=_labels(args.labels), templates=args.templates, eval_limit=args.eval_limit,
                      baselines=args.baselines, model=args.model, calib=args.calib, cache=args.baseline_cache,
                      report=args.report, inference_precision=args.inference_precision, memory=not args.no_memory,
                      progress=not args.quiet,
                      command="edgeclip " + " ".join(shlex.quote(str(a)) for a in args.argv))
    report = run_bench(cfg)
    paths = write_reports(report, args.report) if args.report else {}
    if args.json:
        _print_json(report)
        return 0
    text = markdown(report)
    print(text.split("\n## Latency")[0].rstrip() if paths else text)
    for fmt, path in paths.items():
        print(f"wrote {path}")
    return 0


def _int_list(text: str, hi: int = 4096) -> list:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got '{text}'") from None
    if not values or min(values) < 1 or max(values) > hi or len(values) > 64:
        raise argparse.ArgumentTypeError(f"expected up to 64 integers from 1 to {hi}, got '{text}'")
    return values


def _thread_list(text: str) -> list:
    return [_threads(str(t)) for t in _int_list(text, hi=1 << 20)]


# ------------------------------------------------------------------------------------------ heads

def cmd_heads_fit(args) -> int:
    from . import heads as H
    from .heads.fit import kind_name

    kind = kind_name(args.kind)
    quiet = args.json
    _step(f"loading {args.model}", quiet)
    enc = H.encoder_for(args.model)
    templates = args.templates or enc.templates or list(H.DEFAULT_TEMPLATES)
    data = None
    if args.train:
        t = _step(f"encoding {args.shots or 'all'} shot(s) per class from {args.train}"
                  + (f" (+{args.augment} shifted views each)" if args.augment else ""), quiet)
        data = H.encode_folder(enc.image, args.train, labels=_labels(args.labels), shots=args.shots, seed=args.seed,
                               augment=args.augment)
        classes = data.classes
        _step(f"encoded {len(data.labels)} images in {time.perf_counter() - t:.1f} s", quiet)
    elif kind != "zero_shot":
        raise EdgeClipError(f"fitting a {kind} head needs --train DIR (one sub-folder of images per class)")
    else:
        from .heads.zero_shot import parse_labels

        classes = parse_labels(_labels(args.labels))
    zs = H.zero_shot_head(enc.text, classes, templates, enc.scale, enc.bias, enc.activation == "sigmoid",
                          name=args.name or "zero_shot", info={"model": enc.source or enc.name})
    if kind == "zero_shot":
        head = zs
    else:
        t = _step(f"fitting a {kind} head", quiet)
        head = H.fit(kind, data, zs.arrays["text_weights"], enc.scale, name=args.name)
        head.info.update({"model": enc.source or enc.name, "templates": templates,
                          "fit_seconds": round(time.perf_counter() - t, 2)})
    evaluation = None
    if args.eval:
        ev = H.encode_folder(enc.image, args.eval, labels=_labels(args.eval_labels) or classes, what="--eval")
        feats = ev.feats[:, 0]
        evaluation = {"folder": str(args.eval), "images": int(len(ev.labels)),
                      "top1": H.top1(head, feats, ev.labels), "zero_shot_top1": H.top1(zs, feats, ev.labels)}
        head.info["heldout"] = evaluation
    path = head.save(args.out)
    summary = {"head": str(path), "name": head.name, "kind": head.kind, "classes": len(head.classes),
               "shots": args.shots if args.train else None, "fit": head.info.get("fit"), "heldout": evaluation}
    if args.json:
        _print_json(summary)
        return 0
    print(f"wrote {path}: {head.kind} head '{head.name}', {len(head.classes)} classes")
    if head.info.get("fit"):
        print(f"  hyperparameters: {head.info['fit']['selected']} ({head.info['fit']['by']})")
    if evaluation:
        print(f"  held-out top-1 on {evaluation['images']} images: {evaluation['top1']:.4f} "
              f"(zero-shot {evaluation['zero_shot_top1']:.4f})")
    return 0


def cmd_heads_import(args) -> int:
    from . import heads as H
    from .heads.importers import import_head, zero_shot_weights
    from .heads.zero_shot import parse_labels

    classes = parse_labels(_labels(args.classes, what="--classes")) if args.classes else None
    text, scale, dim, model = None, None, None, ""
    if args.model:
        enc = H.encoder_for(args.model)
        dim, scale, model = enc.embed_dim, enc.scale, enc.name
        if classes:
            text = zero_shot_weights(enc, classes, args.templates)
    params = {k: v for k, v in (("ratio", args.ratio), ("alpha", args.alpha), ("beta", args.beta),
                                ("normalize", None if args.normalize is None else float(args.normalize == "yes")))
              if v is not None}
    head = import_head(args.src, kind=args.kind, classes=classes, embed_dim=dim, text_weights=text, scale=scale,
                       name=args.name, params=params, model=model)
    path = head.save(args.out)
    if args.json:
        _print_json({"head": str(path), **head.manifest()})
        return 0
    print(f"wrote {path}: {head.kind} head '{head.name}', {len(head.classes)} classes, "
          + ", ".join(f"{k} {tuple(a.shape)}" for k, a in head.arrays.items()))
    return 0


def cmd_heads_show(args) -> int:
    from .heads.base import head_file, load_head

    head = load_head(head_file(args.head))  # `heads show tip` finds the tip.npz that `--out tip` wrote
    info = head.manifest()
    if args.json:
        _print_json(info)
        return 0
    print(f"{head.name}: {head.kind} head, {len(head.classes)} classes, embedding width {head.embed_dim}")
    print("  classes: " + ", ".join(head.classes[:12]) + (" …" if len(head.classes) > 12 else ""))
    print("  arrays:  " + ", ".join(f"{k} {tuple(v)}" for k, v in info["shapes"].items()))
    print("  params:  " + ", ".join(f"{k}={v:g}" for k, v in head.params.items()))
    ho = head.info.get("heldout")
    if ho:
        print(f"  held-out top-1 {ho['top1']:.4f} (zero-shot {ho['zero_shot_top1']:.4f}) on {ho['images']} images")
    return 0


# ------------------------------------------------------------------------------------------ parser
# One builder per subcommand: each reads top to bottom as that command's --help does.

_OV_PRECISION = "OpenVINO: force this precision (default: the device's; bf16 on CPUs with bf16)"
_SEED = _bounded_int(0, 2**32 - 1, "--seed")


def build_parser() -> argparse.ArgumentParser:
    ap = _Parser(prog="edgeclip", description="Export, run and benchmark CLIP-family models on edge runtimes.")
    ap.add_argument("--version", action="version", version=f"edgeclip {__version__}")
    sub = ap.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for add in (_add_models, _add_export, _add_run, _add_inspect, _add_verify, _add_bench, _add_heads, _add_engine):
        add(sub)
    return ap


def _add_models(sub) -> None:
    p = sub.add_parser("models", help="list the model specs edgeclip knows")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_models)


def _add_export(sub) -> None:
    p = sub.add_parser("export", help="export a model to a verified artifact folder")
    p.add_argument("model", help="builtin:tiny | random:SPEC | hf:DIR | openai:FILE | open_clip:ARCH | apple:ARCH")
    p.add_argument("--target", default="onnx",
                   help="export target (default onnx; `edgeclip models` lists the registered ones)")
    p.add_argument("--precision", help="fp32 | fp16 | int8 (per target; default fp32, fp16 for coreml)")
    p.add_argument("--out", required=True, help="artifact folder to write")
    p.add_argument("--labels", help="bake a zero-shot head: comma-separated labels, or @FILE (one label per line)")
    p.add_argument("--labels-file", metavar="FILE", help="labels to bake, one per line")
    p.add_argument("--templates", nargs="+", help="prompt templates with {} for the label")
    p.add_argument("--head", action="append", metavar="[NAME=]FILE",
                   help="append an adapter head (.npz from `edgeclip heads fit/import`) to the image graph; "
                        "repeat for several; NAME= renames it")
    p.add_argument("--checkpoint", help="checkpoint file for open_clip:ARCH or apple:ARCH")
    p.add_argument("--spec", help="spec name or .json to use instead of the inferred one")
    p.add_argument("--seed", type=_SEED, default=0, help="seed for random:SPEC")
    p.add_argument("--no-trim", action="store_true", help="feed text padded to the full context")
    p.add_argument("--no-pooled-last", action="store_true", help="compute every token in the last block")
    p.add_argument("--no-validate", action="store_true", help="keep the artifact even outside tolerance")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--no-fuse", action="store_true", help="keep attention unfused (for comparisons)")
    _add_coreml_group(p)
    _add_tensorrt_group(p)
    _add_mobile_group(p)
    _add_int8_group(p)
    p.add_argument("--json", action="store_true")  # after the groups: --help lists it last
    p.set_defaults(func=cmd_export)


def _add_coreml_group(p) -> None:
    c = p.add_argument_group("Core ML (--target coreml)")
    c.add_argument("--min-ios", type=int, choices=[16, 17, 18],
                   help="deployment target (default 18: fused attention; 16/17: Neural Engine layout)")
    c.add_argument("--compress", choices=["w8", "palettize6", "palettize4", "int4-blockwise"],
                   help="weight compression of the fp16 model; int4-blockwise needs iOS 18")


def _add_tensorrt_group(p) -> None:
    t = p.add_argument_group("TensorRT (--target tensorrt)")
    t.add_argument("--trt-version", help="TensorRT version the graphs are made for (default 10.3: JetPack 6)")
    t.add_argument("--profile", action="append", metavar="NAME=MIN,OPT,MAX",
                   help="optimization profile: batch=1,8,64 (default) or length=1,77,77 (text tokens); repeatable")


def _add_mobile_group(p) -> None:
    m = p.add_argument_group("Phones (--target ort-mobile)")
    m.add_argument("--mobile-shapes", metavar="BATCH[xLENGTH]",
                   help="the graphs' fixed shapes (default 1: batch 1, the full text context; 1x16: texts up to "
                        "16 tokens, causal end-token towers only)")
    m.add_argument("--mobile-ep", metavar="EPS",
                   help="execution providers the graphs are made and checked for: a comma-separated subset of "
                        "nnapi, coreml, xnnpack (default all three), or cpu alone (ONNX Runtime's CPU EP: its "
                        "fused kernels, with the fixed shapes)")


def _mobile_options(args) -> dict:
    """Phone flags, passed only when given (other targets reject them)."""
    kw = {"mobile_shapes": args.mobile_shapes, "mobile_eps": args.mobile_ep}
    return {k: v for k, v in kw.items() if v is not None}


def _add_int8_group(p) -> None:
    from .calibration.recipes import RECIPES, recipes_help

    g = p.add_argument_group("INT8 (--precision int8)")
    g.add_argument("--recipe", choices=list(RECIPES),
                   help="quantization recipe (default int8). " + recipes_help().replace("%", "%%"))
    g.add_argument("--block-size", type=int, metavar="N",
                   help="4-bit recipes (w4a16, w4a8): input rows per weight scale, a power of two (default 32; "
                        "larger is smaller and less accurate)")
    g.add_argument("--calib", help="folder of calibration images (recursive; jpg/png/webp/bmp); "
                                   "builtin:tiny ships its own")
    g.add_argument("--calib-captions", help="captions for the text tower: .txt (one per line) or .jsonl")
    g.add_argument("--calib-size", type=_bounded_int(1, 1_000_000, "--calib-size"), default=256,
                   help="at most this many images and captions (seeded sample)")
    g.add_argument("--observer", default="minmax", choices=["minmax", "percentile", "entropy", "mse"],
                   help="activation range estimation for static recipes")
    g.add_argument("--smoothquant-alpha", type=_bounded_float(0.0, 1.0, "--smoothquant-alpha"), default=0.5,
                   help="migration strength for int8-smoothquant")
    g.add_argument("--max-cosine-drop", type=_bounded_float(0.0, 1.0, "--max-cosine-drop"),
                   help="accuracy guard: most allowed 1 - cosine to FP32 on held-out calibration samples; "
                        "layers go back to float (4-bit recipes: to int8, then float) until it holds "
                        "(default 0.005; 0.01 for w4a16)")


def _add_run(sub) -> None:
    p = sub.add_parser("run", help="embed or classify images/texts with an artifact")
    p.add_argument("artifact")
    p.add_argument("--image", nargs="+", help="image files")
    p.add_argument("--text", nargs="+", help="texts to embed (and compare with the images)")
    p.add_argument("--labels", help="labels for zero-shot classification: a,b,c or @FILE (default: the baked head)")
    p.add_argument("--labels-file", metavar="FILE", help="labels for zero-shot classification, one per line")
    p.add_argument("--digest", help="refuse the artifact unless its digest is this one (sha256:…, as inspect prints)")
    p.add_argument("--head", help="classify with this adapter head of the artifact (edgeclip inspect lists them)")
    p.add_argument("--top-k", type=_bounded_int(1, 100_000, "--top-k"), default=5)
    p.add_argument("--truncate", action="store_true", help="truncate over-long texts instead of failing")
    p.add_argument("--backend", default="auto")
    p.add_argument("--threads", type=_threads, help="inference threads (default: the backend's)")
    p.add_argument("--inference-precision", choices=["f32", "bf16", "f16"], help=_OV_PRECISION)
    p.add_argument("--providers", help="ort backend: ONNX Runtime execution providers in order, e.g. "
                                       "TensorrtExecutionProvider,CUDAExecutionProvider,CPUExecutionProvider")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_run)


def _add_inspect(sub) -> None:
    p = sub.add_parser("inspect", help="show an artifact's manifest and digest (checksums verified)")
    p.add_argument("artifact")
    p.add_argument("--digest", help="also check that the artifact's digest is this one")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_inspect)


def _add_verify(sub) -> None:
    p = sub.add_parser("verify", help="check an artifact's checksums and replay its conformance vectors")
    p.add_argument("artifact")
    p.add_argument("--vectors", nargs="?", const="", metavar="FILE",
                   help="the conformance vectors to replay (default: the artifact's own conformance.npz)")
    p.add_argument("--backend", default="auto", help="runtime backend to replay them through (default: the target's)")
    p.add_argument("--digest", help="also check that the artifact's digest is this one")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_verify)


def _add_bench(sub) -> None:
    p = sub.add_parser("bench", help="latency, memory and fidelity of artifacts, vs the usual alternatives",
                       description="Without --report/--baselines/--eval/--model: a quick latency table. With "
                                   "them: every variant timed interleaved in one run, plus load time, peak "
                                   "memory, size and fidelity to the FP32 reference; reports in JSON, Markdown "
                                   "and HTML.")
    p.add_argument("artifacts", nargs="+")
    p.add_argument("--batch", type=_int_list, default=[1], help="batch sizes, e.g. 1,8")
    p.add_argument("--threads", type=_thread_list, default=[None], help="thread counts, e.g. 1,2 (default: the backend's)")
    p.add_argument("--seconds", type=_bounded_float(0.0, 3600.0, "--seconds", open_low=True), default=2.0,
                   help="time budget per graph and batch (and per variant, in the interleaved rounds)")
    p.add_argument("--inference-precision", choices=["f32", "bf16", "f16"], help=_OV_PRECISION)
    p.add_argument("--report", metavar="FILE", help="write FILE.json, FILE.md and FILE.html")
    p.add_argument("--baselines", action="store_true",
                   help="also build and time what a user would otherwise ship from the same model: plain "
                        "torch.onnx.export on ONNX Runtime (FP32, quantize_dynamic INT8), OpenVINO + NNCF defaults")
    p.add_argument("--eval", metavar="DIR", help="labelled images, one sub-folder per class: zero-shot accuracy")
    p.add_argument("--labels", help="class names of --eval's sub-folders in folder order (a,b,c or @FILE; "
                                    "default: the folder names)")
    p.add_argument("--templates", nargs="+", help="prompt templates with {} for the class (default: the model's)")
    p.add_argument("--eval-limit", type=_bounded_int(1, 10_000_000, "--eval-limit"), default=1000,
                   help="at most this many --eval images (seeded sample)")
    p.add_argument("--model", help="model URI for the FP32 reference and baselines (default: the manifest's source)")
    p.add_argument("--calib", metavar="DIR", help="calibration images for the NNCF baseline (built-in model: its own)")
    p.add_argument("--baseline-cache", metavar="DIR", help="where baselines are built once (default: beside the "
                                                            "report, or the temp folder)")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    p.add_argument("--quiet", action="store_true", help="no progress on stderr")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_bench)


def _add_engine(sub) -> None:
    ep = sub.add_parser("engine", help="TensorRT engines of a tensorrt artifact (run on the device)")
    esub = ep.add_subparsers(dest="engine_command", required=True)
    p = esub.add_parser("build", help="build (or find cached) the engine of every graph on this GPU")
    p.add_argument("artifact")
    p.add_argument("--workspace-mb", type=_bounded_int(64, 1 << 20, "--workspace-mb"), default=1024)
    p.add_argument("--rebuild", action="store_true", help="ignore cached plans")
    p.add_argument("--device", type=_bounded_int(0, 64, "--device"), default=0, help="CUDA device index")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_engine_build)


def cmd_engine_build(args) -> int:
    from .runtime.backends.tensorrt import build_engine

    plans = build_engine(args.artifact, workspace_mb=args.workspace_mb, rebuild=args.rebuild, device=args.device,
                         log=None if args.json else print)
    if args.json:
        _print_json({"artifact": str(args.artifact), "plans": [str(p) for p in plans]})
    return 0


def _add_heads(sub) -> None:
    hp = sub.add_parser("heads", help="fit, import and show adapter heads (export them with export --head)")
    hsub = hp.add_subparsers(dest="heads_command", required=True)
    _add_heads_fit(hsub)
    _add_heads_import(hsub)
    p = hsub.add_parser("show", help="describe a head file")
    p.add_argument("head")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_heads_show)


def _add_heads_fit(hsub) -> None:
    p = hsub.add_parser("fit", help="fit a head on a few labelled images per class (seeded, deterministic)")
    p.add_argument("model", help="model URI (builtin:tiny, hf:DIR, ...) or an exported artifact folder")
    p.add_argument("--kind", required=True, help="linear | tip | gda | zero_shot")
    p.add_argument("--train", help="labelled images, one sub-folder per class (not needed for zero_shot)")
    p.add_argument("--shots", type=_bounded_int(1, 100_000, "--shots"),
                   help="images per class, a seeded sample (default: all)")
    p.add_argument("--seed", type=_SEED, default=0)
    p.add_argument("--augment", type=_bounded_int(0, 8, "--augment"), default=4,
                   help="shifted views added per shot (0-8, default 4)")
    p.add_argument("--labels", help="class names of the sub-folders in folder order (default: folder names); "
                                    "for zero_shot without --train: the classes")
    p.add_argument("--templates", nargs="+", help="prompt templates with {} (default: the model's)")
    p.add_argument("--eval", metavar="DIR", help="held-out labelled folder: report top-1 beside zero-shot")
    p.add_argument("--eval-labels", help="class names of --eval's sub-folders (default: the head's classes)")
    p.add_argument("--name", help="head name (default: the kind; names the artifact output)")
    p.add_argument("--out", required=True, help="head file to write (.npz)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_heads_fit)


def _add_heads_import(hsub) -> None:
    p = hsub.add_parser("import", help="import a trained head: nn.Linear, CLIP-Adapter, Tip-Adapter cache, sklearn .npz")
    p.add_argument("src", help=".pt/.pth/.bin (torch.save), .npz or .safetensors")
    p.add_argument("--kind", choices=["linear", "residual_adapter", "tip_adapter"],
                   help="layout (default: recognised from the tensor names)")
    p.add_argument("--classes", help="class names in the head's output order (a,b,c or @FILE, one per line)")
    p.add_argument("--model", help="model URI or artifact: checks the width, computes zero-shot class embeddings")
    p.add_argument("--templates", nargs="+", help="prompt templates for the zero-shot class embeddings")
    p.add_argument("--ratio", type=float, help="residual adapter blend ratio (CLIP-Adapter default 0.2)")
    p.add_argument("--alpha", type=float, help="Tip-Adapter cache weight (default 1)")
    p.add_argument("--beta", type=float, help="Tip-Adapter sharpness (default 5.5)")
    p.add_argument("--normalize", choices=["yes", "no"],
                   help="whether the head takes L2-normalized features (linear default yes; adapter no)")
    p.add_argument("--name", help="head name")
    p.add_argument("--out", required=True, help="head file to write (.npz)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_heads_import)


# ------------------------------------------------------------------------------------------ main


def _report_error(e: BaseException, as_json: bool) -> None:
    if as_json:  # scripts read stdout: the error is a JSON object there too
        _print_json({"error": {"type": type(e).__name__, "message": str(e)}})
    else:
        print(f"error: {e}", file=sys.stderr)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    as_json = "--json" in argv
    try:
        try:
            args = build_parser().parse_args(argv)
            args.argv = argv  # reports quote the command that made them
            if getattr(args, "command", None) == "run" and not (args.image or args.text):
                raise UsageError("run needs --image and/or --text")
            return args.func(args)
        except EdgeClipError as e:
            _report_error(e, as_json)
            return 2
        except KeyboardInterrupt:
            return 130
        except Exception as e:  # a bug of ours: JSON readers still get JSON, others the traceback
            if not as_json:
                raise
            _report_error(e, True)
            return 1
    except BrokenPipeError:  # `edgeclip inspect art | head -1`: the reader left; not an error of ours
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
