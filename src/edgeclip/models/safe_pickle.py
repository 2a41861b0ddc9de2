"""Tensors out of TorchScript archives without torch.jit: nothing in the archive is ever run.

`torch.jit.load` compiles the archive's `code/` and runs its scripted `__setstate__` methods, so a
crafted `.pt` can write files or worse on load. OpenAI's released CLIP `.pt` files are TorchScript
archives, so edgeclip reads them itself:

* `<prefix>/data.pkl` is unpickled by `RestrictedUnpickler`: `find_class` hands out only harmless
  stand-ins for the few globals a tensor archive uses (`torch._utils._rebuild_tensor_v2`,
  `torch._utils._rebuild_parameter`, `collections.OrderedDict`, `torch.<Dtype>Storage`, the list
  builders of `torch.jit._pickle`) and refuses every other global with `UnsafeCheckpointError`.
  `__torch__.*` classes (the scripted modules) become `ScriptStub`s, which only record the
  attribute dict BUILD passes them. Storage records are mapped to the bytes of
  `<prefix>/data/<key>`; the declared sizes are checked against those bytes.
* The stubs' tree is walked into a flat `name -> tensor` dict, with the dotted names
  `torch.jit.load(path).state_dict()` gives: a module's parameters and buffers are those its class
  declares in `code/` (`__parameters__ = [...]`, `__buffers__ = [...]`, read as text, never run).

Every stand-in object refuses BUILD (`__setstate__`), so a pickle cannot rewire them either.
"""
from __future__ import annotations

import io
import math
import pickle
import pickletools
import re
import reprlib
import zipfile
from collections import OrderedDict
from pathlib import Path

import torch

from ..errors import CheckpointError, EdgeClipError, UnsafeCheckpointError

MAX_PICKLE_BYTES = 16 << 20     # OpenAI ViT-L/14's data.pkl is well under 1 MiB
MAX_CODE_BYTES = 64 << 20       # all of code/*.py read for declarations, together
MAX_ENTRIES = 100_000           # zip entries; CLIP archives hold a few hundred
MAX_TENSORS = 100_000
MAX_DEPTH = 64                  # module nesting; CLIP is ~5 deep
MAX_DIMS = 32
MAX_INFLATION = 100             # uncompressed bytes per byte on disk, whole archive (zip bombs)

_STORAGE_DTYPES = {
    "FloatStorage": torch.float32, "DoubleStorage": torch.float64, "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16, "LongStorage": torch.int64, "IntStorage": torch.int32,
    "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool, "ComplexFloatStorage": torch.complex64,
    "ComplexDoubleStorage": torch.complex128,
}
_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
_KEY = re.compile(r"[A-Za-z0-9_]{1,64}\Z")
_CLASS = re.compile(r"^class ([A-Za-z_][A-Za-z0-9_]*)\(([A-Za-z_][A-Za-z0-9_.]*)\):", re.M)
_DECL = re.compile(r"^  (__parameters__|__buffers__) = \[([^\]\n]*)\]", re.M)
_QUOTED = re.compile(r'"([^"\\\n]*)"')
_RE_SAVE = ("re-save the weights from a trusted environment with torch.save(model.state_dict(), path) "
            "or as .safetensors")


class _Sealed:
    """Stand-ins refuse BUILD: a pickle may not set their attributes or call their __setstate__."""
    __slots__ = ()

    def __setstate__(self, state):
        raise UnsafeCheckpointError(f"the archive tries to change the state of {self!r} (pickle BUILD); "
                                    "a weights archive never does this")


class _Tensor(_Sealed):
    __slots__ = ("t",)

    def __init__(self, t):
        self.t = t


class _Storage(_Sealed):
    __slots__ = ("key", "dtype", "data")

    def __init__(self, key, dtype, data):
        self.key, self.dtype, self.data = key, dtype, data

    def numel(self) -> int:
        return self.data.numel() // self.dtype.itemsize


class _StorageType(_Sealed):
    __slots__ = ("name", "dtype")

    def __init__(self, name, dtype):
        self.name, self.dtype = name, dtype


class _Call(_Sealed):
    """An allowed global: a function of ours, given fresh to each unpickler so none can be altered."""
    __slots__ = ("name", "fn")

    def __init__(self, name, fn):
        self.name, self.fn = name, fn

    def __call__(self, *args):
        return self.fn(*args)

    def __repr__(self):
        return self.name


class ScriptStub:
    """A `__torch__.*` object of the archive: records its constructor args and BUILD state, runs nothing."""
    __slots__ = ("args", "state", "built")
    qualified = "__torch__"

    def __new__(cls, *args):
        obj = object.__new__(cls)
        obj.args, obj.state, obj.built = args, None, False
        return obj

    def __init__(self, *args):
        pass

    def __setstate__(self, state):
        if self.built:
            raise CheckpointError(f"'{self.qualified}' is built twice in the archive; the archive is corrupt")
        self.state, self.built = state, True

    def __repr__(self):
        return f"<{self.qualified}>"


