"""The organs a model knows: label value, name, colour and DICOM/SNOMED terminology.

One `OrganSchema` travels inside every model file, so a model always says which label value means which
organ; the Slicer modules, the `.seg.nrrd` writer and the trainers read names, colours and codes from
here and nowhere else.
"""

from __future__ import annotations

from typing import Optional

from pydantic import BaseModel, Field, field_validator, model_validator

from .errors import DinomixError

SCT = "SCT"
ANATOMICAL_STRUCTURE = ("SCT", "123037004", "Anatomical Structure")
RIGHT = ("SCT", "24028007", "Right")
LEFT = ("SCT", "7771000", "Left")


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
        def triplet(c: Optional[Code]) -> str:
            return "^".join(c.as_triplet()) if c is not None else "^^"

        return "~".join([
            "Segmentation category and type - DICOM master list",
            triplet(self.category), triplet(self.type), triplet(self.type_modifier),
            "Anatomic codes - DICOM master list", "^^", "^^",
        ])


def _organ(value: int, name: str, display: str, color: tuple[int, int, int], code: str, meaning: str,
           side: Optional[str] = None, minority: bool = False) -> Organ:
    modifier = None
    if side == "right":
        modifier = Code(scheme=RIGHT[0], value=RIGHT[1], meaning=RIGHT[2])
    elif side == "left":
        modifier = Code(scheme=LEFT[0], value=LEFT[1], meaning=LEFT[2])
    return Organ(value=value, name=name, display_name=display, color=color,
                 type=Code(value=code, meaning=meaning), type_modifier=modifier, side=side, minority=minority)


# The 13 BTCV / Synapse organs in BTCV label order. Colours follow Slicer's generic anatomy colours.
BTCV13: list[Organ] = [
    _organ(1, "spleen", "Spleen", (157, 108, 162), "78961009", "Spleen"),
    _organ(2, "kidney_right", "Right kidney", (185, 102, 83), "64033007", "Kidney", side="right"),
    _organ(3, "kidney_left", "Left kidney", (185, 102, 83), "64033007", "Kidney", side="left"),
    _organ(4, "gallbladder", "Gallbladder", (139, 150, 98), "28231008", "Gallbladder", minority=True),
    _organ(5, "esophagus", "Esophagus", (211, 171, 143), "32849002", "Esophagus", minority=True),
    _organ(6, "liver", "Liver", (221, 130, 101), "10200004", "Liver"),
    _organ(7, "stomach", "Stomach", (216, 132, 105), "69695003", "Stomach"),
    _organ(8, "aorta", "Aorta", (224, 97, 76), "15825003", "Aorta"),
    _organ(9, "inferior_vena_cava", "Inferior vena cava", (0, 151, 206), "64131007", "Inferior vena cava"),
    # Portal and splenic vein are one combined segment in BTCV; coded by the portal vein concept.
    _organ(10, "portal_vein_and_splenic_vein", "Portal and splenic vein", (0, 112, 165), "32764006",
           "Portal vein", minority=True),
    _organ(11, "pancreas", "Pancreas", (249, 180, 111), "15776009", "Pancreas", minority=True),
    _organ(12, "adrenal_gland_right", "Right adrenal gland", (244, 214, 49), "23451007", "Adrenal gland",
           side="right", minority=True),
    _organ(13, "adrenal_gland_left", "Left adrenal gland", (244, 214, 49), "23451007", "Adrenal gland",
           side="left", minority=True),
]

# AMOS extras, so a later model can add them by listing them in its schema (no code change).
AMOS_EXTRAS: list[Organ] = [
    _organ(14, "duodenum", "Duodenum", (255, 253, 229), "38848004", "Duodenum"),
    _organ(15, "urinary_bladder", "Urinary bladder", (222, 154, 132), "89837001", "Urinary bladder"),
    # AMOS labels prostate and uterus as one class; coded by the pelvic-organ concept a reader sees first.
    _organ(16, "prostate_or_uterus", "Prostate / uterus", (230, 158, 140), "41216001", "Prostate"),
]

# Splenic vein is kept as a known concept so importers can map a separate splenic-vein label onto segment 10.
SPLENIC_VEIN = Code(value="35819009", meaning="Splenic vein")

CATALOG: dict[str, Organ] = {o.name: o for o in BTCV13 + AMOS_EXTRAS}

# Names other datasets use for the same structures (TotalSegmentator v2, AMOS, CHAOS, MONAI bundles).
ALIASES: dict[str, str] = {
    "right_kidney": "kidney_right", "left_kidney": "kidney_left",
    "right_adrenal_gland": "adrenal_gland_right", "left_adrenal_gland": "adrenal_gland_left",
    "adrenal_right": "adrenal_gland_right", "adrenal_left": "adrenal_gland_left",
    "ivc": "inferior_vena_cava", "postcava": "inferior_vena_cava",
    "portal_vein": "portal_vein_and_splenic_vein", "splenic_vein": "portal_vein_and_splenic_vein",
    "gall_bladder": "gallbladder", "oesophagus": "esophagus", "bladder": "urinary_bladder",
    "prostate/uterus": "prostate_or_uterus", "prostate_uterus": "prostate_or_uterus",
}


def canonical_name(name: str) -> str:
    """Map a dataset's organ name onto the catalog name (case, spaces and known aliases)."""
    key = name.strip().lower().replace(" ", "_").replace("-", "_")
    return ALIASES.get(key, key)


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
