"""Reports from a bench result: JSON (the data), Markdown and a self-contained HTML page.

Markdown and HTML are rendered from the JSON dict alone, so either can be regenerated from a saved
report: `write_reports(json.load(open("report.json")), "report")`.
"""
from __future__ import annotations

import json
from pathlib import Path

FORMATS = ("json", "md", "html")
BITS = "bits/weight (image / text)"


def report_paths(path) -> dict[str, Path]:
    """`out/report`, `out/report.md` ... -> {json: out/report.json, md: out/report.md, html: out/report.html}."""
    p = Path(path)
    if p.suffix.lower() in (".json", ".md", ".html", ".htm"):
        p = p.with_suffix("")
    return {fmt: p.with_name(p.name + "." + fmt) for fmt in FORMATS}


def write_reports(report: dict, path) -> dict[str, Path]:
    from .html import html

    paths = report_paths(path)
    paths["json"].parent.mkdir(parents=True, exist_ok=True)
    paths["json"].write_text(json.dumps(report, indent=2, default=str) + "\n", encoding="utf-8")
    paths["md"].write_text(markdown(report), encoding="utf-8")
    paths["html"].write_text(html(report), encoding="utf-8")
    return paths


# ------------------------------------------------------------------------------------ shared cells

def mb(n) -> str:
    if n is None:
        return "–"
    return f"{n / 1e6:.1f} MB" if n >= 1e5 else f"{n / 1e3:.1f} kB"


def mb_num(n) -> str:
    """Bytes as a bare number of MB (the unit is in the column's name)."""
    if n is None:
        return "–"
    x = n / 1e6
    return f"{x:.0f}" if x >= 1000 else f"{x:.3g}"


def bits(row: dict) -> str:
    """Bits per weight, image / text ("–" where the weights are not known)."""
    if row["image_bits"] is None and row["text_bits"] is None:
        return "–"
    return f"{num(row['image_bits'], '.1f')} / {num(row['text_bits'], '.1f')}"


def num(v, fmt: str = ".3g", none: str = "–") -> str:
    return none if v is None else format(v, fmt)


def ran_as(v: dict) -> str:
    """Backend and the inference precision each graph actually ran in."""
    precs = {p for p in v["inference_precision"].values() if p}
    prec = "/".join(sorted(precs)) if precs else "?"
    return f"{v['backend']} {prec}"


def headline(report: dict) -> dict:
    """The first batch and thread setting: the configuration the summary table and plots show."""
    s = report["settings"]
    return {"batch": s["batches"][0], "threads": s["threads"][0]}


def config(report: dict, graph: str, batch, threads) -> dict | None:
    return next((c for c in report["latency"] if c["graph"] == graph and c["batch"] == batch
                 and c["threads"] == threads), None)


def summary_rows(report: dict) -> list[dict]:
    h = headline(report)
    image, text = (config(report, g, h["batch"], h["threads"]) for g in ("image", "text"))
    rows = []
    for v in report["variants"]:
        f, m, sizes = v["fidelity"], v["memory"], v.get("sizes") or {}  # (reports saved before sizes: none)
        peak, base = m.get("peak_rss_bytes"), m.get("base_rss_bytes")
        row = {"name": v["name"], "kind": v["kind"], "ran_as": ran_as(v), "precision": v["precision"],
               "size": v["size_bytes"], "load_s": v["load_s"], "peak_rss": peak,
               "added_rss": peak - base if peak and base else None,
               "image_cos": (f.get("image_cosine") or {}).get("mean"),
               "image_cos_min": (f.get("image_cosine") or {}).get("min"),
               "text_cos": (f.get("text_cosine") or {}).get("mean"), "agree": f.get("top1_agreement"),
               "acc": f.get("zero_shot_top1")}
        for g in ("image", "text"):
            row[f"{g}_bytes"] = (sizes.get(g) or {}).get("bytes")
            row[f"{g}_bits"] = (sizes.get(g) or {}).get("bits_per_weight")
        row["graph_bytes"] = (row["image_bytes"] + row["text_bytes"]
                              if row["image_bytes"] is not None and row["text_bytes"] is not None else None)
        for g, c in (("image", image), ("text", text)):
            r = (c or {}).get("results", {}).get(v["name"])
            row[f"{g}_p50"] = r["p50_ms"] if r else None
            row[f"{g}_ratio"] = c["ratio_vs_base"].get(v["name"]) if r else None
        rows.append(row)
    return rows