def _ints(x, what: str) -> tuple:
    if not isinstance(x, tuple) or len(x) > MAX_DIMS or not all(type(v) is int and v >= 0 for v in x):
        raise CheckpointError(f"tensor {what} {x!r} is not a tuple of at most {MAX_DIMS} non-negative ints")
    return x


def _rebuild_tensor(storage, offset, size, stride, requires_grad, hooks, metadata=None):
    if not isinstance(storage, _Storage):
        raise CheckpointError(f"a tensor's storage is {type(storage).__name__}, not a storage record")
    size, stride = _ints(size, "size"), _ints(stride, "stride")
    if type(offset) is not int or offset < 0 or len(size) != len(stride):
        raise CheckpointError(f"tensor offset {offset!r} / size {size} / stride {stride} are inconsistent")
    if not isinstance(requires_grad, bool) or not isinstance(hooks, dict) or hooks:
        raise CheckpointError("a tensor carries backward hooks or a non-bool requires_grad; not a weights file")
    if metadata is not None and not isinstance(metadata, dict):
        raise CheckpointError(f"tensor metadata is {type(metadata).__name__}, not a dict")
    numel, have = math.prod(size), storage.numel()
    # The furthest element a view reaches must lie inside its storage; views that repeat elements
    # (more elements than the storage) are not weights and could blow up memory on .float()/.clone().
    if numel and (offset + sum((n - 1) * s for n, s in zip(size, stride)) >= have or numel > have):
        raise CheckpointError(f"a tensor of size {size} (stride {stride}, offset {offset}) reaches past its "
                              f"storage '{storage.key}' of {have} elements")
    flat = storage.data.view(storage.dtype) if storage.data.numel() else torch.empty(0, dtype=storage.dtype)
    return _Tensor(torch.as_strided(flat, size, stride, offset) if numel else torch.empty(size, dtype=storage.dtype))


def _rebuild_parameter(data, requires_grad, hooks, *rest):
    if not isinstance(data, _Tensor) or not isinstance(requires_grad, bool) or not isinstance(hooks, dict) \
            or hooks or rest:
        raise CheckpointError("a parameter record is malformed (not a tensor, or with hooks/state)")
    return data


def _ordered_dict(*args):
    if len(args) > 1 or (args and not isinstance(args[0], (list, tuple))):
        raise CheckpointError("collections.OrderedDict is called with unexpected arguments")
    return OrderedDict(*args)


def _build_list(items, *rest):
    if not isinstance(items, list) or rest:
        raise CheckpointError("a typed list record of the archive is malformed")
    return items


