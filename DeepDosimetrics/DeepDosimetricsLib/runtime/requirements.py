"""The Python requirements of the library: one list for pyproject.toml, the Slicer module and the docs.

Each :class:`Requirement` is one line of :data:`REQUIREMENTS`: the distribution name, its version
specifier exactly as ``pyproject.toml`` writes it, the module to import, the pyproject group (``None`` for
``[project] dependencies``, else the optional-dependency extra) and how Slicer gets it:

- ``pip``: installed on first use with ``slicer.util.pip_install`` at this specifier, after asking once;
- ``torch``: through the PyTorch extension (``PyTorchUtilsLogic().installTorch``), which picks the build
  for the machine's GPU driver;
- ``slicer``: shipped with Slicer (numpy, SimpleITK, vtk, slicer itself): never reinstalled;
- ``extension:NAME``: brought by a Slicer extension (pyradiomics by SlicerRadiomics): the user is told
  to install the extension.

``Testing/Python/test_requirements.py`` checks that this list and pyproject.toml agree. To add a
dependency, add its line here and the same specifier to pyproject.toml.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import Callable, Iterable, List, Optional, Sequence

PIP = "pip"
TORCH = "torch"
SLICER = "slicer"
SLICER_RADIOMICS = "extension:SlicerRadiomics"

CORE = None
"""The group of ``[project] dependencies``: what the module needs for anything."""


@dataclass(frozen=True)
class Requirement:
    """One Python requirement (see the module doc for the fields)."""

    name: str
    spec: str
    import_name: str
    extra: Optional[str] = CORE
    install: str = PIP
    #: pip extras written in pyproject only (``[standalone]`` brings slicer-core, which Slicer is)
    pip_extras: str = ""

    @property
    def pyproject(self) -> str:
        """The requirement as pyproject.toml writes it."""
        return f"{self.name}{self.pip_extras}{self.spec}"

    @property
    def pip(self) -> str:
        """The requirement Slicer installs (without pyproject-only extras)."""
        return f"{self.name}{self.spec}"


# fmt: off
REQUIREMENTS: tuple[Requirement, ...] = (
    Requirement("numpy", ">=1.24", "numpy", install=SLICER),
    Requirement("scipy", ">=1.10", "scipy"),
    Requirement("SimpleITK", ">=2.2", "SimpleITK", install=SLICER),
    Requirement("pandas", ">=1.5", "pandas"),
    Requirement("torch", ">=2.1", "torch", install=TORCH),
    Requirement("pyradiomics", ">=3.0.1", "radiomics", install=SLICER_RADIOMICS),
    Requirement("pydicom", ">=2.4", "pydicom"),
    Requirement("PyYAML", ">=6", "yaml"),
    Requirement("tqdm", ">=4.60", "tqdm"),
    Requirement("matplotlib", ">=3.6", "matplotlib"),
    Requirement("scikit-image", ">=0.21", "skimage"),
    Requirement("psutil", ">=5.9", "psutil"),
    Requirement("threadpoolctl", ">=3.1", "threadpoolctl"),
    # outcome analysis (`predict`)
    Requirement("scikit-learn", ">=1.4", "sklearn"),
    Requirement("scikit-survival", ">=0.22", "sksurv"),
    Requirement("neuroCombat", ">=0.2.12", "neuroCombat"),
    Requirement("joblib", ">=1.3", "joblib"),
    # optional groups (pyproject extras)
    Requirement("slicer-core", ">=5.11.0.6,<5.12", "slicer", extra="slicer", install=SLICER),
    Requirement("trame-slicer", "==2.0.0", "trame_slicer", extra="review", pip_extras="[standalone]"),
    Requirement("dask", ">=2024.1", "distributed", extra="cluster", pip_extras="[distributed]"),
    Requirement("flwr", "==1.42.0", "flwr", extra="federated"),
)
# fmt: on

#: pyproject extras that are development tools, not runtime requirements (not in the list)
TOOL_EXTRAS = ("dev", "bench")


def requirements(groups: Iterable[Optional[str]] = (CORE,)) -> List[Requirement]:
    """The requirements of some groups (``None`` = the core dependencies, else extra names)."""
    wanted = set(groups)
    return [r for r in REQUIREMENTS if r.extra in wanted]


def _version_ok(requirement: Requirement) -> bool:
    """Whether the installed distribution satisfies the specifier (True when it cannot be told)."""
    try:
        from importlib.metadata import PackageNotFoundError, version

        from packaging.specifiers import SpecifierSet
    except ImportError:
        return True
    try:
        installed = version(requirement.name)
    except PackageNotFoundError:
        return True  # importable under another distribution name (e.g. Slicer's own build)
    try:
        return SpecifierSet(requirement.spec).contains(installed, prereleases=True)
    except ValueError:
        return True


def missing(
    wanted: Sequence[Requirement],
    find_spec: Callable[[str], object] = importlib.util.find_spec,
    check_versions: bool = True,
) -> List[Requirement]:
    """The requirements that cannot be imported (or, ``check_versions``, are installed too old/new).

    Slicer's own packages are only checked for presence: their version is Slicer's.
    """
    absent = []
    for requirement in wanted:
        try:
            found = find_spec(requirement.import_name) is not None
        except (ImportError, ValueError):
            found = False
        if not found or (check_versions and requirement.install == PIP and not _version_ok(requirement)):
            absent.append(requirement)
    return absent


@dataclass
class InstallPlan:
    """What first use must do about the missing requirements."""

    pip: List[Requirement]
    torch: Optional[Requirement]
    extensions: List[str]  # Slicer extensions the user must install (Extensions Manager)
    slicer: List[Requirement]  # Slicer's own packages missing: a broken Slicer, never reinstalled

    @property
    def empty(self) -> bool:
        return not (self.pip or self.torch or self.extensions or self.slicer)

    def describe(self) -> str:
        """A message for the confirmation dialog."""
        lines = []
        if self.pip:
            lines.append("Python packages to install: " + ", ".join(r.pip for r in self.pip))
        if self.torch:
            lines.append(f"PyTorch ({self.torch.spec}) through the PyTorch extension")
        return "\n".join(lines)


def plan(absent: Sequence[Requirement]) -> InstallPlan:
    """Sort missing requirements by how they are installed."""
    return InstallPlan(
        pip=[r for r in absent if r.install == PIP],
        torch=next((r for r in absent if r.install == TORCH), None),
        extensions=sorted({r.install.split(":", 1)[1] for r in absent if r.install.startswith("extension:")}),
        slicer=[r for r in absent if r.install == SLICER],
    )


def ensure(
    groups: Iterable[Optional[str]],
    confirm: Callable[[str], bool],
    pip_install: Callable[[List[str]], None],
    install_torch: Callable[[str], object],
    find_spec: Callable[[str], object] = importlib.util.find_spec,
) -> bool:
    """Install what the groups need, asking once. Returns True when nothing is missing any more.

    Args:
        groups: requirement groups (``None`` = core, or extra names such as ``"review"``).
        confirm: asks the user (the message lists what will be installed); False cancels everything.
        pip_install: installs pip requirement strings (``slicer.util.pip_install`` in Slicer).
        install_torch: installs torch for a specifier (the PyTorch extension); returns None on refusal.
        find_spec: how presence is checked (tests pass a fake).

    Raises:
        DeepDosimetricsError: a requirement only an extension brings, or one of Slicer's own packages, is
            missing (nothing is installed then).
    """
    from DeepDosimetricsLib.runtime.errors import DeepDosimetricsError

    todo = plan(missing(requirements(groups), find_spec))
    if todo.slicer:
        raise DeepDosimetricsError(
            "Slicer's own Python packages are missing (" + ", ".join(r.name for r in todo.slicer) + "): "
            "reinstall Slicer; they are never installed by this module"
        )
    if todo.extensions:
        raise DeepDosimetricsError(
            "install " + ", ".join(todo.extensions) + " from the Extensions Manager and restart Slicer"
        )
    if todo.empty:
        return True
    if not confirm(todo.describe() + "\n\nInstall now? This may take a few minutes."):
        return False
    if todo.pip:
        pip_install([r.pip for r in todo.pip])
    if todo.torch is not None and install_torch(todo.torch.spec) is None:
        return False
    importlib.invalidate_caches()
    return not missing(requirements(groups), find_spec, check_versions=False)
