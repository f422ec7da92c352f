"""The imaging modality of a patient's image: what it is, and so which value checks apply to it.

A patient's image (``ct.nrrd``, the grid of its structures and dose) is a CT in most cohorts, but may be an
MR (MR-guided radiotherapy, brain and prostate planning MR), a PET or another image. The value checks of
:mod:`DeepDosimetricsLib.data.checks` depend on it: the HU checks apply to a CT only.

Where the modality comes from, first found first:

1. the data: the patient's ``import.json`` (``ct.modality``: the DICOM Modality of the imported series, or
   what the folder importer found or was told), else the image header: an NRRD/MetaImage key ``Modality``
   (or ``0008|0060``, the DICOM tag as ITK names it; MetaImage's own ``MET_MOD_MR``...), a NIfTI ``descrip``
   holding ``Modality=MR``;
2. the option (``--modality``, ``Patient(modality=...)``) when the data say nothing; when both say and
   disagree, the patient is refused (one of them is wrong);
3. else CT (``DEFAULT_MODALITY``): every cohort made before the modality was recorded is a CT cohort.

Codes are DICOM's (PS3.3 C.7.3.1.1.1): ``CT``, ``MR``, ``PT`` (PET), ``OT`` (other); ``MRI``, ``PET`` and
``OTHER`` are read as those. Any other code a header gives (``NM``, ``US``...) is kept and checked as an
image without a value scale (``OT``).
"""

from __future__ import annotations

import re
from typing import Callable, Iterable, Optional, Tuple

from DeepDosimetricsLib.runtime.errors import InputError

AUTO = "auto"
CT = "CT"
#: the modality of an image nothing describes
DEFAULT_MODALITY = CT
#: what ``--modality`` offers: ``auto`` (the data say, else CT) and the codes with their own checks
MODALITY_CHOICES = (AUTO, "CT", "MR", "PT", "OT")
#: header keys (NRRD/MetaImage key-value pairs, ITK's name of the DICOM tag) that may hold the modality
HEADER_KEYS = ("Modality", "modality", "0008|0060")
#: NIfTI has no key-value pairs: its 80-character ``descrip`` may hold ``Modality=MR``
DESCRIPTION_KEY = "descrip"
_ALIASES = {"MRI": "MR", "PET": "PT", "OTHER": "OT", "UNKNOWN": None, "": None}
_DESCRIPTION = re.compile(r"\bmodality\s*[=:]\s*([A-Za-z][A-Za-z0-9]{0,15})", re.IGNORECASE)
_CODE = re.compile(r"^[A-Z][A-Z0-9]{0,15}$")


def normalize_modality(text: object) -> Optional[str]:
    """A modality code (``"mr"`` -> ``MR``, ``PET`` -> ``PT``, MetaImage's ``MET_MOD_CT`` -> ``CT``); None
    for an empty or unknown value, InputError for text that is no modality code."""
    code = str(text or "").strip().upper()
    if code.startswith("MET_MOD_"):
        code = code[len("MET_MOD_"):]
    if code in _ALIASES:
        return _ALIASES[code]
    if not _CODE.match(code):
        raise InputError(f"{str(text)!r} is not a modality (a DICOM code such as CT, MR, PT or OT)")
    return code


def parse_modality_option(text: str) -> str:
    """The value of a ``--modality`` option: ``auto`` or one of ``MODALITY_CHOICES`` (any case, aliases
    read); InputError naming the choices otherwise."""
    if str(text).strip().lower() == AUTO:
        return AUTO
    try:
        code = normalize_modality(text)
    except InputError:
        code = None
    if code not in MODALITY_CHOICES:
        raise InputError(f"unknown modality {text!r}; choose one of: {', '.join(MODALITY_CHOICES)}")
    return code


def metadata_modality(keys: Iterable[str], value: Callable[[str], str]) -> Optional[str]:
    """The modality an image header declares (``keys`` and ``value(key)`` of a SimpleITK image or
    ImageFileReader), or None. A value that is no modality code is ignored (headers hold free text)."""
    keys = set(keys)
    for key in HEADER_KEYS:
        if key in keys:
            try:
                code = normalize_modality(value(key))
            except InputError:
                continue
            if code:
                return code
    if DESCRIPTION_KEY in keys:
        match = _DESCRIPTION.search(value(DESCRIPTION_KEY) or "")
        if match:
            return normalize_modality(match.group(1))
    return None


def image_modality(image) -> Optional[str]:
    """The modality a SimpleITK image or ImageFileReader declares in its header, or None."""
    return metadata_modality(image.GetMetaDataKeys(), image.GetMetaData)


def resolve_modality(declared: Optional[str], declared_by: str, option: str, what: str) -> Tuple[str, str]:
    """(modality, where it comes from) of an image: what the data declare, else the option, else CT.

    Raises InputError when the data and the option (not ``auto``) disagree."""
    option = parse_modality_option(option)
    if declared:
        if option not in (AUTO, declared):
            raise InputError(f"{what} is {declared} by its {declared_by}, but the modality {option} was given "
                             "(--modality); one of them is wrong")
        return declared, declared_by
    if option != AUTO:
        return option, "option --modality"
    return DEFAULT_MODALITY, "default"
