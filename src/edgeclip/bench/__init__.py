"""Latency and fidelity measurement, and reports (JSON, Markdown, HTML with plots). Never needs torch,
except to rebuild the FP32 reference model and the baselines.

    from edgeclip.bench import BenchConfig, run_bench, write_reports
    report = run_bench(BenchConfig(["tiny-fp32", "tiny-int8"], batches=[1, 8], baselines=True))
    write_reports(report, "out/report")      # out/report.json, .md, .html
"""
from .report import write_reports  # noqa: F401
from .runner import BenchConfig, run_bench  # noqa: F401