def _restore_type_tag(value, type_str=None):
    return value  # the tag only tells TorchScript a container's element type


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickles a TorchScript data.pkl into stand-ins; see the module docstring."""

    def __init__(self, data: bytes, archive: "_Archive"):
        super().__init__(io.BytesIO(data))
        self._archive = archive
        self._stubs: dict[str, type] = {}
        self._storages: dict[str, _Storage] = {}
        fns = {("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
               ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
               ("collections", "OrderedDict"): _ordered_dict,
               ("torch.jit._pickle", "restore_type_tag"): _restore_type_tag}
        fns.update({("torch.jit._pickle", f"build_{k}list"): _build_list
                    for k in ("int", "double", "bool", "tensor")})
        self._globals = {k: _Call(".".join(k), f) for k, f in fns.items()}
        self._globals.update({("torch", n): _StorageType(n, d) for n, d in _STORAGE_DTYPES.items()})

    def find_class(self, module, name):
        if (module, name) in self._globals:
            return self._globals[(module, name)]
        parts = str(module).split(".")
        if parts[0] == "__torch__" and all(_IDENT.match(p) for p in parts + [str(name)]):
            qualified = f"{module}.{name}"
            if qualified not in self._stubs:
                self._stubs[qualified] = type(str(name), (ScriptStub,), {"__slots__": (), "qualified": qualified})
            return self._stubs[qualified]
        raise UnsafeCheckpointError(
            f"{self._archive.path}: the archive's pickle asks for the Python global '{module}.{name}', "
            "which could run code; edgeclip only rebuilds tensors and plain containers from checkpoints. "
            f"If you trust the file, {_RE_SAVE}")

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise CheckpointError(f"unknown persistent record {str(pid)[:80]!r} (expected a storage record)")
        _, kind, key, location, numel = pid
        if not isinstance(kind, _StorageType) or not isinstance(key, str) or not _KEY.match(key) \
                or not isinstance(location, str) or len(location) > 64 or type(numel) is not int or numel < 0:
            raise CheckpointError(f"malformed storage record {str(pid)[:120]!r}")
        if key not in self._storages:
            self._storages[key] = self._archive.storage(key, kind.dtype, numel)
        storage = self._storages[key]
        if numel * kind.dtype.itemsize > storage.data.numel():
            raise CheckpointError(f"storage '{key}' is declared with {numel} {kind.name} elements but holds "
                                  f"{storage.data.numel()} bytes")
        return _Storage(key, kind.dtype, storage.data[: numel * kind.dtype.itemsize])


# ------------------------------------------------------------------------------------------ archive

class _Archive:
    """A checked view of the zip: bounded entry count and sizes, one TorchScript prefix."""

    def __init__(self, path: Path, z: zipfile.ZipFile):
        self.path, self.z = path, z
        infos = z.infolist()
        check_zip_bounds(path, infos)
        consts = [i.filename for i in infos if i.filename.rsplit("/", 1)[-1] == "constants.pkl"]
        if len(consts) != 1:
            raise CheckpointError(f"{path}: a TorchScript archive has one constants.pkl, this one has "
                                  f"{len(consts)}; the file is corrupt")
        self.prefix = consts[0][: -len("constants.pkl")]
        self.infos = {i.filename: i for i in infos}
        self._code: dict[str, dict] = {}
        self._code_bytes = 0
        self.visits = 0

    def read(self, name: str, limit: int) -> bytes:
        info = self.infos.get(self.prefix + name)
        if info is None:
            raise CheckpointError(f"{self.path}: the archive has no '{self.prefix + name}'; the file is truncated "
                                  "or not a TorchScript archive")
        if info.file_size > limit:
            raise CheckpointError(f"{self.path}: '{info.filename}' declares {info.file_size} bytes, more than the "
                                  f"{limit} edgeclip reads for it")
        data = self.z.read(info)  # checks the CRC: a corrupt entry raises here
        if len(data) != info.file_size:
            raise CheckpointError(f"{self.path}: '{info.filename}' holds {len(data)} bytes, not the "
                                  f"{info.file_size} its header declares")
        return data

    def storage(self, key: str, dtype, numel: int) -> _Storage:
        info = self.infos.get(f"{self.prefix}data/{key}")
        need = numel * dtype.itemsize
        if info is None or info.file_size < need:
            have = "no such entry" if info is None else f"{info.file_size} bytes"
            raise CheckpointError(f"{self.path}: storage '{key}' declares {numel} elements ({need} bytes) but the "
                                  f"archive has {have} for it; the file is truncated or corrupt")
        raw = bytearray(self.read(f"data/{key}", info.file_size))
        data = torch.frombuffer(raw, dtype=torch.uint8) if raw else torch.empty(0, dtype=torch.uint8)
        return _Storage(key, dtype, data)

    def declarations(self, qualified: str):
        """(base class, parameter names, buffer names) of a scripted class, from its code/ text."""
        module, _, name = qualified.rpartition(".")
        fname = f"code/{module.replace('.', '/')}.py"
        if fname not in self._code:
            self._code[fname] = {}
            info = self.infos.get(self.prefix + fname)
            if info is not None:
                self._code_bytes += info.file_size
                if self._code_bytes > MAX_CODE_BYTES:
                    raise CheckpointError(f"{self.path}: the archive's code/ is over {MAX_CODE_BYTES} bytes")
                text = self.read(fname, MAX_CODE_BYTES).decode("utf-8", "replace")
                self._code[fname] = _parse_classes(text)
        return self._code[fname].get(name)


def _parse_classes(text: str) -> dict:
    """class name -> (base, params, buffers) from TorchScript's printed code (read, never run)."""
    out = {}
    heads = list(_CLASS.finditer(text))
    for m, nxt in zip(heads, heads[1:] + [None]):
        block = text[m.end(): nxt.start() if nxt else len(text)]
        decl = {k: _QUOTED.findall(v) for k, v in _DECL.findall(block)}
        out[m.group(1)] = (m.group(2), decl.get("__parameters__", []), decl.get("__buffers__", []))
    return out


def check_zip_bounds(path: Path, infos: list) -> None:
    """Refuse zips with absurd entry counts, duplicate names or sizes no real file inflates to."""
    if len(infos) > MAX_ENTRIES:
        raise CheckpointError(f"{path}: the archive has {len(infos)} entries (over {MAX_ENTRIES}); not a checkpoint")
    names = [i.filename for i in infos]
    if len(set(names)) != len(names):
        raise CheckpointError(f"{path}: the archive holds two entries of the same name; the file is corrupt "
                              "or crafted")
    total, on_disk = sum(i.file_size for i in infos), path.stat().st_size
    if total > MAX_INFLATION * on_disk + (1 << 20):
        raise CheckpointError(f"{path}: the archive declares {total} uncompressed bytes for a {on_disk}-byte "
                              "file; refusing it as a zip bomb")


# ------------------------------------------------------------------------------------------- walk

