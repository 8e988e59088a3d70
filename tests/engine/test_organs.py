"""The organ schema: the 13 BTCV organs, their order, names and DICOM/SNOMED CT terminology."""

from __future__ import annotations

import pytest

from dinomix.errors import DinomixError
from dinomix.organs import OrganSchema

# (label value, name, SNOMED CT type code, laterality modifier code) in BTCV label order.
BTCV_ORGANS = [
    (1, "spleen", "78961009", None),
    (2, "kidney_right", "64033007", "24028007"),
    (3, "kidney_left", "64033007", "7771000"),
    (4, "gallbladder", "28231008", None),
    (5, "esophagus", "32849002", None),
    (6, "liver", "10200004", None),
    (7, "stomach", "69695003", None),
    (8, "aorta", "15825003", None),
    (9, "inferior_vena_cava", "64131007", None),
    (10, "portal_vein_and_splenic_vein", "32764006", None),
    (11, "pancreas", "15776009", None),
    (12, "adrenal_gland_right", "23451007", "24028007"),
    (13, "adrenal_gland_left", "23451007", "7771000"),
]


def test_btcv13_has_the_13_btcv_organs_in_btcv_label_order():
    schema = OrganSchema.btcv13()
    assert [(o.value, o.name) for o in schema.organs] == [(v, n) for v, n, _, _ in BTCV_ORGANS]
    assert schema.num_classes == 14


@pytest.mark.parametrize("value,name,type_code,modifier_code", BTCV_ORGANS, ids=[o[1] for o in BTCV_ORGANS])
def test_each_btcv_organ_carries_its_snomed_type_and_laterality(value, name, type_code, modifier_code):
    organ = OrganSchema.btcv13().by_value(value)
    assert organ.name == name
    assert (organ.type.scheme, organ.type.value) == ("SCT", type_code)
    if modifier_code is None:
        assert organ.type_modifier is None
    else:
        assert (organ.type_modifier.scheme, organ.type_modifier.value) == ("SCT", modifier_code)


def test_every_btcv_organ_is_in_the_anatomical_structure_category():
    for organ in OrganSchema.btcv13().organs:
        assert (organ.category.scheme, organ.category.value) == ("SCT", "123037004")


def test_every_btcv_organ_has_a_display_name_and_an_rgb_colour():
    for organ in OrganSchema.btcv13().organs:
        assert organ.display_name.strip()
        assert len(organ.color) == 3 and all(0 <= c <= 255 for c in organ.color)


def test_kidneys_and_adrenal_glands_are_right_left_pairs():
    pairs = [(r.name, l_.name) for r, l_ in OrganSchema.btcv13().side_pairs()]
    assert pairs == [("kidney_right", "kidney_left"), ("adrenal_gland_right", "adrenal_gland_left")]


def test_amos_extras_join_a_schema_by_name_without_code_changes():
    schema = OrganSchema.from_names(["liver", "duodenum", "urinary_bladder", "prostate_or_uterus"])
    assert schema.names == ["liver", "duodenum", "urinary_bladder", "prostate_or_uterus"]
    assert [o.value for o in schema.organs] == [1, 2, 3, 4]  # renumbered in the order given
    assert schema.by_name("duodenum").type.value == "38848004"
    assert schema.by_name("urinary_bladder").type.value == "89837001"


def test_a_btcv_plus_amos_schema_keeps_btcv_values_and_appends_the_extras():
    schema = OrganSchema.from_names([o[1] for o in BTCV_ORGANS] + ["duodenum", "urinary_bladder",
                                                                    "prostate_or_uterus"])
    assert [(o.value, o.name) for o in schema.organs[:13]] == [(v, n) for v, n, _, _ in BTCV_ORGANS]
    assert schema.num_classes == 17


def test_other_datasets_organ_names_map_onto_the_catalog():
    schema = OrganSchema.from_names(["Right Kidney", "left_kidney", "IVC", "gall_bladder", "portal_vein"])
    assert schema.names == ["kidney_right", "kidney_left", "inferior_vena_cava", "gallbladder",
                            "portal_vein_and_splenic_vein"]


def test_an_unknown_organ_name_is_a_clear_error():
    with pytest.raises(DinomixError, match="unknown organ 'heart'"):
        OrganSchema.from_names(["liver", "heart"])


def test_duplicate_organs_are_refused():
    with pytest.raises(ValueError, match="unique"):
        OrganSchema.from_names(["liver", "liver"])


# ---------------------------------------------------------------- the plain-data catalog the Slicer modules read

def test_the_plain_catalog_imports_the_standard_library_only():
    """The Slicer modules read organ names and terminology on Slicer's main thread: no pydantic import there."""
    import subprocess
    import sys

    code = ("import sys\n"
            "before = set(sys.modules)\n"
            "import dinomix.organcatalog as c\n"
            "c.catalog_terminology('ivc')\n"
            "new = {n.split('.')[0] for n in set(sys.modules) - before}\n"
            "assert 'pydantic' not in sys.modules, sorted(new)\n"
            "assert new <= set(sys.stdlib_module_names) | {'dinomix'}, sorted(new)\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]


def test_validated_organs_and_plain_rows_say_the_same_thing():
    from dinomix import organcatalog
    from dinomix.organs import CATALOG

    assert list(CATALOG) == list(organcatalog.ROWS)
    for name, organ in CATALOG.items():
        row = organcatalog.ROWS[name]
        assert (organ.value, organ.display_name, organ.color, organ.type.value, organ.type.meaning, organ.side,
                organ.minority) == (row.value, row.display_name, row.color, row.code, row.meaning, row.side,
                                    row.minority)
        assert organcatalog.catalog_terminology(name) == organ.terminology_string()


def test_the_plain_catalog_knows_other_datasets_names_and_not_unknown_ones():
    from dinomix import organcatalog

    assert organcatalog.catalog_terminology("Right Adrenal Gland") == \
        organcatalog.catalog_terminology("adrenal_gland_right")
    assert "^24028007^Right" in organcatalog.catalog_terminology("right_kidney")
    assert organcatalog.catalog_terminology("tumour") is None