def size_note(v: dict) -> str:
    """'; image 0.764 MB, 0.17 M weights, 36.41 bits/weight; text ...' for the variants list."""
    out = ""
    for g, s in (v.get("sizes") or {}).items():
        out += f"; {g} {mb_num(s['bytes'])} MB"
        if s.get("weights"):
            out += f", {s['weights'] / 1e6:.2f} M weights"
        if s.get("bits_per_weight"):
            out += f", {s['bits_per_weight']:.2f} bits/weight"
    return out


def threads_name(t) -> str:
    return "default" if t is None else str(t)


# ---------------------------------------------------------------------------------------- markdown

def _table(head: list[str], rows: list[list[str]]) -> str:
    out = ["| " + " | ".join(head) + " |", "|" + "|".join("---" if i == 0 else "---:" for i in range(len(head))) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(out)


def _pct(v) -> str:
    return "–" if v is None else f"{100 * v:.1f} %"


def _cos(v) -> str:
    return "–" if v is None else f"{v:.5f}"


def markdown(report: dict) -> str:
    m, h = report["machine"], headline(report)
    cpu = m["cpu"]
    libs = ", ".join(f"{k} {v}" for k, v in m["libraries"].items())
    ref = report["reference"]
    lines = [
        "# edgeclip bench report", "",
        f"`{report['command']}`", "",
        f"Measured {m['measured']} on **{cpu['model']}** ({m['cores']} cores, {m['cores_usable']} usable; "
        f"CPU flags: {' '.join(cpu['speed_flags']) or 'none of note'}; load average {m.get('loadavg_1m', '?')}). "
        f"{libs}.", "",
        f"**Ratios come from interleaved runs**: every variant was timed in the same run, taking turns round by "
        f"round; each ratio is the median over rounds of the per-round time ratio to `{report['base']}` "
        "(< 1 = faster).", "",
        f"## Summary (batch {h['batch']}, threads {threads_name(h['threads'])})", "",
    ]
    rows = []
    for r in summary_rows(report):
        rows.append([f"`{r['name']}`", r["kind"], r["ran_as"], mb(r["size"]), mb_num(r["image_bytes"]),
                     mb_num(r["text_bytes"]), bits(r), num(r["load_s"], ".2f") + " s",
                     f"{mb(r['peak_rss'])} (+{mb(r['added_rss'])})" if r["peak_rss"] else "–",
                     num(r["image_p50"]), num(r["image_ratio"], ".2f") + "×" if r["image_ratio"] else "–",
                     num(r["text_p50"]), num(r["text_ratio"], ".2f") + "×" if r["text_ratio"] else "–",
                     _cos(r["image_cos"]), _cos(r["text_cos"]), _pct(r["agree"]), _pct(r["acc"])])
    lines += [_table(["variant", "kind", "ran as", "size", "image MB", "text MB", BITS, "load",
                      "peak RSS (added)", "image p50 ms",
                      "image vs base", "text p50 ms", "text vs base", "image cosine", "text cosine",
                      "top-1 agreement", "zero-shot top-1"], rows), ""]
    if ref.get("kind"):
        acc = f"; its zero-shot top-1: {_pct(ref['zero_shot_top1'])}" if ref.get("zero_shot_top1") is not None else ""
        lines += [f"Fidelity reference: {ref['description']}{acc}. Inputs: {report['probe']}.", ""]
    lines += ["## Latency (all configurations)", ""]
    rows = []
    for c in report["latency"]:
        for name, r in c["results"].items():
            rows.append([f"`{name}`", c["graph"], str(c["batch"]), threads_name(c["threads"]), num(r["p50_ms"]),
                         num(r["p90_ms"]), num(r["p99_ms"]), num(r["items_per_s"], ".1f"),
                         num(c["ratio_vs_base"][name], ".3f") + "×", str(r["rounds"]), str(r["iterations"])])
    lines += [_table(["variant", "graph", "batch", "threads", "p50 ms", "p90 ms", "p99 ms", "items/s",
                      "time vs base", "rounds", "calls"], rows), ""]
    lines += ["## Variants", ""]
    lines += [f"- `{v['name']}` ({v['kind']}, {v['target']} {v['precision']}): {v['description']}; "
              f"{v['path']}{size_note(v)}" for v in report["variants"]]
    lines += ["", "## Method", ""] + [f"- **{k}**: {t}" for k, t in report["method"].items()]
    if report["notes"]:
        lines += ["", "## Notes", ""] + [f"- {n}" for n in report["notes"]]
    return "\n".join(lines) + "\n"
