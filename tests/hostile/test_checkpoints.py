"""Hostile checkpoints: TorchScript archives that run code, crafted pickles, corrupt zips, bad
transformers configs, preprocessor configs and shard maps, state dicts that are not tensors.

Every case asserts the typed error and a key part of its message (or an exact load), and, where the
file tries to write one, that no marker file appears.
"""
from __future__ import annotations

import json
import pickle
import pickletools
import re
import struct
import zipfile
from pathlib import Path
from typing import Dict, Tuple

import pytest
import torch

import edgeclip
from edgeclip.errors import CheckpointError, UnsafeCheckpointError
from edgeclip.models.loaders import read_state_dict, spec_from_hf_config
from edgeclip.models.safe_pickle import read_torchscript

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch.jit.script/save, to build files


# ----------------------------------------------------------------------------------- tiny weights

@pytest.fixture(scope="module")
def tiny():
    """Our state dict of a random 'tiny' model (the spec ships with edgeclip)."""
    return edgeclip.load_model("random:tiny", seed=1).state_dict()


_TO_OPENAI = [(r"^visual\.patch_embed\.weight$", "visual.conv1.weight"),
              (r"^visual\.pos_embed$", "visual.positional_embedding"), (r"^visual\.proj\.weight$", "visual.proj"),
              (r"^visual\.blocks\.", "visual.transformer.resblocks."),
              (r"^text\.token_embed\.weight$", "token_embedding.weight"),
              (r"^text\.pos_embed$", "positional_embedding"),
              (r"^text\.blocks\.", "transformer.resblocks."), (r"^text\.ln_final\.", "ln_final."),
              (r"^text\.proj\.weight$", "text_projection"), (r"\.attn\.qkv\.", ".attn.in_proj_"),
              (r"\.attn\.out\.", ".attn.out_proj."), (r"\.mlp\.fc1\.", ".mlp.c_fc."), (r"\.mlp\.fc2\.", ".mlp.c_proj.")]
_TO_HF = [(r"^visual\.class_embedding$", "vision_model.embeddings.class_embedding"),
          (r"^visual\.patch_embed\.", "vision_model.embeddings.patch_embedding."),
          (r"^visual\.pos_embed$", "vision_model.embeddings.position_embedding.weight"),
          (r"^visual\.ln_pre\.", "vision_model.pre_layrnorm."), (r"^visual\.ln_post\.", "vision_model.post_layernorm."),
          (r"^visual\.blocks\.", "vision_model.encoder.layers."), (r"^visual\.proj\.", "visual_projection."),
          (r"^text\.token_embed\.", "text_model.embeddings.token_embedding."),
          (r"^text\.pos_embed$", "text_model.embeddings.position_embedding.weight"),
          (r"^text\.blocks\.", "text_model.encoder.layers."), (r"^text\.ln_final\.", "text_model.final_layer_norm."),
          (r"^text\.proj\.", "text_projection."), (r"\.ln_1\.", ".layer_norm1."), (r"\.ln_2\.", ".layer_norm2."),
          (r"\.attn\.out\.", ".self_attn.out_proj.")]


def to_openai(ours: dict) -> dict:
    """Our names -> OpenAI CLIP names (projections stored as x @ P, i.e. transposed)."""
    out = {}
    for k, v in ours.items():
        name = k
        for pat, rep in _TO_OPENAI:
            name = re.sub(pat, rep, name)
        out[name] = v.t().contiguous() if k.endswith("proj.weight") else v.clone()
    return out


def to_hf(ours: dict) -> dict:
    """Our names -> transformers CLIPModel names (Q/K/V split)."""
    out = {}
    for k, v in ours.items():
        name = k
        for pat, rep in _TO_HF:
            name = re.sub(pat, rep, name)
        if ".attn.qkv." in name:
            for part, chunk in zip("qkv", v.chunk(3, dim=0)):
                out[name.replace(".attn.qkv.", f".self_attn.{part}_proj.")] = chunk.clone()
        else:
            out[name] = v.clone()
    return out


def hf_config(**changes) -> dict:
    """config.json of the 'tiny' spec in transformers' CLIP layout; `changes`: {'vision_config.x': v}."""
    tower = dict(hidden_size=64, intermediate_size=256, num_hidden_layers=3, num_attention_heads=4,
                 hidden_act="quick_gelu", layer_norm_eps=1e-5)
    cfg = {"model_type": "clip", "projection_dim": 64,
           "vision_config": {**tower, "image_size": 32, "patch_size": 8},
           "text_config": {**tower, "vocab_size": 49408, "max_position_embeddings": 77, "eos_token_id": 49407}}
    for dotted, value in changes.items():
        section, _, key = dotted.rpartition(".")
        target = cfg[section] if section else cfg
        target[key] = value
    return cfg


def assert_same_weights(model, ours: dict):
    got = model.state_dict()
    assert set(got) == set(ours)
    for k, v in ours.items():
        assert torch.equal(got[k], v.float().reshape(got[k].shape)), k


# ------------------------------------------------------------------------ real scripted modules