def _collect(obj: ScriptStub, prefix: str, out: dict, arch: _Archive, depth: int) -> None:
    if depth > MAX_DEPTH:
        raise CheckpointError(f"{arch.path}: modules nest more than {MAX_DEPTH} deep (or refer to themselves) "
                              f"at '{prefix}'; not a model archive")
    arch.visits += 1  # shared sub-objects could make the walk exponential: bound the visits
    if arch.visits > MAX_TENSORS:
        raise CheckpointError(f"{arch.path}: more than {MAX_TENSORS} modules to visit; not a model archive")
    state = obj.state
    if not obj.built or not isinstance(state, dict):
        raise UnsafeCheckpointError(
            f"{arch.path}: module '{prefix.rstrip('.') or '<root>'}' ({obj.qualified}) restores itself through "
            "its own __setstate__, code inside the archive that edgeclip never runs, so its tensors cannot "
            f"be named. {_RE_SAVE}")
    for k in state:
        if not isinstance(k, str) or not k or "." in k or len(k) > 256:
            raise CheckpointError(f"{arch.path}: module '{obj.qualified}' has an attribute named {str(k)[:80]!r}")
    decl = arch.declarations(obj.qualified)
    names = decl[1] + decl[2] if decl else [k for k, v in state.items() if isinstance(v, _Tensor)]
    for name in names:
        value = state.get(name)
        if isinstance(value, _Tensor):
            out[prefix + name] = value.t
        elif value is not None:  # None: an unset optional buffer, absent from state_dict() too
            raise CheckpointError(f"{arch.path}: '{prefix + name}' is declared a parameter/buffer but holds "
                                  f"{type(value).__name__}")
        if len(out) > MAX_TENSORS:
            raise CheckpointError(f"{arch.path}: more than {MAX_TENSORS} tensors; not a model archive")
    for key, value in state.items():
        if isinstance(value, ScriptStub) and _is_module(value, arch):
            _collect(value, f"{prefix}{key}.", out, arch, depth + 1)


def _is_module(stub: ScriptStub, arch: _Archive) -> bool:
    decl = arch.declarations(stub.qualified)
    return decl is None or decl[0] == "Module"  # scripted classes that are not modules hold no state_dict


def _plain(obj, where: str, depth: int = 0, seen: list | None = None):
    """A pickled container (not a module) with tensor stand-ins replaced by tensors."""
    seen = [0] if seen is None else seen
    seen[0] += 1  # shared sub-containers could make the walk exponential: bound the visits
    if depth > MAX_DEPTH or seen[0] > MAX_TENSORS:
        raise CheckpointError(f"{where}: containers nest more than {MAX_DEPTH} deep or hold over {MAX_TENSORS} "
                              "objects; not a checkpoint")
    if isinstance(obj, _Tensor):
        return obj.t
    if isinstance(obj, dict):
        return {k: _plain(v, where, depth + 1, seen) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_plain(v, where, depth + 1, seen) for v in obj)
    if isinstance(obj, (str, bytes, int, float, bool, type(None))):
        return obj
    raise CheckpointError(f"{where}: the archive holds a {type(obj).__name__} where a state dict was expected")


def read_torchscript(path) -> dict:
    """`name -> tensor` of a TorchScript archive, the names `torch.jit.load(path).state_dict()` gives.

    A plain container pickled into the archive (not a scripted module) comes back with its tensors.
    """
    path = Path(path)
    try:
        with zipfile.ZipFile(path) as z:
            arch = _Archive(path, z)
            order = arch.read("byteorder", 16).strip() if arch.prefix + "byteorder" in arch.infos else b"little"
            if order != b"little":
                raise CheckpointError(f"{path}: byte order {order[:16]!r} archives are not supported (little only)")
            root = RestrictedUnpickler(arch.read("data.pkl", MAX_PICKLE_BYTES), arch).load()
            if isinstance(root, ScriptStub):
                out: dict = {}
                _collect(root, "", out, arch, 0)
                return out
            return _plain(root, str(path))
    except EdgeClipError:
        raise
    except RecursionError as e:
        raise CheckpointError(f"{path}: the archive nests too deeply to read; not a checkpoint") from e
    except MemoryError as e:
        raise CheckpointError(f"{path}: the archive needs more memory than is available to read") from e
    except Exception as e:  # zipfile, zlib and pickle raise many types on corrupt data
        raise CheckpointError(f"cannot read TorchScript archive {path}: {type(e).__name__}: {str(e)[:200]}; "
                              "the file is truncated or corrupt") from e


# --------------------------------------------------------------- torch.save files, before torch.load
#
# torch.load(weights_only=True) refuses code, not cost: it allocates every storage at the size its
# pickle declares before it reads a byte of it (legacy files), or trusts the declared size over the
# record it reads (zip files). So the opcodes of a file's pickles are read first, never run, and each
# storage record's declared size is checked against the bytes the file really holds for it.

