"""The HTML report: one self-contained page (inline CSS and SVG; no scripts, fonts or network)."""
from __future__ import annotations

from html import escape

from . import svg
from .report import BITS, _cos, _pct, bits, headline, mb, mb_num, num, size_note, summary_rows, threads_name

CSS = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 24px; color: #1d2125; max-width: 1180px; }
h1 { font-size: 22px; margin: 0 0 6px; } h2 { font-size: 17px; margin: 26px 0 8px; }
.meta { color: #555; } .callout { background: #eef4fb; border-left: 4px solid #1f77b4; padding: 8px 12px; }
.plots { display: flex; flex-wrap: wrap; gap: 16px; } .plots svg { border: 1px solid #dde1e6; }
table { border-collapse: collapse; margin: 8px 0; } th, td { padding: 4px 8px; border-bottom: 1px solid #e3e6ea; }
th { text-align: left; background: #f3f5f7; }
td.n { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
td:first-child { white-space: nowrap; }
.wide { overflow-x: auto; }  /* a table wider than the page scrolls on its own */
.swatch { display: inline-block; width: 10px; height: 10px; border-radius: 5px; margin-right: 6px; }
code { font-size: 12px; }
"""


def _colours(report: dict) -> dict[str, str]:
    return {v["name"]: svg.colour(i) for i, v in enumerate(report["variants"])}


def _points(rows: list[dict], colours: dict, x: str, y: str, scale: float = 1.0) -> list[dict]:
    return [{"name": r["name"], "x": r[x] / scale if r[x] is not None else None, "y": r[y],
             "colour": colours[r["name"]]} for r in rows]


def plots(report: dict) -> tuple[list[str], list[str]]:
    """Latency vs fidelity and size vs fidelity, side by side (cosine; zero-shot accuracy with --eval),
    and p50/p90/p99 per configuration."""
    colours, h = _colours(report), headline(report)
    where = f"batch {h['batch']}, threads {threads_name(h['threads'])}"
    rows = summary_rows(report)
    cos = "image feature cosine to FP32 (mean)"
    out = [svg.scatter(_points(rows, colours, "image_p50", "image_cos"), "image graph p50 latency, ms", cos,
                       f"Latency vs fidelity ({where})"),
           svg.scatter(_points(rows, colours, "image_bytes", "image_cos", 1e6), "image graph size, MB", cos,
                       "Size vs fidelity", x_unit="MB")]
    if any(r["acc"] is not None for r in rows):
        acc = "zero-shot top-1 accuracy"
        out += [svg.scatter(_points(rows, colours, "image_p50", "acc"), "image graph p50 latency, ms", acc,
                            f"Latency vs accuracy ({where})"),
                svg.scatter(_points(rows, colours, "graph_bytes", "acc", 1e6), "image + text graphs, MB", acc,
                            "Size vs accuracy", x_unit="MB")]
    bars = [svg.percentiles(
        [{"name": n, "p50": r["p50_ms"], "p90": r["p90_ms"], "p99": r["p99_ms"], "colour": colours[n]}
         for n, r in c["results"].items()],
        f"{c['graph']} graph, batch {c['batch']}, threads {threads_name(c['threads'])}: p50 / p90 / p99")
        for c in report["latency"]]
    return out, bars


def _table(head: list[str], rows: list[list[str]], numeric_from: int = 1) -> str:
    th = "".join(f"<th>{escape(h)}</th>" for h in head)
    body = "".join("<tr>" + "".join(f'<td class="n">{c}</td>' if i >= numeric_from else f"<td>{c}</td>"
                                    for i, c in enumerate(r)) + "</tr>" for r in rows)
    return f'<div class="wide"><table><thead><tr>{th}</tr></thead><tbody>{body}</tbody></table></div>'


def _summary(report: dict) -> str:
    colours = _colours(report)
    rows = []
    for r in summary_rows(report):
        ratio = lambda g: f"{r[g + '_ratio']:.2f}×" if r[g + "_ratio"] else "–"  # noqa: E731
        rows.append([f'<span class="swatch" style="background:{colours[r["name"]]}"></span>{escape(r["name"])}',
                     escape(r["kind"]), escape(r["ran_as"]), mb(r["size"]), mb_num(r["image_bytes"]),
                     mb_num(r["text_bytes"]), bits(r), num(r["load_s"], ".2f") + " s",
                     f"{mb(r['peak_rss'])} (+{mb(r['added_rss'])})" if r["peak_rss"] else "–",
                     num(r["image_p50"]), ratio("image"), num(r["text_p50"]), ratio("text"),
                     _cos(r["image_cos"]), _cos(r["text_cos"]), _pct(r["agree"]), _pct(r["acc"])])
    return _table(["variant", "kind", "ran as", "size", "image MB", "text MB", BITS, "load", "peak RSS (added)",
                   "image p50 ms", "image vs base",
                   "text p50 ms", "text vs base", "image cosine", "text cosine", "top-1 agreement",
                   "zero-shot top-1"], rows, numeric_from=3)


def _latency(report: dict) -> str:
    rows = []
    for c in report["latency"]:
        for name, r in c["results"].items():
            rows.append([escape(name), c["graph"], str(c["batch"]), threads_name(c["threads"]), num(r["p50_ms"]),
                         num(r["p90_ms"]), num(r["p99_ms"]), num(r["items_per_s"], ".1f"),
                         num(c["ratio_vs_base"][name], ".3f") + "×", str(r["rounds"]), str(r["iterations"])])
    return _table(["variant", "graph", "batch", "threads", "p50 ms", "p90 ms", "p99 ms", "items/s", "time vs base",
                   "rounds", "calls"], rows, numeric_from=2)


def html(report: dict) -> str:
    m, h = report["machine"], headline(report)
    cpu, ref = m["cpu"], report["reference"]
    libs = ", ".join(f"{k} {v}" for k, v in m["libraries"].items())
    scatters, bars = plots(report)
    acc = f"; its zero-shot top-1: {_pct(ref['zero_shot_top1'])}" if ref.get("zero_shot_top1") is not None else ""
    parts = [
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">",
        "<title>edgeclip bench report</title>", f"<style>{CSS}</style></head><body>",
        "<h1>edgeclip bench report</h1>",
        f'<p class="meta"><code>{escape(report["command"])}</code><br>Measured {escape(m["measured"])} on '
        f'<b>{escape(cpu["model"])}</b> ({m["cores"]} cores, {m["cores_usable"]} usable; CPU flags: '
        f'{escape(" ".join(cpu["speed_flags"]) or "none of note")}; load average {m.get("loadavg_1m", "?")}). '
        f"{escape(libs)}.</p>",
        f'<p class="callout"><b>Ratios come from interleaved runs</b>: every variant was timed in the same run, '
        f"taking turns round by round; each ratio is the median over rounds of the per-round time ratio to "
        f"<code>{escape(report['base'])}</code> (&lt; 1 = faster).</p>",
        '<div class="plots">' + "".join(scatters) + "</div>",
        f"<h2>Summary (batch {h['batch']}, threads {threads_name(h['threads'])})</h2>", _summary(report),
    ]
    if ref.get("kind"):
        parts.append(f"<p>Fidelity reference: {escape(ref['description'])}{acc}. Inputs: {escape(report['probe'])}.</p>")
    parts += ["<h2>Latency percentiles</h2>", '<div class="plots">' + "".join(bars) + "</div>",
              "<h2>Latency (all configurations)</h2>", _latency(report), "<h2>Variants</h2><ul>"]
    parts += [f"<li><code>{escape(v['name'])}</code> ({escape(v['kind'])}, {escape(v['target'])} "
              f"{escape(v['precision'])}): {escape(v['description'])}{escape(size_note(v))}</li>"
              for v in report["variants"]]
    parts += ["</ul><h2>Method</h2><ul>"]
    parts += [f"<li><b>{escape(k)}</b>: {escape(t)}</li>" for k, t in report["method"].items()]
    parts.append("</ul>")
    if report["notes"]:
        parts += ["<h2>Notes</h2><ul>"] + [f"<li>{escape(n)}</li>" for n in report["notes"]] + ["</ul>"]
    parts.append("</body></html>\n")
    return "\n".join(parts)
