"""Structure-name normalisation through a configurable synonym map, and the choice of the target (PTV).

The packaged map is ``Resources/synonyms.yaml``; a user YAML file with the same sections extends it and
wins where both list the same alias (``load_synonyms(path)`` or ``$DEEPDOSIMETRICS_SYNONYMS``).
Names are matched on a key that ignores case and any character that is not a letter or a digit.
"""

from __future__ import annotations

import functools
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping, Optional, Union

from DeepDosimetricsLib.runtime.errors import InputError
from DeepDosimetricsLib.runtime.resources import resource_path

#: the packaged synonym file
DEFAULT_SYNONYMS_FILE = resource_path("synonyms.yaml")
#: environment variable naming a user synonym file that extends the packaged one
SYNONYMS_ENV = "DEEPDOSIMETRICS_SYNONYMS"

#: side words recognised before or after a paired organ (keys: lower case, letters and digits only)
SIDE_WORDS: dict[str, str] = {
    **dict.fromkeys(["left", "lt", "l", "sx", "sin", "sinistro", "sinistra", "sn"], "L"),
    **dict.fromkeys(["right", "rt", "r", "dx", "destro", "destra", "ds"], "R"),
}

_UNSAFE_CHARACTERS = re.compile(r'[\s/\\:*?"<>|]+')
_DOSE_LEVEL = re.compile(r"^[\s_\-.]*(?P<level>\d+(?:[.,]\d+)?)\s*(?:c?gy)?$")


def name_key(name: str) -> str:
    """The matching key of a name: lower case, letters and digits only ("Lt Lung" -> "ltlung")."""
    return "".join(character for character in name.lower() if character.isalnum())


def safe_name(name: str) -> str:
    """A name usable as a file name: trimmed, runs of spaces and path characters replaced by '_'."""
    cleaned = _UNSAFE_CHARACTERS.sub("_", name.strip()).strip("_.")
    return cleaned or "unnamed"


@dataclass
class SynonymMap:
    """Alias keys -> canonical names, paired organs (left/right) and target-volume prefixes."""

    aliases: dict[str, str] = field(default_factory=dict)
    paired: dict[str, str] = field(default_factory=dict)
    targets: list[str] = field(default_factory=list)

    @classmethod
    def from_mapping(cls, data: Mapping, source: str = "synonyms") -> SynonymMap:
        """Build from the YAML structure (sections ``synonyms``, ``paired``, ``targets``)."""
        synonym_map = cls()
        synonym_map.update(data, source)
        return synonym_map

    def update(self, data: Mapping, source: str = "synonyms") -> None:
        """Add the entries of ``data`` (same sections as the YAML file); later entries win."""
        if not isinstance(data, Mapping):
            raise InputError(f"{source}: expected a mapping with 'synonyms', 'paired' and 'targets'")
        unknown = set(data) - {"synonyms", "paired", "targets"}
        if unknown:
            raise InputError(f"{source}: unknown section(s) {sorted(unknown)}; "
                             "expected 'synonyms', 'paired', 'targets'")
        for section, table in (("synonyms", self.aliases), ("paired", self.paired)):
            entries = data.get(section) or {}
            if not isinstance(entries, Mapping):
                raise InputError(f"{source}: '{section}' must map a canonical name to a list of aliases")
            for canonical, aliases in entries.items():
                if isinstance(aliases, str) or not isinstance(aliases, (list, tuple, type(None))):
                    raise InputError(f"{source}: aliases of '{canonical}' must be a list")
                for alias in [canonical, *(aliases or [])]:
                    table[name_key(str(alias))] = str(canonical)
        for prefix in data.get("targets") or []:
            if str(prefix).upper() not in self.targets:
                self.targets.append(str(prefix).upper())

    def normalize(self, name: str) -> str:
        """The canonical name of ``name`` (unknown names are only made file-safe)."""
        key = name_key(name)
        if key in self.aliases:
            return self.aliases[key]
        target = self._target_name(name)
        if target:
            return target
        paired = self._paired_name(key)
        if paired:
            return paired
        return safe_name(name)

    def _target_name(self, name: str) -> Optional[str]:
        text = name.strip().lower()
        for prefix in self.targets:
            if not text.startswith(prefix.lower()):
                continue
            rest = text[len(prefix):]
            if not name_key(rest):
                return prefix
            match = _DOSE_LEVEL.match(rest)
            if match:
                return f"{prefix}{match.group('level').replace(',', '.')}"
        return None

    def _paired_name(self, key: str) -> Optional[str]:
        # longest aliases first, so "opticnerve" is tried before a shorter alias it contains
        for alias in sorted(self.paired, key=len, reverse=True):
            if key.startswith(alias) and key[len(alias):] in SIDE_WORDS:
                return f"{self.paired[alias]}_{SIDE_WORDS[key[len(alias):]]}"
            if key.endswith(alias) and key[: len(key) - len(alias)] in SIDE_WORDS:
                return f"{self.paired[alias]}_{SIDE_WORDS[key[: len(key) - len(alias)]]}"
        return None


