"""One self-describing model file: safetensors weights plus JSON metadata in the safetensors header.

The metadata carries everything needed to run the model (architecture, organ schema, preprocessing per
mode) and to trust it (format version, sha256 of the weights, training provenance, metrics). Loading
never executes code: safetensors holds raw tensors only, the metadata is plain JSON validated by pydantic.

What loading checks (docs/faults-models-training.md):
* the weights against the sha256 in the metadata (corruption) and that every weight is finite;
* that the metadata is usable: organs match the output channels, spacings, windows and ROIs are positive
  and finite, the architecture is of a plausible size;
* where a digest of the metadata was recorded somewhere the file cannot change it (a constant in this module
  for the models shipped in the package, the registry's digest index for imported models), that the
  metadata still has it. The metadata holds the weights' sha256, so this digest covers weights and metadata
  together: swapped organ names, an edited spacing or edited weights with a recomputed hash are refused.
A digest stored inside the file itself would only be recomputed along with the edit, so there is none.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any, Final, Literal, Optional

import torch
from pydantic import BaseModel, Field, ValidationError, field_validator, model_validator
from safetensors import safe_open
from safetensors.torch import save_file

from .errors import ModelFileError
from .modelheader import META_KEY, ModelHeaderError, NoDINOMixMetadata, read_raw_metadata
from .nets.segdino import BACKBONE_UNTRAINED, SegDINOConfig
from .nets.unet import ArchitectureConfig, build_network
from .organs import OrganSchema
from .preprocessing import PreprocessConfig

FORMAT: Final = "dinomix-model"
FORMAT_VERSION = 1
MODEL_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.@+-]*$"

# The models shipped inside the package and the sha256 of their metadata (`metadata_sha256`), which holds the
# sha256 of their weights. Replacing a shipped model file means updating its digest here (tests check it).
BUILTIN_DIR = Path(__file__).parent / "models"
BUILTIN_METADATA_SHA256 = {
    "abdomen-btcv13.safetensors": "40d93591b8a81cac9efadaceff3471dceb8142b32b3ea882fb96b18924bdead8",
}
# Beside imported models (the registry folder): file name -> metadata digest at import (`record_digest`).
DIGEST_INDEX = ".dinomix-digests.json"
INDEX_FORMAT = "dinomix-digests"

MAX_SPACING_MM = 50.0
MAX_ROI = 4096
MAX_CHANNELS = 4096
MAX_CALIBRATION_OFFSET = 100.0


class PostprocessConfig(BaseModel):
    largest_component: bool = True
    fill_holes: bool = True
    # The logit offsets a fine-tune added to these organs' output biases (training/calibration.py; summed over
    # generations). The largest-component step keeps a calibrated organ's pieces that overlap its largest piece in the
    # map drawn without the offsets (inference/postprocess.py): a cut organ keeps both halves.
    calibration_offsets: dict[int, float] = Field(default_factory=dict, max_length=255)

    @field_validator("calibration_offsets")
    @classmethod
    def _organ_offsets(cls, v: dict[int, float]) -> dict[int, float]:
        if any(not 1 <= k <= 255 for k in v):
            raise ValueError("calibration_offsets maps organ label values (1-255) to offsets")
        if any(not math.isfinite(b) or abs(b) > MAX_CALIBRATION_OFFSET for b in v.values()):
            raise ValueError(f"calibration_offsets holds offsets of at most {MAX_CALIBRATION_OFFSET:g} logits")
        return dict(sorted(v.items()))

    def offsets_vector(self, num_classes: int) -> Optional[torch.Tensor]:
        """The offsets as one float per class (None where nothing is calibrated)."""
        if not self.calibration_offsets:
            return None
        out = torch.zeros(num_classes)
        for k, b in self.calibration_offsets.items():
            if k < num_classes:
                out[k] = b
        return out


class ModelMeta(BaseModel):
    format: Literal["dinomix-model"] = FORMAT
    format_version: int = FORMAT_VERSION
    model_id: str = Field(pattern=MODEL_ID_PATTERN)
    title: str = ""
    description: str = ""
    trained: bool = Field(description="False for randomly initialised weights: shown as UNTRAINED everywhere")
    architecture: ArchitectureConfig
    organs: OrganSchema
    preprocessing: PreprocessConfig
    postprocessing: PostprocessConfig = PostprocessConfig()
    training: dict[str, Any] = Field(default_factory=dict, description="config, data, hardware, time, parent")
    metrics: dict[str, Any] = Field(default_factory=dict)
    parent: Optional[str] = None
    created: str = Field(default_factory=lambda: _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))
    weights_sha256: str = ""

    @model_validator(mode="after")
    def _pieces_of_its_organs(self) -> ModelMeta:
        unknown = set(self.postprocessing.calibration_offsets) - {o.value for o in self.organs.organs}
        if unknown:
            raise ValueError(f"postprocessing.calibration_offsets names label values the model has no organ for: "
                             f"{sorted(unknown)}")
        return self

    @property
    def backbone_untrained(self) -> bool:
        """A SegDINO model whose DINOv3 backbone has random weights (no DINOv3 weights when it was trained)."""
        return self.architecture.family == "segdino" and not self.architecture.backbone_pretrained

    @property
    def status(self) -> str:
        s = "trained" if self.trained else "UNTRAINED (random weights)"
        return s + (f", {BACKBONE_UNTRAINED}" if self.backbone_untrained else "")

    def display_name(self) -> str:
        return (self.model_id + ("" if self.trained else " [UNTRAINED]")
                + (f" [{BACKBONE_UNTRAINED}]" if self.backbone_untrained else ""))


def weights_sha256(tensors: dict[str, torch.Tensor]) -> str:
    """Hash of names, dtypes, shapes and bytes of all tensors, in name order (independent of file layout)."""
    h = hashlib.sha256()
    for k in sorted(tensors):
        t = tensors[k].detach().cpu().contiguous()
        h.update(k.encode())
        h.update(str(t.dtype).encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def save_model(path: str | os.PathLike, net: torch.nn.Module, meta: ModelMeta) -> ModelMeta:
    """Write the model file atomically (temporary file, then rename)."""
    arch = getattr(net, "cfg", None)
    if meta.architecture.family == "segdino" and isinstance(arch, SegDINOConfig):
        # whether the backbone holds real DINOv3 weights is known to the network that was built
        meta = meta.model_copy(update={"architecture": meta.architecture.model_copy(update={
            "backbone_pretrained": arch.backbone_pretrained, "backbone_sha256": arch.backbone_sha256})})
    tensors = {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
    meta = meta.model_copy(update={"weights_sha256": weights_sha256(tensors)})
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # A temporary name of its own: two processes creating the same file at once (the built-in placeholder
    # on first use) must not write into one shared temporary file.
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata={META_KEY: meta.model_dump_json()})
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; a model file gets the user's normal permissions
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return meta


def _read_raw(path: Path) -> str:
    """The metadata JSON text of a model file, as stored (read by `modelheader`, which the Slicer modules use too)."""
    if not path.is_file():
        raise ModelFileError(f"model file not found: {path}")
    try:
        return read_raw_metadata(path)
    except NoDINOMixMetadata:
        raise ModelFileError(f"{path.name} is a safetensors file but not a DINOMix model (no '{META_KEY}' metadata)"
                             ) from None
    except ModelHeaderError as exc:
        raise ModelFileError(f"{path.name} is not a valid model file (corrupt, truncated or not safetensors): "
                             f"{str(exc)[:160]}") from None


def _parse_meta(path: Path, raw: str) -> ModelMeta:
    try:
        data = json.loads(raw)
    except json.JSONDecodeError:
        raise ModelFileError(f"{path.name}: model metadata is not valid JSON (file damaged?)") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        found = data.get("format") if isinstance(data, dict) else f"JSON {type(data).__name__} metadata"
        raise ModelFileError(f"{path.name} is not a DINOMix model file (format {found!r})")
    version = data.get("format_version")
    if not isinstance(version, int):
        raise ModelFileError(f"{path.name}: model metadata has no valid format_version")
    if version > FORMAT_VERSION:
        raise ModelFileError(f"{path.name} was written by a newer DINOMix (model format {version}; this version "
                             f"reads up to {FORMAT_VERSION}). Update DINOMix to use it.")
    try:
        return ModelMeta.model_validate(data)
    except ValidationError as exc:
        raise ModelFileError(f"{path.name}: model metadata is invalid: {exc.errors()[0]['loc']}: "
                             f"{exc.errors()[0]['msg']}") from None


def read_meta(path: str | os.PathLike) -> ModelMeta:
    """Metadata only (fast: reads the header), validated. Not checked against recorded digests nor for sanity:
    listings show what a file says; `load_model` (every use of a model) refuses what is unusable or edited."""
    path = Path(path)
    return _parse_meta(path, _read_raw(path))


# ---------------------------------------------------------------- recorded digests

def metadata_sha256(raw: str) -> str:
    """sha256 of the metadata JSON in canonical form (sorted keys, no spaces), so re-serialising the same
    content does not change it. The metadata holds `weights_sha256`, so this covers the weights too."""
    try:
        canonical = json.dumps(json.loads(raw), sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    except json.JSONDecodeError:
        canonical = raw
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def file_metadata_sha256(path: str | os.PathLike) -> str:
    """`metadata_sha256` of a model file (the value to put in BUILTIN_METADATA_SHA256 for a shipped model)."""
    return metadata_sha256(_read_raw(Path(path)))


def _index_path(folder: Path) -> Path:
    return folder / DIGEST_INDEX


def _read_index(folder: Path) -> dict[str, str]:
    """File name -> recorded metadata digest of a folder's digest index ({} without one)."""
    index = _index_path(folder)
    if not index.exists():
        return {}
    try:
        data = json.loads(index.read_text())
        models = data["models"] if data.get("format") == INDEX_FORMAT else None
        if not isinstance(models, dict):
            raise ValueError("no models")
        return {str(k): str(v["metadata_sha256"]) for k, v in models.items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        raise ModelFileError(f"the digest index {index} of the imported models is damaged, so they cannot be "
                             "verified; remove the models with 'dinomix models remove' and import them again") from None


def _write_index(folder: Path, entries: dict[str, dict]) -> None:
    index = _index_path(folder)
    fd, tmp = tempfile.mkstemp(prefix=f".{index.name}.", suffix=".part", dir=folder)
    with os.fdopen(fd, "w") as f:
        json.dump({"format": INDEX_FORMAT, "version": 1, "models": entries}, f, indent=1, sort_keys=True)
    os.replace(tmp, index)


def _index_entries(folder: Path) -> dict[str, dict]:
    _read_index(folder)  # refuses a damaged index rather than overwrite it
    index = _index_path(folder)
    return json.loads(index.read_text())["models"] if index.exists() else {}


def record_digest(path: str | os.PathLike) -> str:
    """Record the metadata digest of an imported model file in its folder's digest index (the registry calls
    this after copying a verified file in); from then on `load_model` refuses the file if it is edited."""
    path = Path(path).resolve()
    digest = file_metadata_sha256(path)
    entries = _index_entries(path.parent)
    entries[path.name] = {"metadata_sha256": digest,
                          "recorded": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
    _write_index(path.parent, entries)
    return digest


def forget_digest(path: str | os.PathLike) -> None:
    """Drop a removed model file from its folder's digest index."""
    path = Path(path).resolve()
    if not _index_path(path.parent).exists():
        return
    entries = _index_entries(path.parent)
    if entries.pop(path.name, None) is not None:
        if entries:
            _write_index(path.parent, entries)
        else:  # the last imported model is gone: leave the folder as it was before the first import
            _index_path(path.parent).unlink()


def recorded_digest(path: Path) -> Optional[tuple[str, str]]:
    """(digest, where it was recorded) for a shipped or imported model file; None for other files."""
    path = path.resolve()
    if path.parent == BUILTIN_DIR.resolve():
        expected = BUILTIN_METADATA_SHA256.get(path.name)
        if expected is None:
            raise ModelFileError(f"{path.name} lies in the package's model folder {path.parent} but is not a model "
                                 "shipped with this DINOMix version; install models with 'dinomix models import'")
        return expected, "the model shipped with this DINOMix version"
    digest = _read_index(path.parent).get(path.name)
    return (digest, "the digest recorded when it was imported") if digest else None


def check_recorded_digest(path: Path, raw: str) -> None:
    rec = recorded_digest(path)
    if rec is not None and metadata_sha256(raw) != rec[0]:
        raise ModelFileError(f"{path.name}: the model file was modified: its metadata or weights differ from "
                             f"{rec[1]} (organ names, preprocessing, weights or their hash edited); it is not used. "
                             "Re-install or re-import the original file")


# ---------------------------------------------------------------- sanity

def _finite_positive(values, upper: float) -> bool:
    return all(isinstance(v, (int, float)) and math.isfinite(v) and 0 < v <= upper for v in values)


def preprocessing_problem(pp: PreprocessConfig) -> Optional[str]:
    """What makes a preprocessing description unusable (None if nothing): one sentence for the user."""
    if not pp.modes:
        return "preprocessing has no mode"
    for name, m in pp.modes.items():
        if not _finite_positive(m.spacing_mm, MAX_SPACING_MM):
            return (f"mode '{name}' spacing {tuple(m.spacing_mm)} mm: every value must be positive, finite and at "
                    f"most {MAX_SPACING_MM:g} mm")
        if not all(1 <= r <= MAX_ROI for r in m.roi_size):
            return f"mode '{name}' roi_size {tuple(m.roi_size)}: every value must be between 1 and {MAX_ROI}"
    it = pp.intensity
    if not all(math.isfinite(v) for v in (it.a_min, it.a_max, it.b_min, it.b_max)):
        return "preprocessing.intensity: the window values must be finite"
    if not it.a_min < it.a_max:
        return f"preprocessing.intensity: a_min ({it.a_min:g}) must be below a_max ({it.a_max:g})"
    if it.b_min == it.b_max:
        return f"preprocessing.intensity: b_min and b_max are both {it.b_min:g}: every voxel would look the same"
    fg = pp.foreground
    if not (math.isfinite(fg.threshold_hu) and math.isfinite(fg.margin_mm) and fg.margin_mm >= 0):
        return "preprocessing.foreground: threshold_hu must be finite and margin_mm finite and not negative"
    axes = sorted(pair for c in pp.orientation.upper() for pair in ("RL", "AP", "SI") if c in pair)
    if len(pp.orientation) != 3 or axes != ["AP", "RL", "SI"]:
        return f"preprocessing.orientation '{pp.orientation}' is not an axis code like RAS or LPS"
    return None


def architecture_problem(arch: ArchitectureConfig) -> Optional[str]:
    """What makes an architecture description implausible (None if nothing), before anything is built."""
    widths = [getattr(arch, "stem_channels", 1), *getattr(arch, "channels", ()), getattr(arch, "width", 1)]
    if not getattr(arch, "channels", (1,)) or not all(1 <= int(w) <= MAX_CHANNELS for w in widths):
        return f"architecture widths {widths} must each be between 1 and {MAX_CHANNELS}"
    if getattr(arch, "in_channels", 1) != 1:
        return f"architecture.in_channels is {arch.in_channels}; DINOMix models take one CT channel"
    dropout = getattr(arch, "dropout", 0.0)
    if not (math.isfinite(dropout) and 0 <= dropout < 1):
        return f"architecture.dropout {dropout} must be in [0, 1)"
    return None


def meta_problem(meta: ModelMeta) -> Optional[str]:
    """What makes a model's metadata unusable (None if nothing)."""
    if meta.architecture.out_channels != meta.organs.num_classes:
        return (f"{len(meta.organs.organs)} organs need {meta.organs.num_classes} output channels, the architecture "
                f"has {meta.architecture.out_channels}")
    return architecture_problem(meta.architecture) or preprocessing_problem(meta.preprocessing)


def check_weights_finite(name: str, tensors: dict[str, torch.Tensor]) -> None:
    """NaN or infinite weights give NaN logits, whose argmax labels every voxel with one organ."""
    for k in sorted(tensors):
        t = tensors[k]
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise ModelFileError(f"{name}: weight '{k}' holds NaN or infinite values; the model cannot give a "
                                 "meaningful segmentation (a diverged training or a damaged file)")


def load_model(path: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[torch.nn.Module, ModelMeta]:
    """Network (eval mode) and metadata; verifies the recorded metadata digest (shipped and imported models), the
    metadata's sanity, the weights' sha256, that they are finite and that they fit the architecture."""
    path = Path(path)
    raw = _read_raw(path)
    meta = _parse_meta(path, raw)
    check_recorded_digest(path, raw)
    problem = meta_problem(meta)
    if problem:
        raise ModelFileError(f"{path.name}: model metadata is not usable: {problem}")
    try:
        tensors = {}
        with safe_open(str(path), framework="pt") as f:
            for k in f.keys():
                tensors[k] = f.get_tensor(k)
    except Exception as exc:
        raise ModelFileError(f"{path.name}: cannot read weights (file truncated or corrupt): "
                             f"{str(exc)[:160]}") from None
    digest = weights_sha256(tensors)
    if digest != meta.weights_sha256:
        raise ModelFileError(f"{path.name}: weights do not match their recorded sha256 (file corrupt or modified); "
                             "re-download or re-import the model")
    check_weights_finite(path.name, tensors)
    net = build_network(meta.architecture, load_backbone=False)
    try:
        net.load_state_dict(tensors, strict=True)
    except RuntimeError as exc:
        raise ModelFileError(f"{path.name}: weights do not fit the architecture in its metadata: "
                             f"{str(exc).splitlines()[0][:200]}") from None
    return net.to(device).eval(), meta
