"""Patient ids made safe for the file system, once, with the same mapping for every table.

``safe_patient_id(text)``: Unicode NFKC normalisation (so the same id typed or exported differently is
one id), runs of white space -> ``_``, path separators, control characters and the characters Windows
refuses (``<>:"/\\|?*``) -> ``_``, leading/trailing dots and underscores removed, Windows device names
(``CON``, ``NUL``...) suffixed with ``_``, and an id longer than :data:`MAX_ID_BYTES` UTF-8 bytes shortened to
a prefix plus a stable hash of the whole id (``<prefix>-<10 hex>``). An id that is already safe is
returned unchanged, so the mapping is idempotent: ``safe_patient_id(safe_patient_id(x)) ==
safe_patient_id(x)``.

Importers name patient folders with it, and the clinical table's ``patient`` column goes through the
same function (on import and when a cohort is opened), so no clinical row is orphaned.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata

#: the longest patient id (UTF-8 bytes) kept as it is; longer ones get a prefix and a hash
MAX_ID_BYTES = 64
_HASH_CHARACTERS = 10
_UNSAFE = re.compile(r'[\x00-\x1f\x7f<>:"/\\|?*]+')
_SPACES = re.compile(r"\s+")
_RESERVED = {"CON", "PRN", "AUX", "NUL"} | {f"COM{i}" for i in range(1, 10)} | {f"LPT{i}" for i in range(1, 10)}


def safe_patient_id(text: object) -> str:
    """A patient id usable as a folder name on any file system (see the module doc)."""
    original = unicodedata.normalize("NFKC", str(text))
    cleaned = _SPACES.sub("_", original.strip())
    cleaned = _UNSAFE.sub("_", cleaned)
    cleaned = re.sub(r"_{2,}", "_", cleaned).strip("._")
    if not cleaned:
        cleaned = "unnamed"
    if cleaned.split(".")[0].upper() in _RESERVED:
        cleaned += "_"
    if len(cleaned.encode("utf-8")) > MAX_ID_BYTES:
        digest = hashlib.sha256(original.encode("utf-8")).hexdigest()[:_HASH_CHARACTERS]
        keep = MAX_ID_BYTES - _HASH_CHARACTERS - 1
        prefix = cleaned.encode("utf-8")[:keep].decode("utf-8", errors="ignore").rstrip("._-")
        cleaned = f"{prefix}-{digest}"
    return cleaned
