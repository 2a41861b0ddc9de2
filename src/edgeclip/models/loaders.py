"""`load_model(uri)`: checkpoints in the formats users have, mapped onto our ClipModel.

URIs: `hf:DIR`, `openai:FILE`, `open_clip:ARCH` (+ checkpoint=FILE), `random:SPEC` (+ seed=),
`builtin:NAME`. A bare directory or file path is routed to hf:/openai: by what it contains.
"""
from __future__ import annotations

import json
import math
import re
import warnings
import zipfile
from importlib import resources
from pathlib import Path

import torch

from ..errors import CheckpointError, UnknownModelError, WeightShapeError
from ..specs import ModelSpec, get_spec, list_specs
from .clip import ClipModel
from .convert import from_hf, from_openai, unwrap_state_dict

SCHEMES = ("hf", "openai", "open_clip", "random", "builtin")
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
    elif scheme == "random":
        model = ClipModel(get_spec(spec if spec is not None else rest)).init_random(seed)
    else:
        model = load_builtin(rest)
    model.source = str(uri)  # where the weights came from (export uses a built-in model's own data)
    return model.float().eval()


def _load_bare(uri: str, spec=None) -> ClipModel:
    p = Path(uri)
    if p.is_dir() and (p / "config.json").is_file():
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
    """Tensors from .safetensors, a pickle (weights_only) or a TorchScript archive."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint file not found: {path}")
    if path.suffix == ".safetensors":
        from .._lazy import require

        st = require("safetensors.torch", "reading .safetensors checkpoints")
        try:
            return st.load_file(str(path))
        except Exception as e:
            raise CheckpointError(f"cannot read {path}: {e}; the file is corrupt or not safetensors") from e
    if _is_torchscript(path):
        # OpenAI's released .pt files are TorchScript archives: read their parameters, run no code.
        try:
            with warnings.catch_warnings():  # torch.jit is deprecated, but these files exist in the wild
                warnings.simplefilter("ignore", DeprecationWarning)
                return dict(torch.jit.load(str(path), map_location="cpu").state_dict())
        except Exception as e:
            raise CheckpointError(f"cannot read TorchScript archive {path}: {e}") from e
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(
            f"cannot read {path} as a weights-only checkpoint ({type(e).__name__}: {str(e)[:200]}). "
            "edgeclip never unpickles arbitrary objects; re-save the weights with "
            "torch.save(model.state_dict(), path) or as .safetensors"
        ) from e
    return unwrap_state_dict(obj)


def _is_torchscript(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as z:
        return any(n.endswith("/constants.pkl") or n == "constants.pkl" for n in z.namelist())


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
    return _build_openai(read_state_dict(Path(checkpoint)), chosen, act)


# ----------------------------------------------------------------------------------- transformers

def _hf_files(d: Path) -> list[Path]:
    for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if (d / index).is_file():
            shards = sorted(set(json.loads((d / index).read_text())["weight_map"].values()))
            return [d / s for s in shards]
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (d / name).is_file():
            return [d / name]
    raise CheckpointError(f"{d} has no model.safetensors or pytorch_model.bin; is it a transformers model folder?")


def spec_from_hf_config(cfg: dict, folder: Path | None = None) -> ModelSpec:
    kind = cfg.get("model_type")
    if kind not in ("clip", "siglip"):
        raise CheckpointError(f"model_type '{kind}' is not supported by hf: (supported: clip, siglip)")
    siglip = kind == "siglip"
    base = get_spec("SigLIP-B-16" if siglip else "ViT-B-32").to_dict()
    tc, vc = cfg.get("text_config") or {}, cfg.get("vision_config") or {}
    # transformers may omit values equal to its defaults: fall back to those.
    for tower, c in (("vision", vc), ("text", tc)):
        t = base[tower]
        t["width"] = c.get("hidden_size", 768 if tower == "vision" or siglip else 512)
        t["mlp_dim"] = c.get("intermediate_size", 3072 if tower == "vision" or siglip else 2048)
        t["layers"] = c.get("num_hidden_layers", 12)
        t["heads"] = c.get("num_attention_heads", 12 if tower == "vision" or siglip else 8)
        t["act"] = HF_ACT.get(c.get("hidden_act", "gelu_pytorch_tanh" if siglip else "quick_gelu"), "gelu")
        t["ln_eps"] = c.get("layer_norm_eps", 1e-6 if siglip else 1e-5)
    v, t = base["vision"], base["text"]
    v["image_size"] = _int(vc.get("image_size", 224))
    v["patch_size"] = _int(vc.get("patch_size", 16 if siglip else 32))
    t["vocab_size"] = tc.get("vocab_size", 32000 if siglip else 49408)
    t["context_length"] = tc.get("max_position_embeddings", 64 if siglip else 77)
    if siglip:
        base["embed_dim"] = v["width"]  # the pooled image width; the text head must project to it
        v["mlp_dim"] = vc.get("intermediate_size", 3072)
        if not vc.get("vision_use_head", True):
            raise CheckpointError("SigLIP vision towers without the attention-pooling head are not supported")
        t["eot_token_id"] = tc.get("eos_token_id", 1)
        base["tokenizer"]["file"] = "tokenizer.json"
    else:
        base["embed_dim"] = cfg.get("projection_dim", 512)
        eos = tc.get("eos_token_id", 49407)
        t["eot_token_id"] = None if eos == 2 else eos  # eos 2: pre-2023 configs, pool at argmax(ids)
    base["preprocess"]["image_size"] = v["image_size"]
    base["tokenizer"]["context_length"] = t["context_length"]
    if folder is not None:
        base["preprocess"].update(_hf_preprocess(folder, v["image_size"]))
    base["name"] = cfg.get("_name_or_path") or (folder.name if folder else "hf")
    base["name"] = Path(base["name"]).name or "hf"
    base["aliases"] = []
    base["description"] = f"transformers {kind} checkpoint"
    return ModelSpec.from_dict(base)


def _int(x):
    return int(x[0] if isinstance(x, (list, tuple)) else x)


def _hf_preprocess(folder: Path, image_size: int) -> dict:
    f = folder / "preprocessor_config.json"
    if not f.is_file():
        return {}
    c = json.loads(f.read_text())
    out = {}
    if "image_mean" in c:
        out["mean"] = list(c["image_mean"])
    if "image_std" in c:
        out["std"] = list(c["image_std"])
    out["interpolation"] = {2: "bilinear", 3: "bicubic"}.get(c.get("resample"), "bicubic")
    return out


def load_hf(path: str, spec=None) -> ClipModel:
    """A transformers CLIPModel / SiglipModel folder (config.json + safetensors or bin)."""
    d = Path(path)
    if not (d / "config.json").is_file():
        raise CheckpointError(f"{d} is not a transformers model folder: no config.json there")
    try:
        cfg = json.loads((d / "config.json").read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{d / 'config.json'} is not valid JSON: {e}") from e
    chosen = get_spec(spec) if spec is not None else spec_from_hf_config(cfg, d)
    if chosen.tokenizer.get("kind") == "hf":
        tok = d / chosen.tokenizer.get("file", "tokenizer.json")
        chosen = chosen.replace(tokenizer={"path": str(tok.resolve())})
    sd = {}
    for f in _hf_files(d):
        sd.update(read_state_dict(f))
    ours, origin = from_hf(sd)
    return load_weights(ClipModel(chosen), ours, origin)


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