MAX_PICKLE_OPS = 2_000_000      # a CLIP ViT-L state dict's data.pkl is ~15k opcodes
MAX_META_RECORD = 1 << 16       # byteorder, version, .format_version, ...: a few bytes each
TORCH_MAGIC = 0x1950A86A20F9469CFC6C   # torch.serialization.MAGIC_NUMBER: a legacy file's first pickle
TORCH_PROTOCOL = 1001
_ZIP_MAGIC = b"PK\x03\x04"      # torch.load's own test for its zip format: the first four bytes
_LITERALS = frozenset("INT BININT BININT1 BININT2 LONG LONG1 LONG4 STRING BINSTRING SHORT_BINSTRING BINBYTES "
                      "SHORT_BINBYTES BINBYTES8 BYTEARRAY8 UNICODE SHORT_BINUNICODE BINUNICODE BINUNICODE8 FLOAT "
                      "BINFLOAT".split())
_CONSTS = {"NONE": None, "NEWTRUE": True, "NEWFALSE": False, "EMPTY_TUPLE": ()}
_TUPLES = {"TUPLE1": 1, "TUPLE2": 2, "TUPLE3": 3}
_OPAQUE = object()              # a value the scan does not follow (built by code it never runs)
_REBUILDS = {("torch._utils", n) for n in ("_rebuild_tensor_v2", "_rebuild_tensor_v3", "_rebuild_qtensor")}
_FROM_TYPE = {("torch._tensor", "_rebuild_from_type_v2"), ("torch._utils", "_rebuild_from_type_v2")}
_BRIEF = reprlib.Repr()
_BRIEF.maxlevel, _BRIEF.maxstring, _BRIEF.maxother = 3, 40, 40


def _storage_sizes() -> dict:
    """Element size of each storage class a torch.save file may name (FloatStorage, QInt8Storage ...)."""
    sizes = {n: d.itemsize for n, d in _STORAGE_DTYPES.items()}
    try:
        sizes.update({n: d.itemsize for d, n in torch.storage._dtype_to_storage_type_map().items()})
    except Exception:  # a private map of torch's; the table above covers the usual types
        pass
    return sizes


_STORAGE_SIZES = _storage_sizes()


class _Global:
    __slots__ = ("module", "name")

    def __init__(self, module, name):
        self.module, self.name = module, name


class _StorageRef:
    __slots__ = ("key", "nbytes", "itemsize")

    def __init__(self, key, nbytes, itemsize):
        self.key, self.nbytes, self.itemsize = key, nbytes, itemsize


def _storage_itemsize(kind) -> int | None:
    if not isinstance(kind, _Global):
        return None
    if kind.name == "UntypedStorage" and kind.module in ("torch", "torch.storage"):
        return 1
    return _STORAGE_SIZES.get(kind.name) if kind.module in ("torch", "torch.cuda") else None


def _dtype_itemsize(g) -> int | None:
    dtype = getattr(torch, g.name, None) if isinstance(g, _Global) and g.module == "torch" else None
    return dtype.itemsize if isinstance(dtype, torch.dtype) else None


def _brief(x) -> str:
    """A short repr of a scanned value (bounded: lists may hold themselves)."""
    if isinstance(x, _Global):
        return f"{x.module}.{x.name}"
    return "<object>" if x is _OPAQUE else _BRIEF.repr(x)[:160]


