"""The organ catalog as plain data: names, aliases and Slicer terminology strings (engine and Slicer modules)."""

# The Slicer modules need organ names, aliases and terminology strings inside Slicer's own process, on its main
# thread (a Python thread there barely runs: Slicer's main thread holds the GIL while idle). So this module stays
# light: standard library only, no pydantic (tests/engine/test_organs.py checks that it imports in a few ms and
# that dinomix.organs builds its validated `Organ` objects from these rows and nothing else).

from __future__ import annotations

from typing import Final, NamedTuple, Optional

SCT: Final = "SCT"
ANATOMICAL_STRUCTURE: Final = ("SCT", "123037004", "Anatomical Structure")
RIGHT: Final = ("SCT", "24028007", "Right")
LEFT: Final = ("SCT", "7771000", "Left")
CONTEXT: Final = "Segmentation category and type - DICOM master list"
ANATOMIC_CONTEXT: Final = "Anatomic codes - DICOM master list"


class OrganRow(NamedTuple):
    """One catalog organ: label value in the BTCV/AMOS order, machine name, display name, colour, SNOMED CT type
    code and meaning, side of a paired organ, and whether class-balanced training favours it (small organ)."""

    value: int
    name: str
    display_name: str
    color: tuple[int, int, int]
    code: str
    meaning: str
    side: Optional[str] = None
    minority: bool = False


# The 13 BTCV / Synapse organs in BTCV label order. Colours follow Slicer's generic anatomy colours.
BTCV13: Final[tuple[OrganRow, ...]] = (
    OrganRow(1, "spleen", "Spleen", (157, 108, 162), "78961009", "Spleen"),
    OrganRow(2, "kidney_right", "Right kidney", (185, 102, 83), "64033007", "Kidney", side="right"),
    OrganRow(3, "kidney_left", "Left kidney", (185, 102, 83), "64033007", "Kidney", side="left"),
    OrganRow(4, "gallbladder", "Gallbladder", (139, 150, 98), "28231008", "Gallbladder", minority=True),
    OrganRow(5, "esophagus", "Esophagus", (211, 171, 143), "32849002", "Esophagus", minority=True),
    OrganRow(6, "liver", "Liver", (221, 130, 101), "10200004", "Liver"),
    OrganRow(7, "stomach", "Stomach", (216, 132, 105), "69695003", "Stomach"),
    OrganRow(8, "aorta", "Aorta", (224, 97, 76), "15825003", "Aorta"),
    OrganRow(9, "inferior_vena_cava", "Inferior vena cava", (0, 151, 206), "64131007", "Inferior vena cava"),
    # Portal and splenic vein are one combined segment in BTCV; coded by the portal vein concept.
    OrganRow(10, "portal_vein_and_splenic_vein", "Portal and splenic vein", (0, 112, 165), "32764006",
             "Portal vein", minority=True),
    OrganRow(11, "pancreas", "Pancreas", (249, 180, 111), "15776009", "Pancreas", minority=True),
    OrganRow(12, "adrenal_gland_right", "Right adrenal gland", (244, 214, 49), "23451007", "Adrenal gland",
             side="right", minority=True),
    OrganRow(13, "adrenal_gland_left", "Left adrenal gland", (244, 214, 49), "23451007", "Adrenal gland",
             side="left", minority=True),
)

# AMOS extras, so a later model can add them by listing them in its schema (no code change).
AMOS_EXTRAS: Final[tuple[OrganRow, ...]] = (
    OrganRow(14, "duodenum", "Duodenum", (255, 253, 229), "38848004", "Duodenum"),
    OrganRow(15, "urinary_bladder", "Urinary bladder", (222, 154, 132), "89837001", "Urinary bladder"),
    # AMOS labels prostate and uterus as one class; coded by the pelvic-organ concept a reader sees first.
    OrganRow(16, "prostate_or_uterus", "Prostate / uterus", (230, 158, 140), "41216001", "Prostate"),
)

ROWS: Final[dict[str, OrganRow]] = {o.name: o for o in BTCV13 + AMOS_EXTRAS}

# Names other datasets use for the same structures (TotalSegmentator v2, AMOS, CHAOS, MONAI bundles).
ALIASES: Final[dict[str, str]] = {
    "right_kidney": "kidney_right", "left_kidney": "kidney_left",
    "right_adrenal_gland": "adrenal_gland_right", "left_adrenal_gland": "adrenal_gland_left",
    "adrenal_right": "adrenal_gland_right", "adrenal_left": "adrenal_gland_left",
    "ivc": "inferior_vena_cava", "postcava": "inferior_vena_cava",
    "portal_vein": "portal_vein_and_splenic_vein", "splenic_vein": "portal_vein_and_splenic_vein",
    "gall_bladder": "gallbladder", "oesophagus": "esophagus", "bladder": "urinary_bladder",
    "prostate/uterus": "prostate_or_uterus", "prostate_uterus": "prostate_or_uterus",
}


def canonical_name(name: str) -> str:
    """Map a dataset's organ name onto the catalog name (case, spaces, hyphens and known aliases)."""
    key = name.strip().lower().replace(" ", "_").replace("-", "_")
    return ALIASES.get(key, key)


def side_modifier(side: Optional[str]) -> Optional[tuple[str, str, str]]:
    """The DICOM type-modifier code of a paired organ's side (None for unpaired organs)."""
    return {"right": RIGHT, "left": LEFT}.get(side or "")


def terminology_string(category: Optional[tuple[str, str, str]], type_: Optional[tuple[str, str, str]],
                       modifier: Optional[tuple[str, str, str]]) -> str:
    """Slicer's terminology entry string (the vtkSlicerTerminologyEntry serialisation) from code triplets."""
    def triplet(c: Optional[tuple[str, str, str]]) -> str:
        return "^".join(c) if c is not None else "^^"

    return "~".join([CONTEXT, triplet(category), triplet(type_), triplet(modifier), ANATOMIC_CONTEXT, "^^", "^^"])


def catalog_terminology(name: str) -> Optional[str]:
    """The terminology string of a catalog organ, by any of its names or aliases; None if it is not catalogued."""
    row = ROWS.get(canonical_name(name))
    if row is None:
        return None
    return terminology_string(ANATOMICAL_STRUCTURE, (SCT, row.code, row.meaning), side_modifier(row.side))