def _read_yaml(path: Path) -> Mapping:
    import yaml

    try:
        with open(path, encoding="utf-8") as stream:
            return yaml.safe_load(stream) or {}
    except OSError as error:
        raise InputError(f"cannot read the synonym file {path}: {error.strerror or error}") from error
    except yaml.YAMLError as error:
        raise InputError(f"synonym file {path} is not valid YAML: {error}") from error


@functools.lru_cache(maxsize=8)
def _load_cached(user_file: Optional[str], modified: float = 0.0) -> SynonymMap:
    synonym_map = SynonymMap.from_mapping(_read_yaml(DEFAULT_SYNONYMS_FILE), str(DEFAULT_SYNONYMS_FILE))
    if user_file:
        synonym_map.update(_read_yaml(Path(user_file)), user_file)
    return synonym_map


def load_synonyms(path: Union[str, os.PathLike, None] = None) -> SynonymMap:
    """The packaged synonym map extended by ``path`` (or by ``$DEEPDOSIMETRICS_SYNONYMS`` when None)."""
    user_file = path if path is not None else os.environ.get(SYNONYMS_ENV) or None
    if not user_file:
        return _load_cached(None)
    resolved = Path(user_file).resolve()
    modified = resolved.stat().st_mtime if resolved.exists() else 0.0  # an edited file is read again
    return _load_cached(str(resolved), modified)


SynonymsArgument = Union[SynonymMap, Mapping, str, os.PathLike, None]


def as_synonym_map(synonyms: SynonymsArgument = None) -> SynonymMap:
    """Accept a SynonymMap, a YAML-like mapping (extends the default), a file path, or None (default)."""
    if isinstance(synonyms, SynonymMap):
        return synonyms
    if isinstance(synonyms, Mapping):
        base = load_synonyms()
        synonym_map = SynonymMap(dict(base.aliases), dict(base.paired), list(base.targets))
        if not {"synonyms", "paired", "targets"} & set(synonyms):
            synonyms = {"synonyms": synonyms}  # a plain {canonical: [aliases]} mapping
        synonym_map.update(synonyms, "synonyms argument")
        return synonym_map
    return load_synonyms(synonyms)


def normalize_name(name: str, synonyms: SynonymsArgument = None) -> str:
    """Canonical structure name: ``"ptv_70"`` -> ``"PTV70"``, ``"cuore"`` -> ``"Heart"``, ``"Lt Lung"`` -> ``"Lung_L"``."""
    return as_synonym_map(synonyms).normalize(name)


def dose_level(name: str, synonyms: SynonymsArgument = None) -> Optional[float]:
    """The dose level in Gy written in a PTV's name (PTV70 -> 70.0, PTV_5040 -> 50.4), else None."""
    canonical = normalize_name(name, synonyms)
    match = re.fullmatch(r"PTV(\d+(?:\.\d+)?)", canonical.replace(",", "."))
    if not match:
        return None
    level = float(match.group(1))
    return level / 100.0 if level >= 200 else level  # cGy written in the name


def choose_target(structure_names: Iterable[str], preferred: Optional[str] = None,
                  synonyms: SynonymsArgument = None) -> Optional[str]:
    """The target structure (as spelled in ``structure_names``), or None.

    ``preferred`` (matched exactly, then through the synonym map) wins; otherwise the structure whose
    canonical name is PTV, else the PTV with the highest dose level in its name (PTV70 over PTV63).
    Returns None when nothing fits (also when ``preferred`` is absent: the caller reports it).
    """
    names = list(structure_names)
    synonym_map = as_synonym_map(synonyms)
    if preferred is not None:
        if preferred in names:
            return preferred
        wanted = synonym_map.normalize(preferred)
        return next((name for name in names if synonym_map.normalize(name) == wanted), None)
    exact = [name for name in names if synonym_map.normalize(name) == "PTV"]
    if exact:
        return exact[0]
    levels = [(dose_level(name, synonym_map), index, name) for index, name in enumerate(names)]
    levels = [(level, -index, name) for level, index, name in levels if level is not None]
    return max(levels)[2] if levels else None
