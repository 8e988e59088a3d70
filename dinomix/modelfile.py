"""One self-describing model file: safetensors weights plus JSON metadata in the safetensors header.

The metadata carries everything needed to run the model (architecture, organ schema, preprocessing per
mode) and to trust it (format version, sha256 of the weights, training provenance, metrics). Loading
never executes code: safetensors holds raw tensors only, the metadata is plain JSON validated by pydantic.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Literal, Optional

import torch
from pydantic import BaseModel, Field, ValidationError
from safetensors import safe_open
from safetensors.torch import save_file

from .errors import ModelFileError
from .network import ArchitectureConfig, build_network
from .organs import OrganSchema
from .preprocessing import PreprocessConfig
from .segdino import BACKBONE_UNTRAINED

FORMAT = "dinomix-model"
FORMAT_VERSION = 1
META_KEY = "dinomix"


class PostprocessConfig(BaseModel):
    largest_component: bool = True
    fill_holes: bool = True


class ModelMeta(BaseModel):
    format: Literal["dinomix-model"] = FORMAT
    format_version: int = FORMAT_VERSION
    model_id: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.@+-]*$")
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
    if meta.architecture.family == "segdino" and getattr(arch, "family", None) == "segdino":
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


def read_meta(path: str | os.PathLike) -> ModelMeta:
    """Metadata only (fast: reads the header), validated."""
    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"model file not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = (f.metadata() or {}).get(META_KEY)
    except Exception as exc:  # safetensors raises its own error types for broken headers
        raise ModelFileError(f"{path.name} is not a valid model file (corrupt, truncated or not safetensors): "
                             f"{str(exc)[:160]}") from None
    if raw is None:
        raise ModelFileError(f"{path.name} is a safetensors file but not a DINOMix model (no '{META_KEY}' metadata)")
    try:
        data = json.loads(raw)
    except json.JSONDecodeError:
        raise ModelFileError(f"{path.name}: model metadata is not valid JSON (file damaged?)") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise ModelFileError(f"{path.name} is not a DINOMix model file (format {data.get('format')!r})")
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


def load_model(path: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[torch.nn.Module, ModelMeta]:
    """Network (eval mode) and metadata; verifies the weights' sha256 and that they fit the architecture."""
    meta = read_meta(path)
    path = Path(path)
    try:
        tensors = {}
        with safe_open(str(path), framework="pt") as f:
            for k in f.keys():
                tensors[k] = f.get_tensor(k)
    except Exception as exc:
        raise ModelFileError(f"{path.name}: cannot read weights (file truncated or corrupt): {str(exc)[:160]}") from None
    digest = weights_sha256(tensors)
    if digest != meta.weights_sha256:
        raise ModelFileError(f"{path.name}: weights do not match their recorded sha256 (file corrupt or modified); "
                             "re-download or re-import the model")
    net = build_network(meta.architecture, load_backbone=False)
    try:
        net.load_state_dict(tensors, strict=True)
    except RuntimeError as exc:
        raise ModelFileError(f"{path.name}: weights do not fit the architecture in its metadata: "
                             f"{str(exc).splitlines()[0][:200]}") from None
    return net.to(device).eval(), meta
