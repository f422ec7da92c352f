"""Structure-name normalisation (packaged and user synonym maps) and the choice of the target."""

from __future__ import annotations

import pytest
from DeepDosimetricsLib.data.synonyms import (
    SYNONYMS_ENV,
    choose_target,
    dose_level,
    load_synonyms,
    normalize_name,
    safe_name,
)
from DeepDosimetricsLib.runtime.errors import InputError


@pytest.mark.parametrize("name, canonical", [
    ("PTV", "PTV"), ("ptv", "PTV"), ("PTV_70", "PTV70"), ("ptv70", "PTV70"), ("PTV 70Gy", "PTV70"),
    ("PTV-56", "PTV56"), ("PTV_50,4", "PTV50.4"), ("CTV_63", "CTV63"), ("GTV", "GTV"),
    # the prototype's Italian names
    ("cuore", "Heart"), ("polmoneSX", "Lung_L"), ("polmoneDX", "Lung_R"), ("esofago", "Esophagus"),
    ("midollo", "SpinalCord"), ("Midollo Spinale", "SpinalCord"), ("parotide_dx", "Parotid_R"),
    # common English variants
    ("Lt Lung", "Lung_L"), ("Left Lung", "Lung_L"), ("lung_rt", "Lung_R"), ("LungR", "Lung_R"),
    ("External", "Body"), ("BODY", "Body"), ("Skin", "Body"), ("Cord", "SpinalCord"),
    ("Spinal Cord", "SpinalCord"), ("SpinalCord", "SpinalCord"), ("LeftParotid", "Parotid_L"),
    ("Parotid_L", "Parotid_L"), ("RightParotid", "Parotid_R"), ("Parotid Rt", "Parotid_R"),
    ("Brain Stem", "Brainstem"), ("Femoral Head L", "Femur_Head_L"), ("OpticNerve_R", "OpticNerve_R"),
    # unknown names are only made file-safe
    ("Tumor Bed Block", "Tumor_Bed_Block"), ("Areola", "Areola"), ("a/b", "a_b"),
])
def test_normalize_name(name, canonical):
    assert normalize_name(name) == canonical


def test_unpaired_names_are_not_split_into_sides():
    assert normalize_name("Lungs") == "Lungs"
    assert normalize_name("Breast") == "Breast"
    assert normalize_name("Lrynx") == "Lrynx"  # a typo stays as it is


def test_safe_name():
    assert safe_name("  Tumor  Bed ") == "Tumor_Bed"
    assert safe_name("///") == "unnamed"


def test_user_file_extends_and_overrides(tmp_path, monkeypatch):
    user = tmp_path / "mine.yaml"
    user.write_text("synonyms:\n  Heart: [coeur]\n  Body: []\n  Skin: [Skin, pelle]\n"
                    "paired:\n  Lung: [poumon]\ntargets: [PTVboost]\n")
    synonyms = load_synonyms(user)
    assert normalize_name("coeur", synonyms) == "Heart"  # extended
    assert normalize_name("cuore", synonyms) == "Heart"  # packaged entries kept
    assert normalize_name("Skin", synonyms) == "Skin"  # overridden: no longer Body
    assert normalize_name("pelle", synonyms) == "Skin"
    assert normalize_name("poumon gauche", synonyms) == "poumon_gauche"  # side word unknown
    assert normalize_name("poumonDX", synonyms) == "Lung_R"
    monkeypatch.setenv(SYNONYMS_ENV, str(user))
    assert normalize_name("coeur") == "Heart"  # through the environment variable
    monkeypatch.delenv(SYNONYMS_ENV)
    assert normalize_name("coeur") == "coeur"


def test_mapping_argument_extends_the_default():
    assert normalize_name("herz", {"Heart": ["herz"]}) == "Heart"
    assert normalize_name("cuore", {"Heart": ["herz"]}) == "Heart"


def test_bad_user_file_is_a_clear_error(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("synonyms:\n  Heart: coeur\n")
    with pytest.raises(InputError, match="aliases of 'Heart' must be a list"):
        load_synonyms(bad)
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("synonym:\n  Heart: [coeur]\n")
    with pytest.raises(InputError, match="unknown section"):
        load_synonyms(unknown)
    with pytest.raises(InputError, match="cannot read"):
        load_synonyms(tmp_path / "missing.yaml")


def test_dose_level():
    assert dose_level("PTV_70") == 70.0
    assert dose_level("ptv 50,4") == 50.4
    assert dose_level("PTV_5040") == 50.4  # cGy in the name
    assert dose_level("PTV") is None
    assert dose_level("Heart") is None


def test_choose_target():
    assert choose_target(["PTV56", "PTV70", "PTV63", "Brainstem"]) == "PTV70"
    assert choose_target(["PTV70", "ptv", "Heart"]) == "ptv"  # the structure named PTV first
    assert choose_target(["ptv_56", "Body"]) == "ptv_56"  # as spelled in the list
    assert choose_target(["PTV_5040", "PTV_6000"]) == "PTV_6000"
    assert choose_target(["Body", "Heart", "PTV_boost"]) is None
    assert choose_target([]) is None


def test_choose_target_preferred():
    names = ["PTV70", "PTV56", "CTV_70"]
    assert choose_target(names, preferred="PTV56") == "PTV56"
    assert choose_target(names, preferred="ptv_56") == "PTV56"  # through the synonym map
    assert choose_target(names, preferred="CTV70") == "CTV_70"
    assert choose_target(names, preferred="PTV63") is None  # absent: the caller reports it