class _OpScan:
    """Runs a pickle's opcodes on a stack of inert values, never its objects.

    Literals, tuples, lists, the memo and globals (by name) are followed, since storage records and
    tensor rebuilds are made of them; anything else becomes an opaque placeholder, its stack effect
    taken from pickletools' opcode table. Storage records go to `on_pid`, calls to `on_reduce`.
    """

    def __init__(self, where: str, on_pid, on_reduce):
        self.where, self.on_pid, self.on_reduce = where, on_pid, on_reduce
        self.ops = 0  # shared by the pickles of one file

    def run(self, f):
        """The value of the pickle read from `f` (opaque unless literal); `f` is left after its STOP."""
        self.stack, self.meta, self.memo = [], [], {}
        try:
            for op, arg, _ in pickletools.genops(f):
                self.ops += 1
                if self.ops > MAX_PICKLE_OPS:
                    raise CheckpointError(f"{self.where}: the pickle has over {MAX_PICKLE_OPS} opcodes; a "
                                          "state dict needs far fewer. Save a plain state dict")
                if op.name == "STOP":
                    return self._pop()
                self._step(op, arg)
        except (ValueError, EOFError, OverflowError) as e:  # what genops raises on broken opcodes
            raise CheckpointError(f"cannot read {self.where}: the pickle is malformed ({str(e)[:120]}); the file "
                                  f"is truncated or corrupt, or its pickled structure is over "
                                  f"{MAX_PICKLE_BYTES >> 20} MiB") from e
        raise CheckpointError(f"cannot read {self.where}: the pickle ends without STOP; the file is truncated")

    def _pop(self):
        if not self.stack:
            raise CheckpointError(f"{self.where}: the pickle pops an empty stack; the file is corrupt")
        return self.stack.pop()

    def _pop_mark(self) -> list:
        if not self.meta:
            raise CheckpointError(f"{self.where}: the pickle closes a MARK it never opened; the file is corrupt")
        items, self.stack = self.stack, self.meta.pop()
        return items

    def _step(self, op, arg) -> None:
        name, stack = op.name, self.stack
        if name in _LITERALS:
            stack.append(arg)
        elif name in _CONSTS:
            stack.append(_CONSTS[name])
        elif name == "MARK":  # as pickle does: the items above a mark are a fresh stack
            self.meta.append(stack)
            self.stack = []
        elif name in _TUPLES:
            items = [self._pop() for _ in range(_TUPLES[name])]
            self.stack.append(tuple(reversed(items)))
        elif name in ("TUPLE", "LIST"):
            items = self._pop_mark()
            self.stack.append(tuple(items) if name == "TUPLE" else items)
        elif name == "EMPTY_LIST":
            stack.append([])
        elif name in ("APPEND", "APPENDS"):
            items = self._pop_mark() if name == "APPENDS" else [self._pop()]
            target = self._pop()
            if isinstance(target, list):
                target.extend(items)
            self.stack.append(target)
        elif name in ("PUT", "BINPUT", "LONG_BINPUT", "MEMOIZE"):
            if not stack:
                raise CheckpointError(f"{self.where}: the pickle memoizes an empty stack; the file is corrupt")
            self.memo[len(self.memo) if name == "MEMOIZE" else arg] = stack[-1]
        elif name in ("GET", "BINGET", "LONG_BINGET"):
            stack.append(self.memo.get(arg, _OPAQUE))
        else:
            self._call_or_other(op, arg)

    def _call_or_other(self, op, arg) -> None:
        name = op.name
        if name == "GLOBAL":
            module, _, attr = arg.partition(" ")
            self.stack.append(_Global(module, attr))
        elif name == "STACK_GLOBAL":
            attr, module = self._pop(), self._pop()
            ok = isinstance(module, str) and isinstance(attr, str)
            self.stack.append(_Global(module, attr) if ok else _OPAQUE)
        elif name in ("BINPERSID", "PERSID"):
            self.stack.append(self.on_pid(self._pop() if name == "BINPERSID" else arg))
        elif name == "REDUCE":
            args, fn = self._pop(), self._pop()
            self.on_reduce(fn, args)
            self.stack.append(_OPAQUE)
        else:  # dicts, BUILD, NEWOBJ, FRAME ...: only their effect on the stack matters
            before = op.stack_before
            if pickletools.markobject in before:
                self._pop_mark()
                before = before[: before.index(pickletools.markobject)]
            for _ in before:
                self._pop()
            self.stack.extend([_OPAQUE] * len(op.stack_after))


def _check_rebuild(where: str, fn, args) -> None:
    """A tensor rebuilt from a storage must lie inside it and not repeat its elements (stride-0 views of
    a few bytes could otherwise stand for terabytes once copied)."""
    if isinstance(fn, _Global) and (fn.module, fn.name) in _FROM_TYPE and isinstance(args, tuple) and len(args) > 2:
        fn, args = args[0], args[2]  # a tensor subclass: torch calls args[0](*args[2])
    if not isinstance(fn, _Global) or (fn.module, fn.name) not in _REBUILDS:
        return
    if not isinstance(args, tuple) or len(args) < 4 or not isinstance(args[0], _StorageRef):
        raise CheckpointError(f"{where}: a tensor record ({fn.name}) is not built from a storage record; "
                              "the file is corrupt or crafted")
    ref, offset, size, stride = args[:4]
    itemsize = _dtype_itemsize(args[6]) if fn.name == "_rebuild_tensor_v3" and len(args) > 6 else ref.itemsize
    ok = isinstance(size, tuple) and isinstance(stride, tuple) and len(size) == len(stride) <= MAX_DIMS \
        and all(type(v) is int and v >= 0 for v in (offset, *size, *stride))
    if not itemsize:
        raise CheckpointError(f"{where}: a tensor on storage '{ref.key}' names the dtype {_brief(args[6])}, which "
                              "edgeclip does not know; re-save the weights as .safetensors")
    if not ok:
        raise CheckpointError(f"{where}: a tensor on storage '{ref.key}' has offset {_brief(offset)}, size "
                              f"{_brief(size)}, stride {_brief(stride)}: not non-negative integers; file is corrupt")
    have, numel = ref.nbytes // itemsize, math.prod(size)
    if numel and (numel > have or offset + sum((n - 1) * s for n, s in zip(size, stride)) >= have):
        raise CheckpointError(f"{where}: a tensor of size {size} (stride {stride}, offset {offset}) reaches past "
                              f"or repeats its storage '{ref.key}' of {have} elements; not a weights file")


