"""Typed errors. Every message says what the user can do next."""
from __future__ import annotations


class EdgeClipError(Exception):
    """Base class of every error edgeclip raises on purpose."""


class MissingExtraError(EdgeClipError, ImportError):
    """An optional dependency is not installed."""

    def __init__(self, module: str, extra: str, purpose: str = ""):
        why = f" (needed for {purpose})" if purpose else ""
        super().__init__(
            f"'{module}' is not installed{why}. Install it with: pip install 'edgeclip[{extra}]'"
        )
        self.module, self.extra = module, extra


class UnknownModelError(EdgeClipError, KeyError):
    """A model URI or spec name that edgeclip does not know."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else ""


class CheckpointError(EdgeClipError):
    """A checkpoint is missing, unreadable or in an unknown layout."""


class WeightShapeError(CheckpointError):
    """A checkpoint tensor has a shape that disagrees with the spec."""


class SpecError(EdgeClipError):
    """A model spec is malformed."""


class InputError(EdgeClipError, ValueError):
    """Input of the wrong type, shape or range."""


class ImageDecodeError(InputError):
    """An image file or buffer could not be decoded."""


class TokenizerError(EdgeClipError):
    """Tokenizer files are missing or text cannot be tokenized."""


class ArtifactError(EdgeClipError):
    """An artifact folder is missing files, malformed or unsafe."""


class ChecksumError(ArtifactError):
    """A file of an artifact does not match the sha256 in its manifest."""


class ValidationError(EdgeClipError):
    """An exported artifact is outside the fidelity tolerance of its target."""

    def __init__(self, message: str, failures: list | None = None):
        super().__init__(message)
        self.failures = failures or []


class ConformanceError(ValidationError):
    """An artifact (or the app-side integration it is checked with) disagrees with a conformance vectors
    file; `output` names the first check that differs (input_ids, pixel_values or a graph output)."""

    def __init__(self, message: str, output: str, report: dict | None = None):
        super().__init__(message, failures=[{"output": output}])
        self.output, self.report = output, report or {}


class TextTooLongError(InputError):
    """A text has more tokens than the model's context length."""


class CalibrationError(EdgeClipError):
    """Calibration data is missing, empty or unusable."""


class EvalDataError(InputError):
    """A labelled evaluation folder (bench --eval) is missing, empty or not one sub-folder per class."""


class HeadError(EdgeClipError):
    """A head file or head definition is unreadable, inconsistent or of an unknown layout."""


class HeadShapeError(HeadError, InputError):
    """A head's tensor disagrees with the model's embedding width or the class list."""


class UnknownHeadError(HeadError, KeyError):
    """A head name that the artifact does not hold."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class UnsafeCheckpointError(CheckpointError):
    """A checkpoint asks to run code or rebuild objects beyond tensors and plain containers."""


class ImageSizeError(InputError):
    """An image is empty, absurdly large or of an absurd aspect ratio: refused before any work."""


class LabelError(InputError):
    """Class labels are empty, not strings, or collide (differ only by case or whitespace)."""


class TemplateError(InputError):
    """A prompt template is malformed: it must hold exactly one '{}' placeholder."""


class ManifestError(ArtifactError):
    """A manifest field is missing, of the wrong type, out of range or unknown (names the field)."""

    def __init__(self, message: str, field: str | None = None):
        super().__init__(message)
        self.field = field


class DigestError(ArtifactError):
    """An artifact's digest is not the one the app pinned."""


class OutputPathError(ArtifactError):
    """An export's --out names something that is not safe to write or replace."""


class UsageError(InputError):
    """A command-line argument is missing, malformed or out of range."""


class TensorRTCompatError(ArtifactError):
    """A graph meant for TensorRT uses an op, opset, quantization form or dynamic shape the targeted
    TensorRT version cannot build; the message names the node."""

    def __init__(self, message: str, node: str | None = None, rule: str | None = None):
        super().__init__(message)
        self.node, self.rule = node, rule