class Node(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


class EvilTuple(torch.nn.Module):
    """Its scripted __setstate__ creates a file (torch.from_file(shared=True) creates what it maps)."""

    def __init__(self, marker: str):
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(2), requires_grad=False)
        self.path = marker
        self.scratch = torch.zeros(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.w

    @torch.jit.export
    def __getstate__(self) -> Tuple[torch.Tensor, str, bool]:
        return (self.w, self.path, self.training)

    @torch.jit.export
    def __setstate__(self, state: Tuple[torch.Tensor, str, bool]) -> None:
        self.w = state[0]
        self.path = state[1]
        self.training = state[2]
        self.scratch = torch.from_file(self.path, True, 4)  # kept in an attribute, so not dead code


class EvilDict(torch.nn.Module):
    """Same attack, but its state is a dict, like any module's attribute dict."""

    def __init__(self, marker: str):
        super().__init__()
        self.path = marker
        self.scratch = torch.zeros(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x

    @torch.jit.export
    def __getstate__(self) -> Dict[str, str]:
        return {"path": self.path}

    @torch.jit.export
    def __setstate__(self, state: Dict[str, str]) -> None:
        self.path = state["path"]
        self.training = False
        self.scratch = torch.from_file(self.path, True, 4)


EVIL = {"tuple-state": EvilTuple, "dict-state": EvilDict}


def scripted_archive(path: Path, sd: dict, evil=None, marker: Path | None = None) -> Path:
    """torch.jit.save of a module tree holding `sd` under its dotted names, plus an optional evil child."""
    root = Node()
    for key, value in sd.items():
        *parts, leaf = key.split(".")
        mod = root
        for part in parts:
            if not hasattr(mod, part):
                mod.add_module(part, Node())
            mod = getattr(mod, part)
        mod.register_parameter(leaf, torch.nn.Parameter(value.clone(), requires_grad=False))
    if evil is not None:
        root.add_module("evil", EVIL[evil](str(marker)))
    torch.jit.save(torch.jit.script(root), str(path))
    return path


@pytest.mark.parametrize("evil", sorted(EVIL))
def test_the_attack_is_real_with_torch_jit_load(tmp_path, evil):
    """The files below do write a file when loaded the old way: the tests that follow prove a defence."""
    marker = tmp_path / "pwned"
    path = scripted_archive(tmp_path / "evil.pt", {"a.w": torch.ones(2)}, evil, marker)
    assert not marker.exists()
    torch.jit.load(str(path))
    assert marker.exists()


def _route(route: str, tmp_path: Path, tiny: dict, evil: str, marker: Path):
    """load_model through one of the three routes that read .pt/.bin files."""
    if route == "hf":
        d = tmp_path / "hf"
        d.mkdir()
        (d / "config.json").write_text(json.dumps(hf_config()))
        scripted_archive(d / "pytorch_model.bin", to_hf(tiny), evil, marker)
        return lambda: edgeclip.load_model(f"hf:{d}")
    path = scripted_archive(tmp_path / "clip.pt", to_openai(tiny), evil, marker)
    if route == "openai":
        return lambda: edgeclip.load_model(f"openai:{path}")
    return lambda: edgeclip.load_model("open_clip:tiny", checkpoint=path)


@pytest.mark.parametrize("evil", sorted(EVIL))
@pytest.mark.parametrize("route", ["openai", "open_clip", "hf"])
def test_torchscript_archives_run_no_code(tmp_path, tiny, route, evil):
    marker = tmp_path / "pwned"
    load = _route(route, tmp_path, tiny, evil, marker)
    if evil == "tuple-state":  # its tensors live in a tuple only its own code could name: refused
        with pytest.raises(UnsafeCheckpointError, match=r"module 'evil' \(__torch__\..*EvilTuple\) restores itself"):
            load()
    else:  # an attribute dict like any module's: only its tensors are read (it has none)
        assert_same_weights(load(), tiny)
    assert not marker.exists()


def test_scripted_clip_loads_exactly_with_every_route(tmp_path, tiny):
    for route in ("openai", "open_clip", "hf"):
        sub = tmp_path / route
        sub.mkdir()
        assert_same_weights(_route(route, sub, tiny, None, sub / "unused")(), tiny)


class Views(torch.nn.Module):
    def __init__(self):
        super().__init__()
        base = torch.arange(24.0).reshape(4, 6)
        self.col = torch.nn.Parameter(base[:, 1])            # a strided view with an offset
        self.tail = torch.nn.Parameter(base.flatten()[5:])
        self.fp16 = torch.nn.Parameter(torch.randn(3, 2).half())
        self.register_buffer("bf", torch.randn(2).bfloat16())
        self.register_buffer("flags", torch.tensor([True, False]))
        self.register_buffer("count", torch.tensor(7))
        self.register_buffer("empty", torch.zeros(0, 3))
        self.register_buffer("unset", None)
        self.plain = torch.ones(3)                           # an attribute, not a buffer
        self.many = [torch.ones(1), torch.zeros(1)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.plain.sum() + self.many[0]


class Containers(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.ml = torch.nn.ModuleList([torch.nn.Linear(2, 2) for _ in range(2)])
        self.md = torch.nn.ModuleDict({"x": torch.nn.LayerNorm(2)})
        self.pl = torch.nn.ParameterList([torch.nn.Parameter(torch.ones(2))])
        self.bn = torch.nn.BatchNorm1d(2)
        self.seq = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.ReLU())
        self.tied = self.ml[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for m in self.ml:
            x = m(x)
        return self.md["x"](x) + self.pl[0] + self.bn(x) + self.tied(x) + self.seq(x)


@pytest.mark.parametrize("make", [Views, Containers, lambda: torch.nn.Sequential(Views(), Containers())],
                         ids=["views-dtypes-attributes", "containers-tied", "nested"])
def test_reader_matches_torch_jit_state_dict(tmp_path, make):
    """Same names, order, dtypes, strides and values as torch.jit.load(...).state_dict()."""
    path = tmp_path / "m.pt"
    torch.jit.save(torch.jit.script(make()), str(path))
    ref, ours = dict(torch.jit.load(str(path)).state_dict()), read_torchscript(path)
    assert list(ours) == list(ref)
    for k, v in ref.items():
        assert ours[k].dtype == v.dtype and ours[k].stride() == v.stride() and torch.equal(ours[k], v), k


# ------------------------------------------------------------------- hand-written pickle opcodes

def lit(x) -> bytes:
    """Opcodes that push a plain Python value (no memo use)."""
    return pickletools.optimize(pickle.dumps(x, protocol=2))[2:-1]


def glob(module: str, name: str, form: str = "GLOBAL") -> bytes:
    if form == "STACK_GLOBAL":
        return lit(module) + lit(name) + b"\x93"
    return b"c" + f"{module}\n{name}\n".encode()


def call(fn: bytes, *args: bytes) -> bytes:
    return fn + b"(" + b"".join(args) + b"tR"


def storage(key="0", kind="FloatStorage", numel=4, loc="cpu") -> bytes:
    return b"(" + lit("storage") + glob("torch", kind) + lit(key) + lit(loc) + lit(numel) + b"tQ"


def tensor(key="0", size=(4,), stride=None, offset=0, numel=4, kind="FloatStorage", grad=False, hooks=None,
           store=None) -> bytes:
    stride = stride if stride is not None else tuple(int(torch.tensor(size[i + 1:]).prod()) for i in range(len(size)))
    return call(glob("torch._utils", "_rebuild_tensor_v2"), store or storage(key, kind, numel), lit(offset),
                lit(tuple(size)), lit(tuple(stride)), lit(grad), hooks or call(glob("collections", "OrderedDict")))


def module(name: str, attrs: list, qual: str = "__torch__") -> bytes:
    """A scripted module the way torch.jit.save writes it: NEWOBJ, then BUILD with its attribute dict."""
    return glob(qual, name) + b")\x81}(" + b"".join(lit(k) + v for k, v in attrs) + b"ub"


def dump(body: bytes) -> bytes:
    return b"\x80\x02" + body + b"."


FLOATS = struct.pack("<4f", 1.0, 2.0, 3.0, 4.0)
CODE = 'class Root(Module):\n  __parameters__ = ["w", ]\n  __buffers__ = []\n  w : Tensor\n'


def write_archive(path: Path, data_pkl: bytes, storages=None, code=None, extra=(), prefix="arch",
                  skip=()) -> Path:
    """A TorchScript-shaped zip: <prefix>/data.pkl, data/<key>, constants.pkl, code/, version, byteorder."""
    entries = {"data.pkl": data_pkl, "constants.pkl": dump(b")"), "version": b"3\n", "byteorder": b"little",
               **{f"data/{k}": v for k, v in (storages if storages is not None else {"0": FLOATS}).items()},
               **{f"code/{k}": v.encode() for k, v in (code or {"__torch__.py": CODE}).items()}}
    with zipfile.ZipFile(path, "w") as z:
        for name, data in entries.items():
            if name not in skip:
                z.writestr(f"{prefix}/{name}", data)
        for name, data in extra:
            z.writestr(name, data)
    return path


GOOD = dump(module("Root", [("w", tensor()), ("training", lit(False))]))


def test_crafted_archive_loads_its_declared_tensors(tmp_path):
    path = write_archive(tmp_path / "ok.pt", GOOD)
    assert torch.equal(read_state_dict(path)["w"], torch.tensor([1.0, 2.0, 3.0, 4.0]))
    assert torch.equal(torch.jit.load(str(path)).state_dict()["w"], read_state_dict(path)["w"])  # a real archive


# Globals that run code, read or write files, import modules or rebuild arbitrary objects.
FORBIDDEN = [
    ("posix", "system"), ("os", "system"), ("nt", "system"), ("os", "popen"), ("os", "execv"), ("os", "remove"),
    ("builtins", "eval"), ("builtins", "exec"), ("builtins", "open"), ("builtins", "getattr"),
    ("builtins", "__import__"), ("builtins", "compile"), ("__builtin__", "eval"), ("subprocess", "Popen"),
    ("subprocess", "call"), ("shutil", "rmtree"), ("runpy", "_run_code"), ("pickle", "loads"),
    ("torch", "load"), ("torch.jit", "load"), ("torch", "from_file"), ("torch", "save"),
    ("torch.serialization", "load"), ("torch._utils", "_rebuild_qtensor"), ("torch.storage", "_load_from_bytes"),
    ("torch.nn.modules.module", "Module"), ("torch", "Tensor"), ("torch", "UntypedStorage"),
    ("numpy.core.multiarray", "_reconstruct"), ("collections", "defaultdict"), ("__torch__evil", "system"),
    ("torch._utils", "_rebuild_tensor_v3"),
]


@pytest.mark.parametrize("form", ["GLOBAL", "STACK_GLOBAL"])
@pytest.mark.parametrize("module_name,name", FORBIDDEN, ids=[".".join(g) for g in FORBIDDEN])
def test_forbidden_global_in_torchscript_archive(tmp_path, module_name, name, form):
    marker = tmp_path / "pwned"
    evil = call(glob(module_name, name, form), lit(f"touch {marker}"))
    pkl = dump(module("Root", [("w", tensor()), ("x", evil)]))
    path = write_archive(tmp_path / "evil.pt", b"\x80\x04" + pkl[2:] if form == "STACK_GLOBAL" else pkl)
    with pytest.raises(UnsafeCheckpointError, match=re.escape(f"global '{module_name}.{name}'")):
        edgeclip.load_model(f"openai:{path}")
    assert not marker.exists()


@pytest.mark.parametrize("container", ["torch.save zip", "raw pickle"])
@pytest.mark.parametrize("module_name,name", FORBIDDEN[:12], ids=[".".join(g) for g in FORBIDDEN[:12]])
def test_forbidden_global_in_plain_pickle(tmp_path, module_name, name, container):
    """Plain pickles stay on torch.load(weights_only=True): refused, the global named."""
    marker = tmp_path / "pwned"
    evil = dump(call(glob(module_name, name), lit(f"touch {marker}")))
    path = tmp_path / "evil.pt"
    if container == "raw pickle":
        path.write_bytes(evil)
    else:
        torch.save({"w": torch.ones(1)}, path)
        entries = {n: zipfile.ZipFile(path).read(n) for n in zipfile.ZipFile(path).namelist()}
        with zipfile.ZipFile(path, "w") as z:
            for n, data in entries.items():
                z.writestr(n, evil if n.endswith("/data.pkl") else data)
    # torch names builtins without their module ('eval')
    with pytest.raises(UnsafeCheckpointError, match=rf"'({re.escape(module_name)}\.)?{re.escape(name)}'"):
        edgeclip.load_model(f"openai:{path}")
    assert not marker.exists()


class Payload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        import os
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("where", ["state dict value", "nested in a list", "dict key"])
def test_pickled_class_with_reduce_is_refused(tmp_path, where):
    marker = tmp_path / "pwned"
    obj = {"state dict value": {"w": Payload(marker)}, "nested in a list": {"w": [[Payload(marker)]]},
           "dict key": {Payload(marker): torch.ones(1)}}[where]
    path = tmp_path / "evil.pt"
    torch.save(obj, path)
    with pytest.raises(UnsafeCheckpointError, match=r"'(posix|os|nt)\.system'"):
        read_state_dict(path)
    assert not marker.exists()


def test_torchscript_stub_names_are_inert(tmp_path):
    """'__torch__.*' names become record-only stand-ins: calling one runs nothing, and it holds no tensors."""
    marker = tmp_path / "pwned"
    pkl = dump(call(glob("__torch__.os", "system"), lit(f"touch {marker}")))
    with pytest.raises(UnsafeCheckpointError, match=r"__torch__\.os\.system\) restores itself"):
        read_state_dict(write_archive(tmp_path / "evil.pt", pkl))
    assert not marker.exists()


# ---------------------------------------------------------------------- malformed archive pickles

def _mod(*attrs):
    return dump(module("Root", list(attrs)))


# name -> (data.pkl, storages or None for the default, expected error type, key part of its message)
BAD_PICKLES = {
    "view past its storage": (_mod(("w", tensor(size=(1000,)))), None, CheckpointError, "reaches past"),
    "offset past its storage": (_mod(("w", tensor(offset=4))), None, CheckpointError, "reaches past"),
    "broadcast view (repeats elements)": (_mod(("w", tensor(size=(8, 4), stride=(0, 1)))), None, CheckpointError,
                                          "reaches past"),
    "declared numel over the entry": (_mod(("w", tensor(numel=2**40))), None, CheckpointError, "declares"),
    "storage entry missing": (_mod(("w", tensor(key="7"))), None, CheckpointError, "no such entry"),
    "storage entry short": (_mod(("w", tensor())), {"0": FLOATS[:7]}, CheckpointError, "declares 4 elements"),
    "storage key escapes": (_mod(("w", tensor(key="../0"))), None, CheckpointError, "malformed storage record"),
    "storage numel negative": (_mod(("w", tensor(numel=-1))), None, CheckpointError, "malformed storage record"),
    "storage numel bool": (_mod(("w", tensor(numel=True))), None, CheckpointError, "malformed storage record"),
    "storage location not str": (_mod(("w", tensor(store=b"(" + lit("storage") + glob("torch", "FloatStorage")
                                                   + lit("0") + lit(3) + lit(4) + b"tQ"))),
                                 None, CheckpointError, "malformed storage record"),
    "storage type not a storage": (_mod(("w", tensor(store=b"(" + lit("storage")
                                                     + glob("collections", "OrderedDict") + lit("0") + lit("cpu")
                                                     + lit(4) + b"tQ"))), None, CheckpointError,
                                   "malformed storage record"),
    "persistent id not a storage": (_mod(("w", lit(("module", "x")) + b"Q")), None, CheckpointError,
                                    "unknown persistent record"),
    "negative offset": (_mod(("w", tensor(offset=-1))), None, CheckpointError, "inconsistent"),
    "size not ints": (_mod(("w", tensor(size=(2.5,), stride=(1,)))), None, CheckpointError, "non-negative ints"),
    "stride rank differs": (_mod(("w", tensor(size=(2, 2), stride=(1,)))), None, CheckpointError, "inconsistent"),
    "too many dimensions": (_mod(("w", tensor(size=(1,) * 40))), None, CheckpointError, "at most 32"),
    "backward hooks": (_mod(("w", tensor(hooks=lit({"h": 1})))), None, CheckpointError, "backward hooks"),
    "requires_grad not bool": (_mod(("w", tensor(grad=1))), None, CheckpointError, "backward hooks"),
    "storage passed as a tensor": (_mod(("w", call(glob("torch._utils", "_rebuild_tensor_v2"), lit(1), lit(0),
                                                   lit((1,)), lit((1,)), lit(False), lit({})))),
                                   None, CheckpointError, "not a storage record"),
    "BUILD on a tensor (Tensor.__setstate__)": (_mod(("w", tensor() + lit((1, 2, 3, 4)) + b"b")), None,
                                                UnsafeCheckpointError, "pickle BUILD"),
    "BUILD on an allowed global": (_mod(("w", glob("collections", "OrderedDict") + lit({"x": 1}) + b"b")), None,
                                   UnsafeCheckpointError, "pickle BUILD"),
    "module built twice": (dump(module("Root", [("w", tensor())]) + lit({"w": 1}) + b"b"), None,
                           CheckpointError, "built twice"),
    "module without state": (dump(glob("__torch__", "Root") + b")\x81"), None, UnsafeCheckpointError,
                             "restores itself"),
    "attribute name with a dot": (_mod(("a.b", tensor())), None, CheckpointError, "attribute named 'a.b'"),
    "declared parameter holds a str": (_mod(("w", lit("not a tensor"))), None, CheckpointError,
                                       "'w' is declared a parameter/buffer but holds str"),
    "module refers to itself": (dump(glob("__torch__", "Root") + b")\x81q\x00}(" + lit("w") + tensor()
                                     + lit("me") + b"h\x00ub"), None, CheckpointError, "nest more than"),
    "modules nest 100 deep": (dump(b"".join(glob("__torch__", "Root") + b")\x81}(" + lit("c") for _ in range(100))
                                   + b"N" + b"ub" * 100), None, CheckpointError, "nest more than"),
    "lists nest 100000 deep": (dump(b"]" * 1 + b"(]" * 100000 + b"e" * 100000), None, CheckpointError,
                               "nest"),
    "shared lists, exponential walk": (dump(b"]" + b"".join(b"q\x00h\x00h\x00\x86" for _ in range(60))), None,
                                       CheckpointError, "objects"),
    "parameter with hooks": (_mod(("w", call(glob("torch._utils", "_rebuild_parameter"), tensor(), lit(False),
                                             lit({"h": 1})))), None, CheckpointError, "parameter record is malformed"),
    "parameter of a non-tensor": (_mod(("w", call(glob("torch._utils", "_rebuild_parameter"), lit(3), lit(False),
                                                  call(glob("collections", "OrderedDict"))))), None,
                                  CheckpointError, "parameter record is malformed"),
    "root is a list of tensors": (dump(b"]" + tensor() + b"a"), None, CheckpointError, "holds a list"),
    "root is an int": (dump(lit(3)), None, CheckpointError, "holds a int"),
    "root dict with a non-tensor": (dump(lit({"w": 3})), None, CheckpointError, "entry 'w' is a int"),
    "root dict with an int key": (dump(b"}" + lit(1) + tensor() + b"s"), None, CheckpointError, "under a int key"),
    "out-of-band buffer (protocol 5)": (b"\x80\x05\x97.", None, CheckpointError, "truncated or corrupt"),
    "extension code (copyreg)": (b"\x80\x02\x82\x7f.", None, CheckpointError, "truncated or corrupt"),
    "truncated pickle": (GOOD[:40], None, CheckpointError, "truncated or corrupt"),
    "not a pickle": (b"\x00garbage", None, CheckpointError, "truncated or corrupt"),
}


@pytest.mark.parametrize("case", sorted(BAD_PICKLES))
def test_malformed_archive_pickle(tmp_path, case):
    pkl, storages, err, msg = BAD_PICKLES[case]
    path = write_archive(tmp_path / "bad.pt", pkl, storages)
    with pytest.raises(err, match=re.escape(msg)):
        edgeclip.load_model(f"openai:{path}")


def test_rebuild_parameter_and_typed_storages(tmp_path):
    halves = torch.tensor([1.5, -2.0], dtype=torch.float16).numpy().tobytes()
    hooks = call(glob("collections", "OrderedDict"))
    param = call(glob("torch._utils", "_rebuild_parameter"), tensor(), lit(True), hooks)
    pkl = _mod(("w", param), ("h", tensor(key="1", size=(2,), numel=2, kind="HalfStorage")))
    code = {"__torch__.py": CODE.replace("__buffers__ = []", '__buffers__ = ["h", ]')}
    got = read_state_dict(write_archive(tmp_path / "p.pt", pkl, {"0": FLOATS, "1": halves}, code=code))
    assert torch.equal(got["w"], torch.tensor([1.0, 2.0, 3.0, 4.0]))
    assert got["h"].dtype == torch.float16 and got["h"].tolist() == [1.5, -2.0]


def test_tensor_names_without_code_fall_back_to_tensor_attributes(tmp_path):
    pkl = dump(module("Root", [("w", tensor()), ("sub", module("Sub", [("b", tensor(size=(2,), offset=2))]))]))
    got = read_state_dict(write_archive(tmp_path / "nocode.pt", pkl, code={"other.py": ""}))
    assert list(got) == ["w", "sub.b"] and torch.equal(got["sub.b"], torch.tensor([3.0, 4.0]))


# ------------------------------------------------------------------------------ corrupt zip files

def _good_archive(tmp_path: Path) -> Path:
    return scripted_archive(tmp_path / "good.pt", {"a.w": torch.arange(6.0), "b": torch.ones(2, 2)})


def _patch_central_size(data: bytes, size: int) -> bytes:
    """Rewrite the uncompressed size of the first central-directory entry (what zipfile trusts)."""
    at = data.index(b"PK\x01\x02")
    return data[: at + 24] + struct.pack("<I", size) + data[at + 28:]


def _flip_in_storage(data: bytes) -> bytes:
    at = data.index(torch.arange(6.0).numpy().tobytes())
    return data[:at] + bytes([data[at] ^ 0xFF]) + data[at + 1:]


CORRUPTIONS = {
    "truncated to 10%": (lambda d: d[: len(d) // 10], "cannot read"),
    "truncated to 50%": (lambda d: d[: len(d) // 2], "cannot read"),
    "truncated by one byte": (lambda d: d[:-1], "cannot read"),
    "truncated to the end record": (lambda d: d[-22:], "truncated or corrupt"),
    "empty file": (lambda d: b"", "cannot read"),
    "storage byte flipped (CRC)": (_flip_in_storage, "truncated or corrupt"),
    "declared size of 4 GiB": (lambda d: _patch_central_size(d, 0xFFFFFFF0), "zip bomb"),
}


@pytest.mark.parametrize("case", sorted(CORRUPTIONS))
def test_corrupt_archive(tmp_path, case):
    change, msg = CORRUPTIONS[case]
    good = _good_archive(tmp_path)
    path = tmp_path / "bad.pt"
    path.write_bytes(change(good.read_bytes()))
    with pytest.raises(CheckpointError, match=re.escape(msg)) as e:
        edgeclip.load_model(f"openai:{path}")
    assert str(path) in str(e.value)


ARCHIVE_LAYOUTS = {
    "no data.pkl": (GOOD, dict(skip=("data.pkl",)), "has no 'arch/data.pkl'"),
    "two constants.pkl": (GOOD, dict(extra=[("other/constants.pkl", b"")]), "one constants.pkl, this one has 2"),
    "duplicate entry": (GOOD, dict(extra=[("arch/data/0", FLOATS)]), "same name"),
    "big-endian": (GOOD, dict(skip=("byteorder",), extra=[("arch/byteorder", b"big")]), "byte order b'big'"),
    "data.pkl over 16 MiB": (GOOD + b"\x00" * (17 << 20), {}, "more than the 16777216"),
}


@pytest.mark.parametrize("case", sorted(ARCHIVE_LAYOUTS))
@pytest.mark.filterwarnings("ignore:Duplicate name")
def test_bad_archive_layout(tmp_path, case):
    pkl, kwargs, msg = ARCHIVE_LAYOUTS[case]
    path = write_archive(tmp_path / "bad.pt", pkl, **kwargs)
    with pytest.raises(CheckpointError, match=re.escape(msg)):
        read_state_dict(path)


def test_many_zip_entries_are_refused(tmp_path):
    path = tmp_path / "many.pt"
    with zipfile.ZipFile(path, "w") as z:
        for i in range(100_001):
            z.writestr(f"a/{i}", b"")
    with pytest.raises(CheckpointError, match="100001 entries"):
        read_state_dict(path)


def test_legacy_pickle_loads_through_weights_only(tmp_path, tiny):
    path = tmp_path / "legacy.pt"
    torch.save(to_openai(tiny), path, _use_new_zipfile_serialization=False)
    assert_same_weights(edgeclip.load_model(f"openai:{path}"), tiny)


# ----------------------------------------------------------------------- transformers config.json

def hf_folder(tmp_path: Path, cfg=None, preprocessor=None, weights=None) -> Path:
    d = tmp_path / "hf"
    d.mkdir(exist_ok=True)
    (d / "config.json").write_text(cfg if isinstance(cfg, str) else json.dumps(cfg or hf_config()))
    if preprocessor is not None:
        (d / "preprocessor_config.json").write_text(
            preprocessor if isinstance(preprocessor, str) else json.dumps(preprocessor))
    if weights is not None:
        torch.save(weights, d / "pytorch_model.bin")
    return d


SIZE_FIELDS = ["vision_config." + k for k in ("hidden_size", "intermediate_size", "num_hidden_layers",
                                              "num_attention_heads", "image_size", "patch_size")] + \
              ["text_config." + k for k in ("hidden_size", "intermediate_size", "num_hidden_layers",
                                            "num_attention_heads", "vocab_size", "max_position_embeddings")] + \
              ["projection_dim"]
BAD_SIZES = {"zero": 0, "negative": -64, "huge": 10**7, "str": "64", "float": 64.0, "bool": True,
             "list": [64, 32], "null": None, "object": {"n": 64}}


@pytest.mark.parametrize("value", sorted(BAD_SIZES))
@pytest.mark.parametrize("field", SIZE_FIELDS)
def test_bad_config_size(tmp_path, field, value):
    d = hf_folder(tmp_path, hf_config(**{field: BAD_SIZES[value]}))
    key = field.rpartition(".")[2]
    with pytest.raises(CheckpointError, match=rf"config\.json.*field '{key}' is .*must be an integer from 1 to"):
        edgeclip.load_model(f"hf:{d}")


BAD_FIELDS = {
    **{f"{tower}.hidden_act={v!r}": (f"{tower}_config.hidden_act", v, "'hidden_act'.*one of quick_gelu, gelu")
       for tower in ("vision", "text") for v in ("relu", "GELU", "", 3, None, ["gelu"])},
    **{f"layer_norm_eps={v!r}": ("text_config.layer_norm_eps", v, "'layer_norm_eps'.*between 0 and 1")
       for v in (0, -1e-5, 1.5, "1e-5", None, True, float("nan"), float("inf"))},
    "vision heads do not divide width": ("vision_config.num_attention_heads", 5, "a divisor of hidden_size=64"),
    "text heads do not divide width": ("text_config.num_attention_heads", 3, "a divisor of hidden_size=64"),
    "patch does not divide image": ("vision_config.patch_size", 7, "a divisor of image_size=32"),
    "image_size pair unequal": ("vision_config.image_size", [32, 16], "'image_size'"),
    **{f"eos_token_id={v!r}": ("text_config.eos_token_id", v, "'eos_token_id'.*a token id from 0 to 49407")
       for v in (-1, 49408, "49407", 1.5, True)},
    **{f"{s}={v!r}": (s, v, f"field '{s}' is") for s in ("text_config", "vision_config") for v in ([], "x", 3)},
    "model_type bert": ("model_type", "bert", "model_type 'bert' is not supported"),
    "model_type missing": ("model_type", None, "model_type None is not supported"),
}


@pytest.mark.parametrize("case", sorted(BAD_FIELDS))
def test_bad_config_field(tmp_path, case):
    field, value, msg = BAD_FIELDS[case]
    d = hf_folder(tmp_path, hf_config(**{field: value}))
    with pytest.raises(CheckpointError, match=r"config\.json.*" + msg):
        edgeclip.load_model(f"hf:{d}")


@pytest.mark.parametrize("text,msg", [("{", "not valid JSON"), ("\udcff", "not valid JSON"),
                                      ("[" * 100_000 + "]" * 100_000, "nests too deeply"),
                                      ("[]", "JSON list, not an object"), ('"clip"', "JSON str, not an object"),
                                      ("3", "JSON int, not an object"), ("null", "JSON NoneType, not an object")],
                         ids=["truncated", "not utf-8", "deep", "list", "str", "int", "null"])
def test_config_not_a_json_object(tmp_path, text, msg):
    d = tmp_path / "hf"
    d.mkdir()
    (d / "config.json").write_bytes(text.encode("utf-8", "surrogateescape"))
    with pytest.raises(CheckpointError, match=re.escape(msg)) as e:
        edgeclip.load_model(f"hf:{d}")
    assert "config.json" in str(e.value)


def test_good_config_loads_exactly(tmp_path, tiny):
    d = hf_folder(tmp_path, hf_config(**{"vision_config.image_size": [32, 32]}), weights=to_hf(tiny))
    model = edgeclip.load_model(f"hf:{d}")
    assert_same_weights(model, tiny)
    spec = model.spec
    assert (spec.vision.act, spec.text.eot_token_id, spec.vision.image_size) == ("quick_gelu", 49407, 32)


def test_spec_from_hf_config_refuses_a_non_object():
    with pytest.raises(CheckpointError, match="JSON list, not an object"):
        spec_from_hf_config([])


# ---------------------------------------------------------------------- preprocessor_config.json

GOOD_PREPROCESSOR = {"crop_size": {"height": 32, "width": 32}, "do_center_crop": True, "do_normalize": True,
                     "do_resize": True, "image_mean": [0.48145466, 0.4578275, 0.40821073],
                     "image_std": [0.26862954, 0.26130258, 0.27577711], "resample": 3,
                     "size": {"shortest_edge": 32}, "rescale_factor": 1 / 255, "do_convert_rgb": True}
BAD_PREPROCESSOR = {
    **{f"{k}={v!r}": (k, v) for k in ("image_mean", "image_std")
       for v in ([0.5, 0.5], [0.5] * 4, "0.5", [None, 0.5, 0.5], [float("nan"), 0.5, 0.5],
                 [float("inf"), 0.5, 0.5], [True, 0.5, 0.5], {"r": 0.5}, [1e9, 0.5, 0.5], None)},
    **{f"image_std={v!r}": ("image_std", v) for v in ([0, 0.5, 0.5], [-0.2, 0.5, 0.5], 0)},
    **{f"resample={v!r}": ("resample", v) for v in (4, 5, 9, -1, "bicubic", 3.0, None, True)},
    **{f"crop_size={v!r}": ("crop_size", v) for v in (0, -1, 5000, "32", {"height": 32}, {"h": 32, "w": 32},
                                                      {"height": 32, "width": 16}, 16, None, [32, 32])},
    **{f"size={v!r}": ("size", v) for v in (0, {"shortest_edge": 0}, {"shortest_edge": 16}, {"foo": 32}, "32",
                                            {"height": 16, "width": 16}, {"height": 32}, None, 10**6,
                                            {"shortest_edge": 32, "height": 32})},
    **{f"{k}={v!r}": (k, v) for k in ("do_resize", "do_rescale", "do_center_crop") for v in (False, "yes", 1)},
    **{f"do_normalize={v!r}": ("do_normalize", v) for v in ("no", 0, None)},
    **{f"rescale_factor={v!r}": ("rescale_factor", v) for v in (1.0, 0, "1/255", None)},
}


@pytest.mark.parametrize("case", sorted(BAD_PREPROCESSOR))
def test_bad_preprocessor_config(tmp_path, case):
    key, value = BAD_PREPROCESSOR[case]
    d = hf_folder(tmp_path, preprocessor={**GOOD_PREPROCESSOR, key: value})
    with pytest.raises(CheckpointError, match=rf"preprocessor_config\.json: field '{key}' is"):
        edgeclip.load_model(f"hf:{d}")


@pytest.mark.parametrize("text,msg", [("{", "not valid JSON"), ("[1, 2]", "JSON list, not an object"),
                                      ("[" * 100_000, "nests too deeply"), ("", "not valid JSON")],
                         ids=["truncated", "list", "deep", "empty"])
def test_preprocessor_config_not_a_json_object(tmp_path, text, msg):
    d = hf_folder(tmp_path, preprocessor=text)
    with pytest.raises(CheckpointError, match=r"preprocessor_config\.json.*" + re.escape(msg)):
        edgeclip.load_model(f"hf:{d}")


@pytest.mark.parametrize("changes,expected", [
    ({}, dict(interpolation="bicubic", mean=[0.48145466, 0.4578275, 0.40821073])),
    ({"resample": 2, "size": {"shortest_edge": 40}}, dict(interpolation="bilinear", resize_size=40)),
    ({"resample": 0, "crop_size": 32, "size": 32}, dict(interpolation="nearest")),
    ({"do_normalize": False}, dict(mean=[0.0, 0.0, 0.0], std=[1.0, 1.0, 1.0])),
    ({"image_mean": 0.5, "image_std": [1, 1, 1]}, dict(mean=[0.5, 0.5, 0.5], std=[1.0, 1.0, 1.0])),
], ids=["clip", "bilinear-resize-40", "int-sizes", "no-normalize", "scalar-mean"])
def test_good_preprocessor_config_reaches_the_spec(tmp_path, tiny, changes, expected):
    d = hf_folder(tmp_path, preprocessor={**GOOD_PREPROCESSOR, **changes}, weights=to_hf(tiny))
    model = edgeclip.load_model(f"hf:{d}")
    pre = model.spec.preprocess_config()
    assert {k: pre.get(k) for k in expected} == expected
    assert "resize_size" in expected or "resize_size" not in pre
    from edgeclip.runtime.preprocess import Preprocessor
    assert Preprocessor.from_config(pre).image_size == (32, 32)  # the runtime accepts what was loaded


# ----------------------------------------------------------------------------- sharded index maps

ESCAPING_SHARDS = ["../x.bin", "/etc/passwd", "sub/../../x.bin", "..", "a\\..\\..\\x.bin", "x\x00.bin", "",
                   "//server/share/x.bin", "./../x.bin"]


@pytest.mark.parametrize("index", ["model.safetensors.index.json", "pytorch_model.bin.index.json"])
@pytest.mark.parametrize("shard", ESCAPING_SHARDS, ids=[repr(s) for s in ESCAPING_SHARDS])
def test_shard_outside_the_folder_is_refused(tmp_path, index, shard):
    d = hf_folder(tmp_path)
    (tmp_path / "x.bin").write_bytes(b"outside")
    (d / index).write_text(json.dumps({"weight_map": {"a": "ok.bin", "b": shard}}))
    with pytest.raises(CheckpointError, match=rf"{re.escape(index)}: field 'weight_map' names the shard .*outside"):
        edgeclip.load_model(f"hf:{d}")


def test_shard_symlink_out_of_the_folder_is_refused(tmp_path):
    d = hf_folder(tmp_path)
    (tmp_path / "secret.bin").write_bytes(b"outside")
    (d / "link.bin").symlink_to(tmp_path / "secret.bin")
    (d / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": {"a": "link.bin"}}))
    with pytest.raises(CheckpointError, match="'link.bin', which is outside the model folder"):
        edgeclip.load_model(f"hf:{d}")


@pytest.mark.parametrize("weight_map", [None, [], "x.bin", {}, {"a": 3}, {"a": None}, {"a": ["x.bin"]}],
                         ids=["missing", "list", "str", "empty", "int", "null", "nested"])
def test_bad_weight_map(tmp_path, weight_map):
    d = hf_folder(tmp_path)
    index = {} if weight_map is None else {"weight_map": weight_map}
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=r"model\.safetensors\.index\.json: field 'weight_map' must be"):
        edgeclip.load_model(f"hf:{d}")


def test_index_not_json(tmp_path):
    d = hf_folder(tmp_path)
    (d / "pytorch_model.bin.index.json").write_text("{oops")
    with pytest.raises(CheckpointError, match=r"pytorch_model\.bin\.index\.json is not valid JSON"):
        edgeclip.load_model(f"hf:{d}")


def test_good_sharded_folder_loads_exactly(tmp_path, tiny):
    d = hf_folder(tmp_path)
    hf = to_hf(tiny)
    names = sorted(hf)
    shards = {"pytorch_model-00001.bin": names[::2], "sub/pytorch_model-00002.bin": names[1::2]}
    (d / "sub").mkdir()
    for shard, keys in shards.items():
        torch.save({k: hf[k] for k in keys}, d / shard)
    (d / "pytorch_model.bin.index.json").write_text(
        json.dumps({"weight_map": {k: s for s, keys in shards.items() for k in keys}}))
    assert_same_weights(edgeclip.load_model(f"hf:{d}"), tiny)


# ----------------------------------------------------------------- state dicts that are not tensors

NOT_STATE_DICTS = {
    "list": ([torch.ones(1)], "holds a list"),
    "int": (3, "holds a int"),
    "none": (None, "holds a NoneType"),
    "str": ("weights", "holds a str"),
    "int value": ({"w": 1}, "entry 'w' is a int"),
    "nested dict": ({"w": {"b": torch.ones(1)}}, "entry 'w' is a dict"),
    "list value": ({"w": [torch.ones(1)]}, "entry 'w' is a list"),
    "wrapped non-tensor": ({"state_dict": {"w": "x"}}, "entry 'w' is a str"),
    "int key": ({1: torch.ones(1)}, "under a int key"),
    "tuple": ((torch.ones(1),), "holds a tuple"),
}


@pytest.mark.parametrize("case", sorted(NOT_STATE_DICTS))
@pytest.mark.parametrize("container", ["torch.save", "torchscript"])
def test_not_a_state_dict_of_tensors(tmp_path, case, container):
    obj, msg = NOT_STATE_DICTS[case]
    path = tmp_path / "x.pt"
    if container == "torch.save":
        torch.save(obj, path)
    else:  # the same object pickled by torch's own pickler, as a TorchScript archive's data.pkl
        buf = tmp_path / "plain.pt"
        torch.save(obj, buf)
        with zipfile.ZipFile(buf) as z:
            entries = {n.split("/", 1)[1]: z.read(n) for n in z.namelist()}
        storages = {n[5:]: v for n, v in entries.items() if n.startswith("data/")}
        write_archive(path, entries["data.pkl"], storages)
    with pytest.raises(CheckpointError, match=re.escape(msg)) as e:
        edgeclip.load_model(f"openai:{path}")
    assert "state dict" in str(e.value) and str(path) in str(e.value)


@pytest.mark.parametrize("evil", sorted(EVIL))
def test_cli_export_of_a_scripted_archive_runs_no_code(tmp_path, tiny, evil, capsys):
    from edgeclip.cli import main

    marker = tmp_path / "pwned"
    path = scripted_archive(tmp_path / "clip.pt", to_openai(tiny) if evil == "tuple-state" else {"x.w": torch.ones(1)},
                            evil, marker)
    rc = main(["export", f"openai:{path}", "--target", "onnx", "--out", str(tmp_path / "out"), "--json"])
    error = json.loads(capsys.readouterr().out)["error"]
    assert rc == 2 and not marker.exists() and not (tmp_path / "out").exists()
    want = ("UnsafeCheckpointError", "restores itself") if evil == "tuple-state" else ("CheckpointError", "x.w")
    assert error["type"] == want[0] and want[1] in error["message"]


# ------------------------------------------- torch.save storages: declared sizes vs the bytes held
#
# torch.load(weights_only=True) allocates each storage at the size its pickle declares (legacy files)
# or trusts it over the record (zip files). These files are real torch.save output with the numbers
# edited in the pickle bytes; each must be refused before torch allocates anything.

import io  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402

from edgeclip.errors import HeadError  # noqa: E402
from edgeclip.heads.importers import import_head  # noqa: E402
from edgeclip.models.safe_pickle import MAX_PICKLE_OPS  # noqa: E402

SMALL = {"w": torch.arange(4.0), "h": torch.arange(6, dtype=torch.float16).reshape(2, 3)}
ONE = {"w": torch.arange(4.0)}  # one storage: legacy files store storages in no fixed order


def _int_op(n: int) -> bytes:
    """Pickle opcode pushing the int n (BININT, or LONG1 for larger values)."""
    if 0 <= n < 1 << 31:
        return b"J" + struct.pack("<i", n)
    raw = n.to_bytes((n.bit_length() + 8) // 8, "little", signed=True)
    return b"\x8a" + bytes([len(raw)]) + raw


def _storage_tuples(pkl: bytes) -> list:
    """[(ops of one storage record's tuple)] in the order the pickle builds them."""
    ops, out = list(pickletools.genops(pkl)), []
    for i, (op, _, _) in enumerate(ops):
        if op.name == "BINPERSID":
            end = next(j for j in range(i - 1, -1, -1) if ops[j][0].name == "TUPLE")
            start = max(j for j in range(end) if ops[j][0].name == "MARK")
            out.append(ops[start: i + 1])  # MARK ... TUPLE [BINPUT] BINPERSID
    return out


def patch_numel(pkl: bytes, numel: int, which: int = 0) -> bytes:
    """The pickle with storage record `which`'s element count replaced (found by opcode, not by guess)."""
    rec = _storage_tuples(pkl)[which]
    ints = [(pos, nxt[2]) for (op, _, pos), nxt in zip(rec, rec[1:]) if op.name in ("BININT1", "BININT2", "BININT")]
    start, end = ints[-1]
    return pkl[:start] + _int_op(numel) + pkl[end:]


def zip_entries(path: Path) -> Dict[str, bytes]:
    with zipfile.ZipFile(path) as z:
        return {n: z.read(n) for n in z.namelist()}


def write_zip(path: Path, entries: Dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as z:
        for n, data in entries.items():
            z.writestr(n, data)
    return path


def saved_zip(tmp_path: Path, change, sd=None) -> Path:
    """torch.save(sd) as a zip, then `change(entries)` applied to its records (names without the folder)."""
    src = tmp_path / "src.pt"
    torch.save(SMALL if sd is None else sd, src)
    entries = {n.split("/", 1)[1]: d for n, d in zip_entries(src).items()}
    entries = change(entries) or entries
    return write_zip(tmp_path / "bad.pt", {f"bad/{n}": d for n, d in entries.items()})


def legacy_parts(data: bytes) -> list:
    """A legacy torch.save file split as [magic, protocol, sys_info, main, keys, raw storages]."""
    f, bounds = io.BytesIO(data), [0]
    for _ in range(5):
        for _op in pickletools.genops(f):
            pass
        bounds.append(f.tell())
    return [data[a:b] for a, b in zip(bounds, bounds[1:])] + [data[bounds[-1]:]]


def saved_legacy(tmp_path: Path, change, sd=None) -> Path:
    src = tmp_path / "src.pt"
    torch.save(SMALL if sd is None else sd, src, _use_new_zipfile_serialization=False)
    parts = legacy_parts(src.read_bytes())
    parts = change(parts) or parts
    out = tmp_path / "bad.pt"
    out.write_bytes(b"".join(parts))
    return out


def _set(entries: dict, **changes):
    entries.update({k.replace("__", "/").replace("_dot_", "."): v for k, v in changes.items()})


def _legacy_main(parts, numel, which=0):
    parts[3] = patch_numel(parts[3], numel, which)


def _legacy_keys(parts, edit):
    keys = pickle.loads(parts[4])
    parts[4] = pickle.dumps(edit(keys), protocol=2)


def _zip_numel(numel, which=0):
    return lambda e: _set(e, data_dot_pkl=patch_numel(e["data.pkl"], numel, which))


def _zip_view_bomb(e):
    """The float tensor rebuilt as (100000, 100000) with stride (0, 0): 40 GB as float32, 16 bytes stored."""
    pkl = e["data.pkl"]
    rec = _storage_tuples(pkl)[0]
    ops = list(pickletools.genops(pkl))
    at = next(i for i, o in enumerate(ops) if o[2] == rec[-1][2]) + 1  # after BINPERSID
    body = _int_op(0) + _int_op(100_000) + _int_op(100_000) + b"\x86" + _int_op(0) + _int_op(0) + b"\x86"
    end = next(o[2] for o in ops[at:] if o[0].name == "NEWFALSE")  # offset, size, stride end at requires_grad
    e["data.pkl"] = pkl[: ops[at][2]] + body + pkl[end:]


INFLATED_ZIP = {  # name: (change to the records, message)
    "numel +1": (_zip_numel(5), "storage '0' declares 5 elements (20 bytes) but the file has 16 bytes"),
    "numel 2**30 (4 GiB)": (_zip_numel(1 << 30), "declares 1073741824 elements (4294967296 bytes) but the file has 16"),
    "numel 2**62": (_zip_numel(1 << 62), f"declares {1 << 62} elements"),
    "half numel 2**33": (_zip_numel(1 << 33, which=1), "storage '1' declares 8589934592 elements (17179869184 bytes)"),
    "record missing": (lambda e: e.pop("data/0") and None, "storage '0' declares 4 elements (16 bytes) but the file "
                                                          "has no record"),
    "record truncated": (lambda e: _set(e, data__0=e["data/0"][:8]), "(16 bytes) but the file has 8 bytes"),
    "record emptied": (lambda e: _set(e, data__1=b""), "storage '1' declares 6 elements (12 bytes) but the file has 0"),
    "view repeats its storage": (_zip_view_bomb, "of size (100000, 100000) (stride (0, 0), offset 0) reaches past or "
                                                 "repeats its storage '0' of 4 elements"),
    "data.pkl over 16 MiB": (lambda e: _set(e, data_dot_pkl=e["data.pkl"] + b"\0" * (17 << 20)), "at most 16 MiB"),
    "data.pkl missing": (lambda e: e.pop("data.pkl") and None, "data.pkl' (the object structure, at most 16 MiB) has "
                                                               "no such record"),
    "byteorder of 1 MiB": (lambda e: _set(e, byteorder=b"little" + b" " * (1 << 20)), "record 'bad/byteorder' is"),
    "opcode flood": (lambda e: _set(e, data_dot_pkl=b"\x80\x02" + b"N0" * (MAX_PICKLE_OPS // 2 + 1) + b"N."),
                     f"over {MAX_PICKLE_OPS} opcodes"),
    "module record": (lambda e: _set(e, data_dot_pkl=b"\x80\x02(X\x06\x00\x00\x00moduleNNNtQ."),
                      "unknown persistent record ('module', None, None, None)"),
}

INFLATED_LEGACY = {
    "numel 2**31 (8 GiB)": (lambda p: _legacy_main(p, 1 << 31), "declares 2147483648 elements (8589934592 bytes)"),
    "numel +1": (lambda p: _legacy_main(p, 5), "declares 5 elements (20 bytes) but the file has 16 bytes left", ONE),
    "numel +1, bytes appended": (lambda p: _legacy_main(p, 5) or p.append(b"\0" * 4),
                                 "declares 5 elements (20 bytes) but the file records 4 elements", ONE),
    "half numel 2**40": (lambda p: _legacy_main(p, 1 << 40, which=1), "declares 1099511627776 elements"),
    "numel -1": (lambda p: _legacy_main(p, -1), "malformed storage record"),
    "numel below the tensor": (lambda p: _legacy_main(p, 3), "a tensor of size (4,) (stride (1,), offset 0) "
                                                             "reaches past or repeats its storage", ONE),
    "storage bytes truncated": (lambda p: p.__setitem__(5, p[5][:-4]), "(16 bytes) but the file has 12 bytes left",
                                ONE),
    "no storage bytes": (lambda p: p.__setitem__(5, b""), "but the file has 0 bytes (the file ends)"),
    "key list lacks a storage": (lambda p: _legacy_keys(p, lambda k: k[:1]), "is declared but never stored"),
    "key list names an unknown storage": (lambda p: _legacy_keys(p, lambda k: k + ["77"]),
                                          "storage '77' is listed but never declared"),
    "key list repeats a storage": (lambda p: _legacy_keys(p, lambda k: k + k[:1]), "not distinct strings"),
    "key list is not a list": (lambda p: _legacy_keys(p, lambda k: {"a": 1}), "not distinct strings"),
    "protocol 1000": (lambda p: p.__setitem__(1, pickle.dumps(1000, protocol=2)), "protocol version 1000"),
    "main pickle over 16 MiB": (lambda p: p.__setitem__(2, pickle.dumps("x" * (17 << 20), protocol=2)),
                                "its pickled structure is over 16 MiB"),
    "opcode flood": (lambda p: p.__setitem__(2, b"\x80\x02" + b"N0" * (MAX_PICKLE_OPS // 2 + 1) + b"N."),
                     f"over {MAX_PICKLE_OPS} opcodes"),
    "storage record in sys_info": (lambda p: p.__setitem__(2, b"\x80\x02X\x01\x00\x00\x00aQ."),
                                   "a persistent record 'a' outside the main pickle"),
}


def _crafted(tmp_path: Path, fmt: str, case: str) -> Path:
    table, save = (INFLATED_ZIP, saved_zip) if fmt == "zip" else (INFLATED_LEGACY, saved_legacy)
    change, _, *sd = table[case]
    return save(tmp_path, change, *sd)


ALL_INFLATED = [("zip", c) for c in INFLATED_ZIP] + [("legacy", c) for c in INFLATED_LEGACY]


@pytest.mark.parametrize("fmt,case", ALL_INFLATED, ids=[f"{f}: {c}" for f, c in ALL_INFLATED])
def test_storage_sizes_are_checked_before_torch_load(tmp_path, fmt, case):
    path = _crafted(tmp_path, fmt, case)
    msg = (INFLATED_ZIP if fmt == "zip" else INFLATED_LEGACY)[case][1]
    with pytest.raises(CheckpointError, match=re.escape(msg)) as e:
        read_state_dict(path)
    assert str(path) in str(e.value)


def _valid_state_dict(fmt: str) -> dict:
    g = torch.Generator().manual_seed(3)
    base = torch.randn(5, 4, generator=g)
    sd = {"f32": torch.randn(3, 4, generator=g), "f16": torch.randn(7, generator=g).half(),
          "bf16": torch.randn(2, 2, generator=g).bfloat16(), "f64": torch.randn(3, generator=g).double(),
          "i64": torch.arange(-3, 3), "i8": torch.arange(-4, 4, dtype=torch.int8), "bool": torch.tensor([True, False]),
          "row view": base[2], "column view": base[:, 1], "shared base": base, "empty": torch.zeros(0, 3),
          "scalar": torch.tensor(2.5), "transposed": torch.randn(3, 2, generator=g).t()}
    if fmt == "zip":  # dtypes without a legacy storage class are saved untyped (_rebuild_tensor_v3)
        sd["u16"] = torch.arange(5).to(torch.uint16)
    return sd


@pytest.mark.parametrize("fmt", ["zip", "legacy"])
def test_valid_torch_files_load_exactly(tmp_path, fmt):
    sd = _valid_state_dict(fmt)
    path = tmp_path / "ok.pt"
    torch.save(sd, path, _use_new_zipfile_serialization=fmt == "zip")
    got = read_state_dict(path)
    assert list(got) == list(sd)
    for k, v in sd.items():
        assert got[k].dtype == v.dtype and got[k].shape == v.shape and torch.equal(got[k], v), k


@pytest.mark.parametrize("fmt", ["zip", "legacy"])
def test_valid_torch_clip_loads_exactly(tmp_path, tiny, fmt):
    path = tmp_path / "clip.pt"
    torch.save(to_openai(tiny), path, _use_new_zipfile_serialization=fmt == "zip")
    assert_same_weights(edgeclip.load_model(f"openai:{path}"), tiny)


HEAD_CASES = {"zip numel 2**30": ("zip", _zip_numel(1 << 30), "declares 1073741824 elements (4294967296 bytes)"),
              "zip record missing": ("zip", lambda e: e.pop("data/0") and None, "has no record"),
              "legacy numel 2**31": ("legacy", lambda p: _legacy_main(p, 1 << 31), "(8589934592 bytes) but the file "
                                                                                  "has 48 bytes left"),
              "legacy bytes truncated": ("legacy", lambda p: p.__setitem__(5, p[5][:-1]), "has 47 bytes left")}


@pytest.mark.parametrize("case", sorted(HEAD_CASES))
def test_head_files_storage_sizes_are_checked(tmp_path, case):
    fmt, change, msg = HEAD_CASES[case]
    head = {"weight": torch.arange(12.0).reshape(3, 4)}
    path = (saved_zip if fmt == "zip" else saved_legacy)(tmp_path, change, head)
    with pytest.raises(HeadError, match=re.escape(msg)) as e:
        import_head(path, classes=["a", "b", "c"])
    assert "storage '" in str(e.value) and str(path) in str(e.value)


@pytest.mark.parametrize("fmt", ["zip", "legacy"])
def test_valid_head_files_import_exactly(tmp_path, fmt):
    w, b = torch.randn(3, 4, generator=torch.Generator().manual_seed(0)), torch.tensor([0.5, -1.0, 2.0])
    path = tmp_path / "head.pt"
    torch.save({"fc": {"weight": w, "bias": b}}, path, _use_new_zipfile_serialization=fmt == "zip")
    head = import_head(path, classes=["a", "b", "c"], embed_dim=4)
    assert head.arrays["weight"].tolist() == w.double().tolist() and head.arrays["bias"].tolist() == b.tolist()


# The costly ones, read in a fresh process whose peak memory is measured: refused, and cheaply.
RSS_CASES = [("zip", "numel 2**30 (4 GiB)"), ("zip", "numel 2**62"), ("zip", "half numel 2**33"),
             ("zip", "view repeats its storage"), ("zip", "data.pkl over 16 MiB"), ("zip", "opcode flood"),
             ("legacy", "numel 2**31 (8 GiB)"), ("legacy", "half numel 2**40"), ("legacy", "main pickle over 16 MiB")]
_RSS_SCRIPT = r"""
import json, resource, sys
from edgeclip.errors import EdgeClipError
from edgeclip.heads.importers import import_head
from edgeclip.models.loaders import read_state_dict
peak = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
out, base = {}, peak()
for name, path in json.loads(sys.argv[1]).items():
    for reader, read in (("loader", read_state_dict), ("head", lambda p: import_head(p, classes=["a", "b"]))):
        try:
            read(path)
            err = "loaded"
        except EdgeClipError as e:
            err = f"{type(e).__name__}: {e}"
        out[f"{name} / {reader}"] = [err, peak() - base]
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def rss_results(tmp_path_factory):
    files = {}
    for fmt, case in RSS_CASES:
        d = tmp_path_factory.mktemp("rss")
        files[f"{fmt}: {case}"] = str(_crafted(d, fmt, case))
    run = subprocess.run([sys.executable, "-c", _RSS_SCRIPT, json.dumps(files)], capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("reader", ["loader", "head"])
@pytest.mark.parametrize("fmt,case", RSS_CASES, ids=[f"{f}: {c}" for f, c in RSS_CASES])
def test_refusing_inflated_storages_costs_little_memory(rss_results, fmt, case, reader):
    err, growth = rss_results[f"{fmt}: {case} / {reader}"]
    msg = (INFLATED_ZIP if fmt == "zip" else INFLATED_LEGACY)[case][1]
    if reader == "head" and case == "data.pkl over 16 MiB":
        msg = "its object structure (data.pkl) is 17 MiB"  # the head importer's own, earlier bound
    assert err.startswith("HeadError: " if reader == "head" else "CheckpointError: ") and msg in err, err
    assert growth < 500 << 20, f"peak memory grew by {growth >> 20} MiB"
