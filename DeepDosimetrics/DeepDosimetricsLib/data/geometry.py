"""Image geometry: size, spacing, origin and direction, and the index-to-physical transforms.

Sizes, spacings and origins are in ITK order (x, y, z); physical coordinates are LPS millimetres
as in ITK/DICOM. Slicer works in RAS: ``ijk_to_ras`` flips the first two physical axes.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Optional, Sequence, Tuple

import numpy as np

if TYPE_CHECKING:  # SimpleITK (88 MB of library pages) is imported where an image is made
    import SimpleITK as sitk

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


#: direction cosines smaller than this are rounding noise, set to 0
DIRECTION_EPSILON = 1e-12


def snap_direction(direction: Sequence[float]) -> Tuple[float, ...]:
    """Direction cosines with entries below ``DIRECTION_EPSILON`` set to 0.

    ITK inverts the direction matrix with an SVD that fails on subnormal entries (e.g. 2e-308 written in a
    header): every point then maps outside the image, and a resampled mask or dose comes out empty
    without an error (found by the fuzz tests).
    """
    return tuple(0.0 if abs(float(v)) < DIRECTION_EPSILON else float(v) for v in direction)


@dataclass(frozen=True)
class Geometry:
    """The sampling grid of a 3D image."""

    size: Tuple[int, int, int]
    spacing: Tuple[float, float, float]
    origin: Tuple[float, float, float]
    direction: Tuple[float, ...] = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)

    @classmethod
    def from_image(cls, image: sitk.Image) -> Geometry:
        """The geometry of a 3D SimpleITK image."""
        return cls(
            size=tuple(int(v) for v in image.GetSize()),
            spacing=tuple(float(v) for v in image.GetSpacing()),
            origin=tuple(float(v) for v in image.GetOrigin()),
            direction=tuple(float(v) for v in image.GetDirection()),
        )

    @classmethod
    def from_dict(cls, data: dict) -> Geometry:
        """Inverse of ``to_dict``."""
        return cls(
            size=tuple(int(v) for v in data["size"]),
            spacing=tuple(float(v) for v in data["spacing"]),
            origin=tuple(float(v) for v in data["origin"]),
            direction=tuple(float(v) for v in data["direction"]),
        )

    def to_dict(self) -> dict:
        """A JSON-friendly dictionary."""
        return {key: list(value) for key, value in asdict(self).items()}

    @property
    def shape_zyx(self) -> Tuple[int, int, int]:
        """The numpy array shape (z, y, x) of an image on this grid."""
        return (self.size[2], self.size[1], self.size[0])

    @property
    def voxel_volume_mm3(self) -> float:
        """Volume of one voxel in cubic millimetres."""
        return float(np.prod(self.spacing))

    @property
    def direction_matrix(self) -> np.ndarray:
        """The 3x3 direction cosines (columns are the index axes)."""
        return np.asarray(self.direction, dtype=float).reshape(3, 3)

    def ijk_to_lps(self) -> np.ndarray:
        """4x4 matrix mapping (i, j, k, 1) continuous indices to LPS millimetres."""
        matrix = np.eye(4)
        matrix[:3, :3] = self.direction_matrix @ np.diag(self.spacing)
        matrix[:3, 3] = self.origin
        return matrix

    def ijk_to_ras(self) -> np.ndarray:
        """4x4 matrix mapping (i, j, k, 1) to RAS millimetres, as Slicer's IJKToRAS."""
        return LPS_TO_RAS @ self.ijk_to_lps()

    def index_to_physical(self, ijk: Sequence[float]) -> np.ndarray:
        """LPS coordinates of a continuous (i, j, k) index."""
        return (self.ijk_to_lps() @ np.append(np.asarray(ijk, dtype=float), 1.0))[:3]

    def physical_to_index(self, lps: Sequence[float]) -> np.ndarray:
        """Continuous (i, j, k) index of an LPS point."""
        return (np.linalg.inv(self.ijk_to_lps()) @ np.append(np.asarray(lps, dtype=float), 1.0))[:3]

    def corners_lps(self) -> np.ndarray:
        """The 8 corners of the image's extent (voxel edges, not centres) in LPS, shape (8, 3)."""
        lo = np.full(3, -0.5)
        hi = np.asarray(self.size, dtype=float) - 0.5
        corners = np.array([[x, y, z] for x in (lo[0], hi[0]) for y in (lo[1], hi[1]) for z in (lo[2], hi[2])])
        return np.array([self.index_to_physical(c) for c in corners])

    def bounds_lps(self) -> Tuple[np.ndarray, np.ndarray]:
        """Axis-aligned physical bounding box (min, max) of the image's extent."""
        corners = self.corners_lps()
        return corners.min(axis=0), corners.max(axis=0)

    def overlaps(self, other: Geometry) -> bool:
        """Whether the physical bounding boxes of the two grids intersect."""
        lo_a, hi_a = self.bounds_lps()
        lo_b, hi_b = other.bounds_lps()
        return bool(np.all(lo_a < hi_b) and np.all(lo_b < hi_a))

    def reference_image(self, pixel_id: Optional[int] = None) -> sitk.Image:
        """An image on this grid (zero-filled; ``pixel_id`` None: 8-bit unsigned), usable as a resampling
        reference."""
        import SimpleITK as sitk

        image = sitk.Image([int(v) for v in self.size], sitk.sitkUInt8 if pixel_id is None else pixel_id)
        self.apply_to(image)
        return image

    def apply_to(self, image: sitk.Image) -> sitk.Image:
        """Set this geometry's spacing, origin and direction on an image of the same size."""
        if tuple(image.GetSize()) != tuple(self.size):
            raise ValueError(f"image size {image.GetSize()} differs from the geometry's {self.size}")
        image.SetSpacing(self.spacing)
        image.SetOrigin(self.origin)
        image.SetDirection(self.direction)
        return image

    def image_from_array(self, array_zyx: np.ndarray) -> sitk.Image:
        """A SimpleITK image of a (z, y, x) array with this geometry."""
        import SimpleITK as sitk

        image = sitk.GetImageFromArray(array_zyx)
        return self.apply_to(image)

    def isclose(self, other: Geometry, tolerance: float = 1e-4) -> bool:
        """Same grid up to a small tolerance on spacing, origin (mm) and direction."""
        return (
            tuple(self.size) == tuple(other.size)
            and np.allclose(self.spacing, other.spacing, atol=tolerance)
            and np.allclose(self.origin, other.origin, atol=tolerance)
            and np.allclose(self.direction, other.direction, atol=tolerance)
        )
