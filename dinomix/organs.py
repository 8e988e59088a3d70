"""The organs a model knows: label value, name, colour and DICOM/SNOMED terminology.

One `OrganSchema` travels inside every model file, so a model always says which label value means which
organ; the `.seg.nrrd` writer and the trainers read names, colours and codes from here, and the data itself
lives in `organcatalog` (standard library only, so the Slicer modules can read it on Slicer's main thread).
"""

from __future__ import annotations

from typing import Optional

from pydantic import BaseModel, Field, field_validator, model_validator

from . import organcatalog
from .errors import DinomixError
from .organcatalog import ALIASES, ANATOMICAL_STRUCTURE, SCT, canonical_name

__all__ = ["ALIASES", "AMOS_EXTRAS", "BTCV13", "CATALOG", "Code", "Organ", "OrganSchema", "SPLENIC_VEIN",
           "canonical_name"]


class Code(BaseModel):
    """A coded concept (DICOM code sequence item): scheme, value, meaning."""

    scheme: str = SCT
    value: str
    meaning: str

    def as_triplet(self) -> list[str]:
        return [self.scheme, self.value, self.meaning]


class Organ(BaseModel):
    """One structure a model segments."""

    value: int = Field(ge=1, le=255, description="label value in label maps")
    name: str = Field(pattern=r"^[a-z][a-z0-9_]*$", description="machine name, BTCV/TotalSegmentator style")
    display_name: str
    color: tuple[int, int, int]
    category: Code = Code(scheme=ANATOMICAL_STRUCTURE[0], value=ANATOMICAL_STRUCTURE[1],
                          meaning=ANATOMICAL_STRUCTURE[2])
    type: Code
    type_modifier: Optional[Code] = None
    side: Optional[str] = Field(default=None, description="'right' or 'left' for paired organs")
    minority: bool = Field(default=False, description="small organ that class-balanced training favours")

    @field_validator("color")
    @classmethod
    def _rgb(cls, v: tuple[int, int, int]) -> tuple[int, int, int]:
        if any(c < 0 or c > 255 for c in v):
            raise ValueError(f"colour components must be 0..255, got {v}")
        return v

    def terminology_slicerio(self) -> dict:
        """The `terminology` dict that slicerio writes into `.seg.nrrd` segment tags."""
        term = {
            "contextName": "Segmentation category and type - DICOM master list",
            "category": self.category.as_triplet(),
            "type": self.type.as_triplet(),
        }
        if self.type_modifier is not None:
            term["typeModifier"] = self.type_modifier.as_triplet()
        return term

    def terminology_string(self) -> str:
        """Slicer's terminology entry string (vtkSlicerTerminologyEntry serialisation)."""
        def triplet(c: Optional[Code]) -> Optional[tuple[str, str, str]]:
            return (c.scheme, c.value, c.meaning) if c is not None else None

        return organcatalog.terminology_string(triplet(self.category), triplet(self.type),
                                               triplet(self.type_modifier))


def _organ(row: organcatalog.OrganRow) -> Organ:
    """The validated organ of a catalog row (organcatalog holds the data as plain tuples for the Slicer modules)."""
    side = organcatalog.side_modifier(row.side)
    modifier = Code(scheme=side[0], value=side[1], meaning=side[2]) if side is not None else None
    return Organ(value=row.value, name=row.name, display_name=row.display_name, color=row.color,
                 type=Code(value=row.code, meaning=row.meaning), type_modifier=modifier, side=row.side,
                 minority=row.minority)


BTCV13: list[Organ] = [_organ(r) for r in organcatalog.BTCV13]
AMOS_EXTRAS: list[Organ] = [_organ(r) for r in organcatalog.AMOS_EXTRAS]

# Splenic vein is kept as a known concept so importers can map a separate splenic-vein label onto segment 10.
SPLENIC_VEIN = Code(value="35819009", meaning="Splenic vein")

CATALOG: dict[str, Organ] = {o.name: o for o in BTCV13 + AMOS_EXTRAS}

class OrganSchema(BaseModel):
    """The ordered set of organs of one model. Channel k of the network output is organ with value k."""

    organs: list[Organ]

    @model_validator(mode="after")
    def _check(self) -> OrganSchema:
        values = [o.value for o in self.organs]
        names = [o.name for o in self.organs]
        if len(set(values)) != len(values) or len(set(names)) != len(names):
            raise ValueError("organ values and names must be unique")
        if sorted(values) != list(range(1, len(values) + 1)):
            raise ValueError(f"organ values must be 1..N without gaps, got {values}")
        return self

    @classmethod
    def btcv13(cls) -> OrganSchema:
        return cls(organs=[o.model_copy() for o in BTCV13])

    @classmethod
    def from_names(cls, names: list[str]) -> OrganSchema:
        """A schema of catalog organs in the given order, renumbered 1..N."""
        organs = []
        for i, n in enumerate(names, start=1):
            key = canonical_name(n)
            if key not in CATALOG:
                raise DinomixError(f"unknown organ '{n}'; known organs: {', '.join(CATALOG)}")
            organs.append(CATALOG[key].model_copy(update={"value": i}))
        return cls(organs=organs)

    @property
    def num_classes(self) -> int:
        """Network output channels: background plus one per organ."""
        return len(self.organs) + 1

    @property
    def names(self) -> list[str]:
        return [o.name for o in self.organs]

    def by_name(self, name: str) -> Organ:
        key = canonical_name(name)
        for o in self.organs:
            if o.name == key:
                return o
        raise DinomixError(f"this model has no organ '{name}'; it knows: {', '.join(self.names)}")

    def by_value(self, value: int) -> Organ:
        for o in self.organs:
            if o.value == value:
                return o
        raise KeyError(value)

    def select(self, names: Optional[list[str]]) -> list[Organ]:
        """The organs named (all when None), in schema order; unknown names are an error."""
        if not names:
            return list(self.organs)
        wanted = {self.by_name(n).name for n in names}
        return [o for o in self.organs if o.name in wanted]

    def side_pairs(self) -> list[tuple[Organ, Organ]]:
        """(right, left) pairs of the same organ type, e.g. kidneys and adrenal glands."""
        pairs = []
        for r in self.organs:
            if r.side != "right":
                continue
            for l_ in self.organs:
                if l_.side == "left" and l_.type.value == r.type.value:
                    pairs.append((r, l_))
        return pairs
