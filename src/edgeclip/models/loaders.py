"""`load_model(uri)`: checkpoints in the formats users have, mapped onto our ClipModel.

URIs: `hf:DIR`, `openai:FILE`, `open_clip:ARCH` and `apple:ARCH` (+ checkpoint=FILE), `random:SPEC` (+ seed=),
`builtin:NAME`. A bare directory or file path is routed to hf:/openai: by what it contains.
"""
from __future__ import annotations

import json
import math
import pickle
import re
import warnings
import zipfile
from importlib import resources
from pathlib import Path

import torch

from .._files import read_regular
from ..errors import CheckpointError, SpecError, UnknownModelError, UnsafeCheckpointError, WeightShapeError
from ..specs import ModelSpec, get_spec, list_specs
from .clip import ClipModel
from .convert import from_apple_mobileclip, from_open_clip_timm, from_hf, from_openai, unwrap_state_dict
from .safe_pickle import check_zip_bounds, checked_torch_source, read_torchscript

SCHEMES = ("hf", "openai", "open_clip", "apple", "random", "builtin")
BUILTINS = ("tiny",)
HF_ACT = {"quick_gelu": "quick_gelu", "gelu": "gelu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh",
          "gelu_fast": "gelu_tanh"}


def load_model(uri: str, *, spec=None, checkpoint=None, seed: int = 0) -> ClipModel:
    """Load a model (eval mode, float32) from a URI; see the module docstring for the forms."""
    scheme, _, rest = str(uri).partition(":")
    if not rest or scheme not in SCHEMES:
        return _load_bare(str(uri), spec=spec)
    if scheme == "hf":
        model = load_hf(rest, spec=spec)
    elif scheme == "openai":
        model = load_openai(rest, spec=spec)
    elif scheme == "open_clip":
        model = load_open_clip(rest, checkpoint=checkpoint, spec=spec)
    elif scheme == "apple":
        model = load_apple(rest, checkpoint=checkpoint, spec=spec)
    elif scheme == "random":
        model = ClipModel(get_spec(spec if spec is not None else rest)).init_random(seed)
    else:
        model = load_builtin(rest)
    model.source = str(uri)  # where the weights came from (export uses a built-in model's own data)
    return model.float().eval()


def _load_bare(uri: str, spec=None) -> ClipModel:
    p = Path(uri)
    if p.is_dir() and ((p / "config.json").is_file() or (p / OPEN_CLIP_CONFIG).is_file()):
        return load_hf(uri, spec=spec).eval()
    if p.is_file():
        return load_openai(uri, spec=spec).eval()
    raise UnknownModelError(
        f"unknown model '{uri}'. Use one of: hf:DIR, openai:FILE, open_clip:ARCH (with checkpoint=FILE), "
        f"random:SPEC, builtin:NAME. Known specs: {', '.join(list_specs())}; built-in models: "
        f"{', '.join('builtin:' + b for b in BUILTINS)}"
    )


# ---------------------------------------------------------------------------------------------- files