def _storage_pid(where: str, pid, length: int):
    """(key, element size, numel, rest) of a storage record `('storage', Type, key, location, numel, ...)`."""
    if not (isinstance(pid, tuple) and len(pid) == length and pid[0] == "storage"):
        raise CheckpointError(f"{where}: unknown persistent record {_brief(pid)} (torch.save writes only "
                              "storage records); the file is corrupt or crafted")
    _, kind, key, location, numel = pid[:5]
    itemsize = _storage_itemsize(kind)
    if itemsize is None:
        raise CheckpointError(f"{where}: storage record {_brief(pid)} names the storage type {_brief(kind)}, "
                              "which edgeclip does not know; re-save the weights as .safetensors")
    if not isinstance(key, str) or not _KEY.match(key) or not isinstance(location, str) or len(location) > 64 \
            or type(numel) is not int or numel < 0:
        raise CheckpointError(f"{where}: malformed storage record {_brief(pid)}; the file is corrupt or crafted")
    return key, itemsize, numel, pid[5:]


def _too_big(path, key: str, numel: int, need: int, have: str) -> CheckpointError:
    return CheckpointError(f"{path}: storage '{key}' declares {numel} elements ({need} bytes) but the file has "
                           f"{have} for it; the file is truncated, corrupt or crafted. Re-download it")


def _check_zip_records(path: Path, infos: list) -> str:
    """The records' folder (torch names every record from the first one's); each record inside the file."""
    check_zip_bounds(path, infos)
    if not infos or "/" not in infos[0].filename:
        raise CheckpointError(f"{path}: a torch.save zip keeps its records in one folder, this one does not; "
                              "the file is corrupt or not a torch checkpoint")
    prefix, on_disk = infos[0].filename.split("/", 1)[0] + "/", path.stat().st_size
    for i in infos:
        stored = i.compress_type == zipfile.ZIP_STORED
        if i.header_offset + i.compress_size > on_disk or (stored and i.compress_size != i.file_size):
            raise CheckpointError(f"{path}: record '{i.filename}' declares {i.file_size} bytes ({i.compress_size} "
                                  f"on disk) but the {on_disk}-byte file cannot hold them; it is truncated or crafted")
        small = not i.filename.startswith(prefix + "data/") and i.filename != prefix + "data.pkl"
        if small and i.file_size > MAX_META_RECORD:  # torch reads byteorder, version ... whole
            raise CheckpointError(f"{path}: record '{i.filename}' is {i.file_size} bytes; torch's own records are "
                                  f"a few bytes (limit {MAX_META_RECORD}). The file is corrupt or crafted")
    return prefix


def _check_zip(path: Path, z: zipfile.ZipFile) -> None:
    """Every storage data.pkl names has its record, at least as large as the storage declares."""
    infos = z.infolist()
    prefix = _check_zip_records(path, infos)
    by_name = {i.filename: i for i in infos}
    pkl = by_name.get(prefix + "data.pkl")
    if pkl is None or pkl.file_size > MAX_PICKLE_BYTES:
        have = "no such record" if pkl is None else f"{pkl.file_size} bytes"
        raise CheckpointError(f"{path}: '{prefix}data.pkl' (the object structure, at most {MAX_PICKLE_BYTES >> 20} "
                              f"MiB) has {have}; the file is corrupt or not a plain state dict")
    where, need = f"{path} ({prefix}data.pkl)", {}

    def on_pid(pid):
        key, itemsize, numel, _ = _storage_pid(where, pid, 5)
        info, nbytes = by_name.get(f"{prefix}data/{key}"), numel * itemsize
        if info is None or nbytes > info.file_size:
            raise _too_big(path, key, numel, nbytes, "no record" if info is None else f"{info.file_size} bytes")
        need[key] = max(need.get(key, 0), nbytes)
        return _StorageRef(key, nbytes, itemsize)

    data = z.read(pkl)
    _OpScan(where, on_pid, lambda fn, args: _check_rebuild(where, fn, args)).run(io.BytesIO(data))
    if sum(need.values()) > path.stat().st_size * MAX_INFLATION:
        raise CheckpointError(f"{path}: its storages declare {sum(need.values())} bytes in all, more than a "
                              f"{path.stat().st_size}-byte file can hold; refusing it as crafted")


def _legacy_pid(where: str, storages: dict):
    """persistent_load of a legacy main pickle: records each storage's declared size, checks views."""
    def on_pid(pid):
        if isinstance(pid, tuple) and pid[:1] == ("module",):
            return _OPAQUE  # a whole nn.Module saved by class: torch hands back the class, no storage
        key, itemsize, numel, (view,) = _storage_pid(where, pid, 6)
        first = storages.setdefault(key, (itemsize, numel))
        if first != (itemsize, numel):
            raise CheckpointError(f"{where}: storage '{key}' is declared twice with different types or sizes; "
                                  "the file is corrupt or crafted")
        if view is None:
            return _StorageRef(key, numel * itemsize, itemsize)
        ok = isinstance(view, tuple) and len(view) == 3 and isinstance(view[0], str) \
            and all(type(v) is int and v >= 0 for v in view[1:])
        if not ok or view[1] + view[2] > numel:
            raise CheckpointError(f"{where}: storage '{key}' of {numel} elements has the view {_brief(view)}, "
                                  "which is not inside it; the file is corrupt or crafted")
        return _StorageRef(view[0], view[2] * itemsize, itemsize)
    return on_pid


