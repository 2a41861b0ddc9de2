"""The command line under hostile arguments: every error is typed, `--json` errors are JSON on stdout
with a non-zero exit, no output holds NaN/Infinity, a closed pipe is not a crash, labels are read
from a file only when one is named. `edgeclip.cli.main` in-process (what the console script runs),
and the console script itself where a pipe is needed."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("onnxruntime")

from edgeclip import errors  # noqa: E402
from edgeclip.builtin import digit_labels, heldout_dir  # noqa: E402
from edgeclip.cli import main  # noqa: E402
from edgeclip.runtime.manifest import artifact_digest, dumps  # noqa: E402

from .conftest import TINY_ONNX  # noqa: E402

SHARED_EXPORTS = {"art": [TINY_ONNX]}


@pytest.fixture(scope="module")
def digit() -> str:
    return str(next((heldout_dir() / "7").glob("*.png")))


def strict_json(text: str):
    def refuse(name):
        raise AssertionError(f"output holds {name}")

    return json.loads(text, parse_constant=refuse)


def run_json(capsys, argv: list[str]) -> tuple[int, dict]:
    rc = main([*argv, "--json"])
    out = capsys.readouterr().out
    return rc, strict_json(out)


def assert_json_error(rc: int, obj: dict, type_name: str | None = None) -> dict:
    assert rc != 0
    err = obj["error"]
    assert set(err) == {"type", "message"} and err["message"]
    cls = getattr(errors, err["type"], None)
    assert cls is not None and issubclass(cls, errors.EdgeClipError), err  # typed, not a raw traceback
    if type_name:
        assert err["type"] == type_name, err
    return err


# ------------------------------------------------------------------------------- usage errors
USAGE = {
    "run": [["--threads", v] for v in ("0", "-1", "100000", "abc", "1.5")]
           + [["--top-k", v] for v in ("0", "-2", "x", "1e9")] + [["--backend", "auto", "--digest"]],
    "bench": [["--seconds", v] for v in ("inf", "nan", "-1", "0", "1e9", "abc")]
             + [["--batch", v] for v in ("0", "-1", "100000", "x", ",", "1," * 70)]
             + [["--threads", v] for v in ("0", "99999")] + [["--eval-limit", v] for v in ("0", "-1")],
    "export": [["--calib-size", v] for v in ("0", "-5", "x")]
              + [["--max-cosine-drop", v] for v in ("nan", "-1", "2", "inf")]
              + [["--smoothquant-alpha", v] for v in ("inf", "-0.5")]
              + [["--target", "bogus"], ["--seed", "-1"], ["--min-ios", "15"], ["--no-such-flag"]],
    "heads fit": [["--shots", v] for v in ("0", "-1", "x")] + [["--augment", v] for v in ("9", "-1")],
}
USAGE_CASES = [(cmd, extra) for cmd, extras in USAGE.items() for extra in extras]


def _argv(cmd: str, extra: list[str], art: Path, digit: str) -> list[str]:
    base = {"run": ["run", str(art), "--image", digit], "bench": ["bench", str(art)],
            "export": ["export", "builtin:tiny", "--out", "never-written"],
            "heads fit": ["heads", "fit", "builtin:tiny", "--kind", "linear", "--out", "never.npz"]}[cmd]
    return base + extra


@pytest.mark.parametrize("cmd,extra", USAGE_CASES, ids=[f"{c}:{' '.join(e)[:30]}" for c, e in USAGE_CASES])
def test_bad_argument_is_a_json_usage_error(art, digit, capsys, tmp_path, monkeypatch, cmd, extra):
    monkeypatch.chdir(tmp_path)
    rc, obj = run_json(capsys, _argv(cmd, extra, art, digit))
    assert rc == 2
    assert_json_error(rc, obj, "UsageError")
    assert not (tmp_path / "never-written").exists() and not (tmp_path / "never.npz").exists()


@pytest.mark.parametrize("argv", [[], ["nonsense"], ["run"], ["heads"], ["inspect"]])
def test_malformed_command_is_a_json_usage_error(capsys, argv):
    rc, obj = run_json(capsys, argv)
    assert_json_error(rc, obj, "UsageError")


def test_usage_error_without_json_is_one_line_on_stderr(capsys):
    assert main(["run", "x", "--image", "y", "--top-k", "-2"]) == 2
    cap = capsys.readouterr()
    assert cap.out == "" and cap.err.startswith("error: ") and "--top-k" in cap.err and "Traceback" not in cap.err


# ------------------------------------------------------------------------------ runtime errors

def _fifo(tmp_path: Path) -> str:
    p = tmp_path / "fifo"
    os.mkfifo(p)
    return str(p)


RUNTIME = {
    "missing artifact": lambda a, d, t: ["run", str(t / "nope"), "--image", d],
    "artifact is a file": lambda a, d, t: ["run", d, "--image", d],
    "missing image": lambda a, d, t: ["run", str(a), "--image", str(t / "nope.png")],
    "image is a folder": lambda a, d, t: ["run", str(a), "--image", str(t)],
    "image is a FIFO": lambda a, d, t: ["run", str(a), "--image", _fifo(t)],
    "corrupt image": lambda a, d, t: ["run", str(a), "--image", _write(t / "bad.png", b"\x89PNG\r\n\x1a\n garbage")],
    "labels file missing": lambda a, d, t: ["run", str(a), "--image", d, "--labels", "@" + str(t / "nope.txt")],
    "labels file is a FIFO": lambda a, d, t: ["run", str(a), "--image", d, "--labels-file", _fifo(t)],
    "labels file empty": lambda a, d, t: ["run", str(a), "--image", d, "--labels-file", _write(t / "e.txt", b"\n\n")],
    "labels and labels file": lambda a, d, t: ["run", str(a), "--image", d, "--labels", "a,b", "--labels-file", d],
    "duplicate labels": lambda a, d, t: ["run", str(a), "--image", d, "--labels", "cat,Cat "],
    "empty labels": lambda a, d, t: ["run", str(a), "--image", d, "--labels", ",,,"],
    "wrong digest": lambda a, d, t: ["run", str(a), "--image", d, "--digest", "sha256:" + "0" * 64],
    "malformed digest": lambda a, d, t: ["inspect", str(a), "--digest", "abc"],
    "unknown head": lambda a, d, t: ["run", str(a), "--image", d, "--head", "nope"],
    "text too long": lambda a, d, t: ["run", str(a), "--text", "word " * 200],
    "unknown model": lambda a, d, t: ["export", "random:no-such-spec", "--out", str(t / "x")],
    "foreign backend": lambda a, d, t: ["run", str(a), "--image", d, "--backend", "openvino"],
    "unknown backend": lambda a, d, t: ["run", str(a), "--image", d, "--backend", "python"],
    "inspect a non-artifact": lambda a, d, t: ["inspect", str(t)],
    "heads show a missing file": lambda a, d, t: ["heads", "show", str(t / "nope.npz")],
    "heads show a non-npz": lambda a, d, t: ["heads", "show", d],
}


def _write(p: Path, data: bytes) -> str:
    p.write_bytes(data)
    return str(p)


@pytest.mark.parametrize("case", list(RUNTIME))
def test_runtime_error_is_a_typed_json_error(art, digit, capsys, tmp_path, case):
    rc, obj = run_json(capsys, RUNTIME[case](art, digit, tmp_path))
    assert_json_error(rc, obj)


@pytest.mark.parametrize("case", ["missing artifact", "wrong digest", "image is a FIFO", "labels file is a FIFO"])
def test_runtime_error_without_json_is_one_line_on_stderr(art, digit, capsys, tmp_path, case):
    assert main(RUNTIME[case](art, digit, tmp_path)) == 2
    cap = capsys.readouterr()
    assert cap.err.startswith("error: ") and "Traceback" not in cap.err and cap.out == ""


# -------------------------------------------------------------------------------- JSON output

def test_json_output_never_holds_nan_or_infinity():
    text = dumps({"a": float("nan"), "b": [float("inf"), -float("inf")], "c": np.float32("nan"),
                  "d": np.array([1.0, np.nan]), "e": 1.5})
    assert strict_json(text) == {"a": None, "b": [None, None], "c": None, "d": [1.0, None], "e": 1.5}


SUCCESS = {"inspect": lambda a, d: ["inspect", a], "image": lambda a, d: ["run", a, "--image", d],
           "text": lambda a, d: ["run", a, "--text", "a photo of the number one"],
           "labels": lambda a, d: ["run", a, "--image", d, "--labels", "one,two"],
           "similarity": lambda a, d: ["run", a, "--image", d, "--text", "seven", "one"]}


@pytest.mark.parametrize("case", list(SUCCESS))
def test_successful_json_output_is_strict_json_with_the_digest(art, digit, capsys, case):
    rc, obj = run_json(capsys, SUCCESS[case](str(art), digit))
    assert rc == 0 and "error" not in obj
    assert obj["digest"] == artifact_digest(art)


def test_inspect_into_a_closed_pipe_is_not_a_crash(art):
    exe = shutil.which("edgeclip") or str(Path(sys.executable).parent / "edgeclip")
    r = subprocess.run(["bash", "-o", "pipefail", "-c", f"'{exe}' inspect '{art}' | head -1"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("artifact") and "BrokenPipe" not in r.stderr and "Traceback" not in r.stderr


# --------------------------------------------------------------------------------------- labels

def test_labels_that_look_like_a_path_are_labels_not_a_file(art, digit, capsys):
    secret = "EDGECLIP_SECRET_VALUE_42"
    os.environ["EDGECLIP_TEST_SECRET"] = secret
    try:
        rc, obj = run_json(capsys, ["run", str(art), "--image", digit, "--labels", "/proc/self/environ"])
    finally:
        del os.environ["EDGECLIP_TEST_SECRET"]
    assert rc == 0
    assert [t["label"] for t in obj["images"][0]["top"]] == ["/proc/self/environ"]
    assert secret not in json.dumps(obj)


def test_labels_file_forms_agree_with_the_list(art, digit, capsys, tmp_path):
    f = tmp_path / "labels.txt"
    f.write_text("# digits\nseven\n\none\nfour\n")
    outs = []
    for extra in (["--labels", "seven,one,four"], ["--labels", f"@{f}"], ["--labels-file", str(f)]):
        rc, obj = run_json(capsys, ["run", str(art), "--image", digit, *extra])
        assert rc == 0
        outs.append(obj["images"][0]["top"])
    assert outs[0] == outs[1] == outs[2] and outs[0][0]["label"] == "seven"


def test_digest_pin_through_the_cli(art, digit, capsys):
    d = artifact_digest(art)
    rc, obj = run_json(capsys, ["run", str(art), "--image", digit, "--digest", d])
    assert rc == 0 and obj["images"][0]["label"] == "seven"
    rc, obj = run_json(capsys, ["inspect", str(art), "--digest", d])
    assert rc == 0 and obj["digest"] == d