def read_state_dict(path: Path) -> dict:
    """Tensors from .safetensors, a pickle (weights_only) or a TorchScript archive (no code run)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint file not found: {path}")
    if path.suffix == ".safetensors":
        from .._lazy import require

        st = require("safetensors.torch", "reading .safetensors checkpoints")
        try:
            sd = st.load_file(str(path))
        except Exception as e:
            raise CheckpointError(f"cannot read {path}: {e}; the file is corrupt or not safetensors") from e
        return unwrap_state_dict(sd, source=path)  # DDP's 'module.' prefix, as for pickles
    if _is_torchscript(path):
        # OpenAI's released .pt files are TorchScript archives; torch.jit.load would run the archive's
        # scripted __setstate__ code, so they are read by a restricted unpickler instead.
        return unwrap_state_dict(read_torchscript(path), source=path)
    return unwrap_state_dict(_weights_only_load(path), source=path)


def _weights_only_load(path: Path):
    """torch.load(weights_only=True) for plain pickles, zipped (torch.save) or legacy (non-zip).

    weights_only bounds what a file may run, not what it may cost: its storages' declared sizes are
    checked against the bytes the file holds first (checked_torch_source), as torch allocates them.
    """
    source = checked_torch_source(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.load(source, map_location="cpu", weights_only=True)
    except Exception as e:
        found = re.search(r"GLOBAL ([\w.]+)", str(e))  # torch's message names the refused global
        if isinstance(e, pickle.UnpicklingError) and found:
            raise UnsafeCheckpointError(
                f"{path} asks to rebuild the Python object '{found.group(1)}', which could run code; "
                "edgeclip never unpickles arbitrary objects (weights-only loading). If you trust the file, "
                "re-save the weights with torch.save(model.state_dict(), path) or as .safetensors"
            ) from e
        raise CheckpointError(
            f"cannot read {path} as a weights-only checkpoint ({type(e).__name__}: {str(e)[:200]}). "
            "edgeclip never unpickles arbitrary objects; re-save the weights with "
            "torch.save(model.state_dict(), path) or as .safetensors"
        ) from e


def _is_torchscript(path: Path) -> bool:
    """A zip with a constants.pkl at any depth (torch.load's own test, made stricter); zips are bounded."""
    try:
        if not zipfile.is_zipfile(path):
            return False
        with zipfile.ZipFile(path) as z:
            infos = z.infolist()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as e:
        raise CheckpointError(f"{path} looks like a zip archive but cannot be opened ({e}); "
                              "the file is truncated or corrupt") from e
    check_zip_bounds(path, infos)
    return any(i.filename.rsplit("/", 1)[-1] == "constants.pkl" for i in infos)


def load_weights(model: ClipModel, ours: dict, origin: dict) -> ClipModel:
    """Copy converted tensors into the model, naming the source key of any disagreement."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in ours and k not in ("logit_scale", "logit_bias")]
    if missing:
        raise CheckpointError(
            f"checkpoint lacks {len(missing)} tensors the '{model.spec.name}' model needs, e.g. "
            f"{', '.join(missing[:5])}; check that the spec matches the checkpoint"
        )
    extra = [origin.get(k, k) for k in ours if k not in expected]
    if extra:
        raise WeightShapeError(
            f"checkpoint has tensors the '{model.spec.name}' spec has no place for, e.g. {', '.join(extra[:5])} "
            "(more layers, or a head the spec lacks); check the spec"
        )
    for k in ("logit_scale", "logit_bias"):  # stored as (1,) by transformers, () by OpenAI
        if k in ours and ours[k].numel() == 1:
            ours[k] = ours[k].reshape(())
    for k, v in ours.items():
        if tuple(v.shape) != tuple(expected[k].shape):
            raise WeightShapeError(
                f"checkpoint key '{origin.get(k, k)}' has shape {tuple(v.shape)} but spec '{model.spec.name}' "
                f"expects {tuple(expected[k].shape)} for it; pick the spec that matches this checkpoint"
            )
    model.load_state_dict({k: v.float() for k, v in ours.items()}, strict=False)
    return model


# ------------------------------------------------------------------------------------ OpenAI layout

def infer_openai_dims(ours: dict) -> dict:
    """Architecture numbers readable from OpenAI-layout weights, each with the key it came from."""
    def count(prefix):
        return len({m.group(1) for k in ours if (m := re.match(prefix + r"(\d+)\.", k))})

    try:
        conv, vpos = ours["visual.patch_embed.weight"], ours["visual.pos_embed"]
        grid = math.isqrt(vpos.shape[0] - 1)
        return {
            "vision.width": (conv.shape[0], "visual.conv1.weight"),
            "vision.patch_size": (conv.shape[-1], "visual.conv1.weight"),
            "vision.image_size": (grid * conv.shape[-1], "visual.positional_embedding"),
            "vision.layers": (count(r"visual\.blocks\."), "visual.transformer.resblocks.*"),
            "vision.mlp_dim": (ours["visual.blocks.0.mlp.fc1.weight"].shape[0], "visual.transformer.resblocks.0.mlp.c_fc.weight"),
            "embed_dim": (ours["visual.proj.weight"].shape[0], "visual.proj"),
            "text.width": (ours["text.ln_final.weight"].shape[0], "ln_final.weight"),
            "text.context_length": (ours["text.pos_embed"].shape[0], "positional_embedding"),
            "text.vocab_size": (ours["text.token_embed.weight"].shape[0], "token_embedding.weight"),
            "text.layers": (count(r"text\.blocks\."), "transformer.resblocks.*"),
            "text.mlp_dim": (ours["text.blocks.0.mlp.fc1.weight"].shape[0], "transformer.resblocks.0.mlp.c_fc.weight"),
        }
    except KeyError as e:
        raise CheckpointError(
            f"not an OpenAI/open_clip ViT CLIP checkpoint: no '{e.args[0]}' (ResNet CLIPs are not supported)"
        ) from None


def _spec_value(spec: ModelSpec, dotted: str):
    obj = spec
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def check_dims(spec: ModelSpec, dims: dict) -> None:
    bad = [f"checkpoint key '{key}' gives {field}={val}, spec '{spec.name}' says {_spec_value(spec, field)}"
           for field, (val, key) in dims.items() if _spec_value(spec, field) != val]
    if bad:
        raise WeightShapeError("checkpoint and spec disagree: " + "; ".join(bad) +
                               ". Pass the spec that matches the checkpoint (or none, to infer it)")


def spec_from_dims(dims: dict, act: str) -> ModelSpec:
    """A shipped spec whose numbers match the weights, else a 'custom' spec built from them."""
    for name in list_specs():
        s = get_spec(name)
        if s.family == "clip" and all(_spec_value(s, f) == v for f, (v, _) in dims.items()):
            return s.replace(vision={"act": act}, text={"act": act})
    base = get_spec("ViT-B-32").to_dict()
    base.update(name="custom", description="inferred from checkpoint weights", embed_dim=dims["embed_dim"][0])
    for field, (val, _) in dims.items():
        tower, _, key = field.partition(".")
        if key:
            base[tower][key] = val
    for tower in ("vision", "text"):
        base[tower]["heads"] = max(1, base[tower]["width"] // 64)  # OpenAI's convention: 64-wide heads
        base[tower]["act"] = act
    base["preprocess"]["image_size"] = base["vision"]["image_size"]
    base["tokenizer"]["context_length"] = base["text"]["context_length"]
    return ModelSpec.from_dict(base)


def _build_openai(sd: dict, spec, act: str) -> ClipModel:
    ours, origin = from_openai(sd)
    dims = infer_openai_dims(ours)
    if spec is None:
        spec = spec_from_dims(dims, act)
    else:
        spec = get_spec(spec)
        check_dims(spec, dims)
    return load_weights(ClipModel(spec), ours, origin)


def load_openai(path: str, spec=None) -> ClipModel:
    """OpenAI CLIP .pt (state dict or TorchScript) and Long-CLIP checkpoints (QuickGELU)."""
    return _build_openai(read_state_dict(Path(path)), spec, act="quick_gelu")


def load_open_clip(arch: str, checkpoint=None, spec=None) -> ClipModel:
    """open_clip ViT state dicts. open_clip's convention: '-quickgelu' archs use QuickGELU, others GELU."""
    if checkpoint is None:
        raise CheckpointError(
            f"open_clip:{arch} needs checkpoint=PATH (edgeclip downloads nothing); "
            "e.g. load_model('open_clip:ViT-B-32', checkpoint='open_clip_pytorch_model.bin')"
        )
    act = "quick_gelu" if arch.lower().endswith("-quickgelu") else "gelu"
    base = re.sub(r"-quickgelu$", "", arch, flags=re.I)
    chosen = get_spec(spec if spec is not None else base).replace(vision={"act": act}, text={"act": act})
    sd = read_state_dict(Path(checkpoint))
    if chosen.vision.kind != "vit" or any(k.startswith("visual.trunk.") for k in sd):
        return _build_open_clip_timm(sd, chosen, arch)
    return _build_openai(sd, chosen, act)


def _build_open_clip_timm(sd: dict, spec: ModelSpec, arch: str) -> ClipModel:
    """A timm-trunk open_clip model (MobileCLIP): the trunk as saved, train-time (multi-branch) or
    already reparameterized (timm's `reparam_conv` keys), the text tower in OpenAI layout."""
    ours, origin = from_open_clip_timm(sd, arch)
    if any(".reparam_conv." in k for k in ours) and not spec.vision.config.get("reparameterized"):
        spec = spec.replace(vision={"config": {**spec.vision.config, "reparameterized": True}})
    return load_weights(ClipModel(spec), ours, origin)


def apple_text(text) -> dict:
    """Apple's text encoder for a spec's text tower: the same numbers, in Apple's layout (the
    `repmixer` tower kind; a plain transformer is that kind with attention in every layer)."""
    if text.kind == "repmixer":
        return {}
    return {"kind": "repmixer", "config": {"layer_types": ["attention"] * text.layers, "kernel_size": 11,
                                           "convffn_ratio": text.mlp_dim / text.width, "layer_scale_init": 1e-5,
                                           "norm": "layer_norm_fp32", "pos_embedding": True}}


def load_apple(arch: str, checkpoint=None, spec=None) -> ClipModel:
    """Apple's ml-mobileclip checkpoints (mobileclip_s0.pt, _s1, _s2): FastViT-MCi image encoder and
    Apple's text encoder, train-time or reparameterized."""
    if checkpoint is None:
        raise CheckpointError(f"apple:{arch} needs checkpoint=PATH (edgeclip downloads nothing); e.g. "
                              "load_model('apple:MobileCLIP-S0', checkpoint='mobileclip_s0.pt')")
    chosen = get_spec(spec if spec is not None else arch)
    if chosen.vision.kind != "mci":
        raise CheckpointError(f"apple:{arch}: only Apple's MCi checkpoints (MobileCLIP-S0, -S1, -S2) load in "
                              "Apple's layout; for MobileCLIP-B use the open_clip checkpoint (open_clip:MobileCLIP-B)")
    ours, origin = from_apple_mobileclip(read_state_dict(Path(checkpoint)))
    text = apple_text(chosen.text)
    changes = {"text": text} if text else {}
    if any(".reparam_conv." in k for k in ours if k.startswith("visual.")):
        changes["vision"] = {"config": {**chosen.vision.config, "reparameterized": True}}
    if any(".reparam_conv." in k for k in ours if k.startswith("text.")):
        text_cfg = (changes.get("text") or {}).get("config", chosen.text.config)
        changes["text"] = {**changes.get("text", {}), "config": {**text_cfg, "reparameterized": True}}
    return load_weights(ClipModel(chosen.replace(**changes) if changes else chosen), ours, origin)


# ----------------------------------------------------------------------------------- transformers

MAX_JSON_BYTES = 16 << 20  # config / index files are kilobytes; bound what a crafted one costs
MAX_SHARDS = 10_000
# Sane maxima for transformers config numbers (largest released CLIPs are far below these).
HF_MAX = {"hidden_size": 16384, "intermediate_size": 65536, "num_hidden_layers": 256, "num_attention_heads": 1024,
          "image_size": 4096, "patch_size": 4096, "vocab_size": 1_000_000, "max_position_embeddings": 4096,
          "projection_dim": 16384}
# PIL resample codes transformers stores; the runtime resizes with these.
HF_RESAMPLE = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic"}


def _read_json(f: Path) -> dict:
    """A JSON object from a model folder, or CheckpointError naming the file."""
    data = read_regular(f, CheckpointError, "model folder file", MAX_JSON_BYTES)
    try:
        obj = json.loads(data.decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{f} is not valid JSON: {e}; fix or re-download the file") from e
    except RecursionError as e:
        raise CheckpointError(f"{f} nests too deeply to read; not a transformers config file") from e
    if not isinstance(obj, dict):
        raise CheckpointError(f"{f} holds a JSON {type(obj).__name__}, not an object; fix or re-download the file")
    return obj


def _hf_files(d: Path) -> list[Path]:
    for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if (d / index).is_file():
            return _shards(d, d / index)
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (d / name).is_file():
            return [d / name]
    raise CheckpointError(f"{d} has no model.safetensors or pytorch_model.bin; is it a transformers model folder?")


def _shards(d: Path, index: Path) -> list[Path]:
    """The shard files an index names; each must be a plain file name inside the folder."""
    wm = _read_json(index).get("weight_map")
    if not isinstance(wm, dict) or not wm or not all(isinstance(v, str) for v in wm.values()):
        raise CheckpointError(f"{index}: field 'weight_map' must be a non-empty object of tensor name -> shard "
                              "file name; fix or re-download the index")
    shards = sorted(set(wm.values()))
    if len(shards) > MAX_SHARDS:
        raise CheckpointError(f"{index}: field 'weight_map' names {len(shards)} shards (over {MAX_SHARDS})")
    root = d.resolve()
    for s in shards:
        p = Path(s)
        if not s or "\\" in s or "\x00" in s or p.is_absolute() or ".." in p.parts \
                or not (d / p).resolve().is_relative_to(root):
            raise CheckpointError(f"{index}: field 'weight_map' names the shard {s!r}, which is outside the model "
                                  f"folder {d}; shards must be files inside it")
    return [d / s for s in shards]


def _bad(where: str, key: str, value, want: str):
    return CheckpointError(f"{where}: field '{key}' is {value!r}; it must be {want}. Fix the file, or pass spec=...")


def _hf_int(c: dict, key: str, default, where: str, allow_pair: bool = False) -> int:
    v = c.get(key, default)
    if allow_pair and isinstance(v, list) and len(v) in (1, 2) and len(set(map(repr, v))) == 1:
        v = v[0]  # image_size / patch_size may be [n] or [n, n]
    hi = HF_MAX[key]
    if type(v) is not int or not 1 <= v <= hi:
        raise _bad(where, key, v, f"an integer from 1 to {hi}")
    return v


def _hf_tower(c: dict, tower: str, siglip: bool, where: str) -> dict:
    """One tower's numbers; transformers omits values equal to its defaults, so those fill in."""
    small_text = tower == "text" and not siglip
    t = {"width": _hf_int(c, "hidden_size", 512 if small_text else 768, where),
         "mlp_dim": _hf_int(c, "intermediate_size", 2048 if small_text else 3072, where),
         "layers": _hf_int(c, "num_hidden_layers", 12, where),
         "heads": _hf_int(c, "num_attention_heads", 8 if small_text else 12, where)}
    if t["width"] % t["heads"]:
        raise _bad(where, "num_attention_heads", t["heads"], f"a divisor of hidden_size={t['width']}")
    act = c.get("hidden_act", "gelu_pytorch_tanh" if siglip else "quick_gelu")
    if not isinstance(act, str) or act not in HF_ACT:
        raise _bad(where, "hidden_act", act, f"one of {', '.join(HF_ACT)}")
    eps = c.get("layer_norm_eps", 1e-6 if siglip else 1e-5)
    if type(eps) not in (int, float) or not 0 < eps < 1:
        raise _bad(where, "layer_norm_eps", eps, "a number between 0 and 1")
    return {**t, "act": HF_ACT[act], "ln_eps": float(eps)}


def _hf_sections(cfg: dict, f: str) -> tuple[dict, dict]:
    out = []
    for name in ("text_config", "vision_config"):
        c = cfg.get(name)
        if c is not None and not isinstance(c, dict):
            raise _bad(f, name, type(c).__name__, "an object")
        out.append(c or {})
    return out[0], out[1]


def spec_from_hf_config(cfg: dict, folder: Path | None = None) -> ModelSpec:
    """A spec from a transformers config.json (validated: every bad field names the file and field)."""
    f = str(folder / "config.json") if folder is not None else "config.json"
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{f} holds a JSON {type(cfg).__name__}, not an object")
    kind = cfg.get("model_type")
    if kind not in ("clip", "siglip"):
        raise CheckpointError(f"{f}: model_type {kind!r} is not supported by hf: (supported: clip, siglip)")
    siglip = kind == "siglip"
    base = get_spec("SigLIP-B-16" if siglip else "ViT-B-32").to_dict()
    tc, vc = _hf_sections(cfg, f)
    base["vision"].update(_hf_tower(vc, "vision", siglip, f"{f} vision_config"))
    base["text"].update(_hf_tower(tc, "text", siglip, f"{f} text_config"))
    v, t = base["vision"], base["text"]
    v["image_size"] = _hf_int(vc, "image_size", 224, f"{f} vision_config", allow_pair=True)
    v["patch_size"] = _hf_int(vc, "patch_size", 16 if siglip else 32, f"{f} vision_config", allow_pair=True)
    if v["image_size"] % v["patch_size"]:
        raise _bad(f"{f} vision_config", "patch_size", v["patch_size"], f"a divisor of image_size={v['image_size']}")
    t["vocab_size"] = _hf_int(tc, "vocab_size", 32000 if siglip else 49408, f"{f} text_config")
    t["context_length"] = _hf_int(tc, "max_position_embeddings", 64 if siglip else 77, f"{f} text_config")
    eos = tc.get("eos_token_id", 1 if siglip else 49407)
    if eos is not None and (type(eos) is not int or not 0 <= eos < t["vocab_size"]):
        raise _bad(f"{f} text_config", "eos_token_id", eos, f"a token id from 0 to {t['vocab_size'] - 1}")
    if siglip:
        base["embed_dim"] = v["width"]  # the pooled image width; the text head must project to it
        use_head = vc.get("vision_use_head", True)
        if not isinstance(use_head, bool):
            raise _bad(f"{f} vision_config", "vision_use_head", use_head, "true or false")
        if not use_head:
            raise CheckpointError("SigLIP vision towers without the attention-pooling head are not supported")
        t["eot_token_id"] = eos
        base["tokenizer"]["file"] = "tokenizer.json"
    else:
        base["embed_dim"] = _hf_int(cfg, "projection_dim", 512, f)
        t["eot_token_id"] = None if eos in (2, None) else eos  # eos 2: pre-2023 configs, pool at argmax(ids)
    base["preprocess"]["image_size"] = v["image_size"]
    base["tokenizer"]["context_length"] = t["context_length"]
    if folder is not None:
        base["preprocess"].update(_hf_preprocess(folder, v["image_size"], base["preprocess"]["resize"]))
    name = cfg.get("_name_or_path")
    base["name"] = Path(name if isinstance(name, str) and name else (folder.name if folder else "hf")).name or "hf"
    base["aliases"] = []
    base["description"] = f"transformers {kind} checkpoint"
    try:
        return ModelSpec.from_dict(base)
    except SpecError as e:
        raise CheckpointError(f"{f} describes a model edgeclip cannot build: {e}") from e


def _hf_preprocess(folder: Path, image_size: int, resize: str = "shortest") -> dict:
    """preprocessor_config.json -> spec preprocess fields; what the runtime cannot reproduce is an error."""
    f = folder / "preprocessor_config.json"
    if not f.is_file():
        return {}
    c, where = _read_json(f), str(f)
    for flag in ("do_resize", "do_center_crop", "do_rescale", "do_normalize", "do_convert_rgb"):
        if flag in c and not isinstance(c[flag], bool):
            raise _bad(where, flag, c[flag], "true or false")
    for flag in ("do_resize", "do_rescale"):
        if c.get(flag) is False:
            raise CheckpointError(f"{where}: field '{flag}' is false; edgeclip's preprocessing always resizes and "
                                  "rescales to 0..1, so it cannot reproduce this processor")
    rf = c.get("rescale_factor", 1 / 255)
    if type(rf) not in (int, float) or not math.isclose(rf, 1 / 255, rel_tol=1e-6):
        raise _bad(where, "rescale_factor", rf, "1/255 (0.00392156862745098), the only scale edgeclip applies")
    resample = c.get("resample", 3)
    if type(resample) is not int or resample not in HF_RESAMPLE:
        raise _bad(where, "resample", resample, "a PIL resample code the runtime supports: " +
                   ", ".join(f"{k} ({n})" for k, n in HF_RESAMPLE.items()))
    out = {"interpolation": HF_RESAMPLE[resample]}
    if c.get("do_normalize") is False:  # no normalisation is exactly mean 0, std 1
        out.update(mean=[0.0, 0.0, 0.0], std=[1.0, 1.0, 1.0])
    else:
        out.update(_hf_norm(c, where))
    out.update(_hf_sizes(c, where, image_size, resize))
    return out


def _hf_norm(c: dict, where: str) -> dict:
    out = {}
    for key, name in (("image_mean", "mean"), ("image_std", "std")):
        if key not in c:
            continue
        v = c[key]
        vals = [v] * 3 if type(v) in (int, float) else v
        if not isinstance(vals, list) or len(vals) != 3 or not all(type(x) in (int, float) for x in vals) \
                or not all(math.isfinite(x) and abs(x) <= 1e3 for x in vals) \
                or (key == "image_std" and not all(x > 0 for x in vals)):
            want = "3 positive finite numbers" if key == "image_std" else "3 finite numbers (one per RGB channel)"
            raise _bad(where, key, v, want)
        out[name] = [float(x) for x in vals]
    return out


def _hf_size_value(v, where: str, key: str, keys: tuple) -> dict:
    """int or {keys...} of ints in 1..4096 -> dict."""
    d = {k: v for k in keys} if type(v) is int else v
    ok = isinstance(d, dict) and d and set(d) <= set(keys) and all(
        type(x) is int and 1 <= x <= HF_MAX["image_size"] for x in d.values())
    if not ok:
        raise _bad(where, key, v, f"an integer from 1 to {HF_MAX['image_size']} or an object of {'/'.join(keys)}")
    return d


def _hf_sizes(c: dict, where: str, image_size: int, resize: str) -> dict:
    """size / crop_size must agree with the model's input size; a larger resize becomes resize_size."""
    out = {}
    if "size" in c:
        d = _hf_size_value(c["size"], where, "size", ("shortest_edge", "height", "width")
                           if type(c["size"]) is not int else ("shortest_edge",))
        if set(d) not in ({"shortest_edge"}, {"height", "width"}):
            raise _bad(where, "size", c["size"], "{'shortest_edge': N} or {'height': N, 'width': N}")
        if "shortest_edge" in d and resize == "shortest":
            if d["shortest_edge"] < image_size:
                raise _bad(where, "size", c["size"], f"at least the model's image_size {image_size}")
            if d["shortest_edge"] != image_size:
                out["resize_size"] = d["shortest_edge"]
        elif d != {"height": image_size, "width": image_size} and "height" in d:
            raise _bad(where, "size", c["size"], f"{{'height': {image_size}, 'width': {image_size}}}, the model's "
                       "image_size")
    if "crop_size" in c:
        d = _hf_size_value(c["crop_size"], where, "crop_size", ("height", "width"))
        if c.get("do_center_crop", True) and resize == "shortest" and d != {"height": image_size, "width": image_size}:
            raise _bad(where, "crop_size", c["crop_size"], f"{image_size}, the model's image_size")
    if resize == "shortest" and c.get("do_center_crop") is False:
        raise CheckpointError(f"{where}: field 'do_center_crop' is false; a CLIP model needs a square "
                              f"{image_size}x{image_size} input, so edgeclip cannot reproduce this processor")
    return out


def load_hf(path: str, spec=None) -> ClipModel:
    """A transformers CLIPModel / SiglipModel folder (config.json + safetensors or bin), or a Hugging
    Face folder of an open_clip model (open_clip_config.json + open_clip weights)."""
    d = Path(path)
    if not (d / "config.json").is_file() and (d / OPEN_CLIP_CONFIG).is_file():
        return load_hf_open_clip(d, spec)
    if not (d / "config.json").is_file():
        raise CheckpointError(f"{d} is not a transformers model folder: no config.json there")
    cfg = _read_json(d / "config.json")
    chosen = get_spec(spec) if spec is not None else spec_from_hf_config(cfg, d)
    if chosen.tokenizer.get("kind") == "hf":
        tok = d / chosen.tokenizer.get("file", "tokenizer.json")
        chosen = chosen.replace(tokenizer={"path": str(tok.resolve())})
    sd = {}
    for f in _hf_files(d):
        sd.update(read_state_dict(f))
    ours, origin = from_hf(sd)
    return load_weights(ClipModel(chosen), ours, origin)

# ----------------------------------------------------------------------- open_clip folders on the Hub

OPEN_CLIP_CONFIG = "open_clip_config.json"
OPEN_CLIP_WEIGHTS = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
# open_clip's timm trunk names -> our image tower kind and, for MCi, the preset its config equals
TIMM_TRUNKS = {"fastvit_mci0": "mci", "fastvit_mci1": "mci", "fastvit_mci2": "mci", "fastvit_mci3": "mci",
               "fastvit_mci4": "mci", "vit_base_mci_224": "vit-mci"}


def load_hf_open_clip(d: Path, spec=None) -> ClipModel:
    """open_clip_config.json ({"model_cfg", "preprocess_cfg"}) + open_clip_model.safetensors or
    open_clip_pytorch_model.bin. The architecture is the shipped spec the model config describes."""
    cfg = _read_json(d / OPEN_CLIP_CONFIG)
    model_cfg = cfg.get("model_cfg")
    if not isinstance(model_cfg, dict):
        raise CheckpointError(f"{d / OPEN_CLIP_CONFIG}: field 'model_cfg' must be an object (open_clip's model config)")
    weights = next((d / f for f in OPEN_CLIP_WEIGHTS if (d / f).is_file()), None)
    if weights is None:
        raise CheckpointError(f"{d} has an {OPEN_CLIP_CONFIG} but none of {', '.join(OPEN_CLIP_WEIGHTS)}")
    sd = read_state_dict(weights)
    act = "quick_gelu" if model_cfg.get("quick_gelu") else "gelu"
    if not isinstance(model_cfg.get("vision_cfg"), dict) or "timm_model_name" not in model_cfg["vision_cfg"]:
        return _build_openai(sd, spec, act)  # a ViT open_clip model: its dimensions are read from the weights
    chosen = get_spec(spec) if spec is not None else spec_from_open_clip_config(model_cfg, d / OPEN_CLIP_CONFIG)
    chosen = chosen.replace(preprocess=_open_clip_preprocess(cfg.get("preprocess_cfg"), chosen))
    return _build_open_clip_timm(sd, chosen, chosen.name)


def _open_clip_summary(spec: ModelSpec) -> tuple:
    t = spec.text
    return (spec.embed_dim, spec.vision.image_size, t.width, t.layers, t.heads, t.context_length, t.causal)


def spec_from_open_clip_config(model_cfg: dict, where: Path) -> ModelSpec:
    """The shipped spec whose architecture an open_clip model config with a timm trunk describes."""
    from .mci import mci_config_from_timm, parse_config

    vc, tc = model_cfg.get("vision_cfg") or {}, model_cfg.get("text_cfg") or {}
    trunk = vc.get("timm_model_name")
    if trunk not in TIMM_TRUNKS:
        raise CheckpointError(f"{where}: vision_cfg.timm_model_name {trunk!r} is not a trunk edgeclip builds "
                              f"(known: {', '.join(TIMM_TRUNKS)})")
    image_size = vc.get("image_size", 224)
    want = (model_cfg.get("embed_dim"), image_size[0] if isinstance(image_size, list) else image_size,
            tc.get("width"), tc.get("layers"), tc.get("heads"), tc.get("context_length", 77),
            not tc.get("no_causal_mask", False))
    preset = parse_config(mci_config_from_timm({}, trunk)) if TIMM_TRUNKS[trunk] == "mci" else None
    found = []
    for name in list_specs():
        s = get_spec(name)
        if s.vision.kind != TIMM_TRUNKS[trunk] or s.text.kind != "transformer" or _open_clip_summary(s) != want:
            continue
        if preset is None or parse_config(dict(s.vision.config)) == preset:
            found.append(s)
    if found:  # same architecture under two names (MobileCLIP-S2, MobileCLIP2-S2): the folder's name decides
        folder = where.parent.name.lower()
        named = [s for s in found if s.name.lower() in folder]
        return max(named, key=lambda s: len(s.name)) if named else found[0]
    raise CheckpointError(f"{where}: no shipped spec has a {trunk} image tower with embed_dim, image size and text "
                          f"tower {want}; pass spec= (a spec .json) describing this model")


def _open_clip_preprocess(pre, spec: ModelSpec) -> dict:
    """The folder's preprocessing (open_clip's preprocess_cfg) over the spec's: mean, std, interpolation,
    resize mode. Checked again when the Preprocessor is built."""
    out = dict(spec.preprocess_config())
    if not isinstance(pre, dict):
        return out
    for key in ("mean", "std"):
        v = pre.get(key)
        if isinstance(v, list) and len(v) == 3 and all(isinstance(x, (int, float)) and math.isfinite(x) for x in v):
            out[key] = [float(x) for x in v]
    if pre.get("interpolation") in ("bilinear", "bicubic", "nearest", "lanczos"):
        out["interpolation"] = pre["interpolation"]
    if pre.get("resize_mode") in ("shortest", "squash"):
        out["resize"] = pre["resize_mode"]
    return out


# ---------------------------------------------------------------------------------------- built-in

def builtin_dir(name: str) -> Path:
    return Path(str(resources.files("edgeclip") / "data" / name))


def load_builtin(name: str) -> ClipModel:
    if name not in BUILTINS:
        raise UnknownModelError(f"unknown built-in model '{name}'; built-in models: "
                                f"{', '.join('builtin:' + b for b in BUILTINS)}")
    weights = builtin_dir(name) / "model.safetensors"
    if not weights.is_file():
        raise CheckpointError(f"built-in weights missing at {weights}; rebuild them with "
                              "`python scripts/train_tiny.py` or reinstall edgeclip")
    model = ClipModel(get_spec(name))
    ours = read_state_dict(weights)
    return load_weights(model, ours, {})