def _check_legacy_bytes(path: Path, f, pos: int, keys, storages: dict) -> None:
    """After the pickles: each storage's bytes, in `keys` order, an 8-byte element count before each."""
    if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys) or len(set(keys)) != len(keys):
        raise CheckpointError(f"{path}: the list of storage keys is {_brief(keys)}, not distinct strings; "
                              "the file is corrupt or crafted")
    odd = sorted(set(storages) ^ set(keys))
    if odd:
        key = odd[0]
        raise CheckpointError(f"{path}: storage '{key}' is {'listed' if key in keys else 'declared'} but never "
                              f"{'declared' if key in keys else 'stored'}; the file is truncated, corrupt or crafted")
    size = path.stat().st_size
    for key in keys:
        itemsize, numel = storages[key]
        f.seek(pos)
        head = f.read(8)
        have = max(0, size - pos - 8)
        if len(head) < 8 or numel * itemsize > have:
            raise _too_big(path, key, numel, numel * itemsize,
                           f"{have} bytes left" if len(head) == 8 else "0 bytes (the file ends)")
        count = int.from_bytes(head, "little", signed=True)
        if count != numel:  # torch would refuse it too, but only after allocating the declared size
            raise CheckpointError(f"{path}: storage '{key}' declares {numel} elements ({numel * itemsize} bytes) but "
                                  f"the file records {count} elements for it; the file is corrupt or crafted")
        pos += 8 + numel * itemsize


def _check_legacy(path: Path) -> int | None:
    """Checks a legacy (non-zip) torch.save file: magic, protocol, sys_info, main pickle, storage keys, bytes.

    Returns None when it is one, else the length of its first pickle: all torch.load reads of a file
    that does not start with the magic number before refusing it.
    """
    storages: dict = {}
    where = f"{path} (legacy torch file)"
    scan = _OpScan(where, _no_pid(where), lambda fn, args: None)
    with open(path, "rb") as f:
        buf = io.BytesIO(f.read(MAX_PICKLE_BYTES))  # every pickle must end in these: they are bounded
        magic = scan.run(buf)
        if type(magic) is not int or magic != TORCH_MAGIC:
            return buf.tell()
        protocol = scan.run(buf)
        if type(protocol) is not int or protocol != TORCH_PROTOCOL:
            raise CheckpointError(f"{where}: protocol version {_brief(protocol)}, not {TORCH_PROTOCOL}; not a "
                                  "torch.save file edgeclip can read. Re-save it with torch.save")
        scan.run(buf)  # sys_info: torch reads and ignores it
        scan.on_pid, scan.on_reduce = _legacy_pid(where, storages), lambda fn, args: _check_rebuild(where, fn, args)
        scan.run(buf)
        scan.on_pid, scan.on_reduce = _no_pid(where), lambda fn, args: None
        keys = scan.run(buf)
        _check_legacy_bytes(path, f, buf.tell(), keys, storages)
    return None


def _no_pid(where: str):
    def on_pid(pid):
        raise CheckpointError(f"{where}: a persistent record {_brief(pid)} outside the main pickle; the file "
                              "is corrupt or crafted")
    return on_pid


def checked_torch_source(path):
    """What to hand torch.load for the untrusted torch file `path`, once what loading it costs is bounded.

    Zip files (torch.save since 1.6): every storage data.pkl declares needs a record of at least its size,
    records lie inside the file, data.pkl is at most MAX_PICKLE_BYTES. Legacy files: the pickles end in
    the first MAX_PICKLE_BYTES and each storage's declared size matches the bytes the file holds for
    it. Both: at most MAX_PICKLE_OPS opcodes, tensors inside their storages. Returns `str(path)`, or for
    a file that is neither (a bare pickle) only its first pickle, as torch.load reads no more of it.
    Raises CheckpointError naming the storage key and the declared and available bytes.
    """
    path = Path(path)
    try:
        with open(path, "rb") as f:
            is_zip = f.read(4) == _ZIP_MAGIC
        if is_zip:
            with zipfile.ZipFile(path) as z:
                _check_zip(path, z)
            return str(path)
        first = _check_legacy(path)
        if first is None:
            return str(path)
        with open(path, "rb") as f:
            return io.BytesIO(f.read(first))
    except EdgeClipError:
        raise
    except MemoryError as e:
        raise CheckpointError(f"{path}: the file needs more memory than is available to check") from e
    except Exception as e:  # zipfile, zlib and OSError raise many types on corrupt data
        raise CheckpointError(f"cannot read torch file {path}: {type(e).__name__}: {str(e)[:200]}; the file is "
                              "truncated or corrupt") from e
