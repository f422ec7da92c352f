"""The tiled 3D convolutional autoencoder: K learned features per tile, safe model files.

The encoder maps a tile (C channels, t^3 voxels, values in [0, 1]) through strided convolutions to a
flat vector and a linear layer to K features. The decoder rebuilds every channel from those K numbers
alone (linear layer, reshape, upsampling convolutions): there is no skip connection, so the features
describe the whole tile.

With ``pca_start`` the model is residual around PCA: a linear path (the mean tile m and K principal axes
W of training tiles, frozen; see ``deep/train/pca.py``) runs beside the convolutions, whose contributions
start at exactly zero (zero-initialised gains, as in ReZero)::

    z = ((x - m) W) / s + g_z conv_encoder(x)          s: the axes' standard deviations (unit-scale features)
    y = clip(m + (z s) W^T + g_y conv_decoder(z), 0, 1)   g_z (K,), g_y (C,): trained gains, zero at start

so at step 0 the model reconstructs as PCA with the same K does, and training spends every step on what
PCA cannot represent. The clip passes gradients straight through (an output stuck outside [0, 1] still
learns), and the decoder returns the logit of y, so the losses and ``decode`` are those of the plain model.

A model folder holds ``model.json`` (format tag, configuration, channel labels, training summary) and
``model.pt`` (a plain state dict, read back with ``torch.load(weights_only=True)``: nothing is unpickled
as an arbitrary object).
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import torch
from torch import nn

from DeepDosimetricsLib.runtime.atomic import torch_save_atomic, write_text_atomic
from DeepDosimetricsLib.runtime.errors import InputError

log = logging.getLogger(__name__)

MODEL_FORMAT = "deepdosimetrics-tile-autoencoder"
MODEL_FORMAT_VERSION = 1
MODEL_JSON = "model.json"
MODEL_WEIGHTS = "model.pt"
ACTIVATIONS = ("silu", "leaky_relu", "relu", "gelu")


@dataclass
class ModelConfig:
    """Architecture of a TileAutoencoder (saved as JSON beside its weights)."""

    channels: list[str]  # channel labels, e.g. ["window:lung", ..., "mask:PTV", "dose"]
    tile: int = 64  # edge of the cubic tile in voxels; divisible by 2**len(widths)
    features: int = 10  # K: learned features per tile
    widths: list[int] = field(default_factory=lambda: [16, 32, 64, 64])  # one per downsampling level
    convs_per_level: int = 1  # extra 3^3 convolutions after each strided/upsampling convolution
    groups: int = 8  # GroupNorm groups (capped by the width); works with batches of 1-2
    activation: str = "silu"
    gradient_checkpointing: bool = False  # recompute activations in backward: less memory, more time
    residual: bool = False  # the extra convolutions of each level are residual blocks (x + conv(x))
    decoder_convs: Optional[int] = None  # extra convolutions per decoder level (None: convs_per_level)
    pca_start: bool = False  # a frozen linear PCA path beside the convolutions, which start at zero

    def __post_init__(self) -> None:
        self.channels = [str(c) for c in self.channels]
        self.widths = [int(w) for w in self.widths]
        if not self.channels:
            raise InputError("model configuration: no channels given")
        if len(set(self.channels)) != len(self.channels):
            raise InputError(f"model configuration: duplicated channels in {self.channels}")
        if not self.widths or any(w < 1 for w in self.widths):
            raise InputError(f"model configuration: widths must be positive, got {self.widths}")
        if self.features < 1:
            raise InputError(f"model configuration: features must be >= 1, got {self.features}")
        if self.activation not in ACTIVATIONS:
            raise InputError(
                f"model configuration: unknown activation {self.activation!r} (one of {', '.join(ACTIVATIONS)})"
            )
        if self.decoder_convs is not None and int(self.decoder_convs) < 0:
            raise InputError(f"model configuration: decoder_convs must be >= 0, got {self.decoder_convs}")
        factor = 2 ** len(self.widths)
        if self.tile < factor or self.tile % factor:
            raise InputError(
                f"model configuration: tile {self.tile} must be a multiple of {factor} "
                f"(2 to the number of levels, {len(self.widths)}); use e.g. --tile {max(factor, self.tile // factor * factor)}"
            )

    @property
    def bottleneck_size(self) -> int:
        """Edge of the smallest feature map (tile / 2**levels)."""
        return self.tile // 2 ** len(self.widths)

    @property
    def mask_channels(self) -> list[int]:
        """Indices of binary (mask) channels."""
        return [i for i, label in enumerate(self.channels) if label.startswith("mask:")]

    @property
    def tile_values(self) -> int:
        """D: values in one tile (channels x tile^3), the length of the PCA path's vectors."""
        return len(self.channels) * self.tile**3

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        """Build from a dict, refusing unknown keys (a foreign file) with an InputError."""
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise InputError(f"model configuration: unknown keys {sorted(unknown)}")
        if "channels" not in data:
            raise InputError("model configuration: no 'channels'")
        try:
            return cls(**data)
        except TypeError as error:
            raise InputError(f"model configuration: {error}") from error


def _activation(name: str) -> nn.Module:
    return {
        "silu": lambda: nn.SiLU(inplace=True),
        "leaky_relu": lambda: nn.LeakyReLU(0.1, inplace=True),
        "relu": lambda: nn.ReLU(inplace=True),
        "gelu": lambda: nn.GELU(),
    }[name]()


def _norm(groups: int, width: int) -> nn.GroupNorm:
    g = max(1, min(groups, width))
    while width % g:
        g -= 1
    return nn.GroupNorm(g, width)


def _conv_block(cin: int, cout: int, cfg: ModelConfig, stride: int = 1) -> list[nn.Module]:
    kernel = 4 if stride == 2 else 3
    return [
        nn.Conv3d(cin, cout, kernel, stride=stride, padding=1, bias=False),
        _norm(cfg.groups, cout),
        _activation(cfg.activation),
    ]


class _Residual(nn.Module):
    """x + (conv, norm, activation, conv, norm)(x), then the activation: a pre-summed residual block."""

    def __init__(self, width: int, cfg: ModelConfig) -> None:
        super().__init__()
        self.body = nn.Sequential(
            *_conv_block(width, width, cfg),
            nn.Conv3d(width, width, 3, padding=1, bias=False),
            _norm(cfg.groups, width),
        )
        self.act = _activation(cfg.activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(x + self.body(x))


class _Level(nn.Sequential):
    """One resolution level: a strided conv (encoder) or upsample + conv (decoder), then extra convs
    (plain, or residual blocks with ``residual``)."""

    def __init__(self, cin: int, cout: int, cfg: ModelConfig, down: bool) -> None:
        layers: list[nn.Module] = []
        if down:
            layers += _conv_block(cin, cout, cfg, stride=2)
        else:
            layers += [nn.Upsample(scale_factor=2, mode="nearest")]
            layers += _conv_block(cin, cout, cfg)
        extra = cfg.convs_per_level if down or cfg.decoder_convs is None else int(cfg.decoder_convs)
        for _ in range(extra):
            layers += [_Residual(cout, cfg)] if cfg.residual else _conv_block(cout, cout, cfg)
        super().__init__(*layers)


#: outputs of the PCA path are kept in [EPS, 1 - EPS] so that their logit is finite
PCA_OUTPUT_EPS = 1e-6


class _StraightThroughClip(torch.autograd.Function):
    """clamp(x, low, high) forward; backward, the gradient of a clipped value passes only where descending it
    moves the value back into the range (so an output stuck outside still learns, and no loss term can push
    a clipped value further out unseen, which made the raw values drift without bound).

    (The ``x + (clamp(x) - x).detach()`` idiom is not exact in float32 either: far outside the range it
    rounds to just beyond ``high``, whose logit is NaN.)"""

    @staticmethod
    def forward(ctx, values: torch.Tensor, low: float, high: float) -> torch.Tensor:
        ctx.save_for_backward(values < low, values > high)
        return values.clamp(low, high)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        below, above = ctx.saved_tensors
        # gradient descent moves a value by -grad: below the range only grad < 0 helps, above only grad > 0
        grad = torch.where(below, grad.clamp(max=0), grad)
        grad = torch.where(above, grad.clamp(min=0), grad)
        return grad, None, None


class TileAutoencoder(nn.Module):
    """Conv encoder -> K features -> conv decoder, with no path around the K-feature bottleneck
    (with ``pca_start``, a linear PCA path beside the convolutions, through the same K features)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        c, widths = len(config.channels), config.widths
        s = config.bottleneck_size
        self.encoder_levels = nn.ModuleList(
            _Level(cin, cout, config, down=True) for cin, cout in zip([c] + widths[:-1], widths)
        )
        self.to_features = nn.Linear(widths[-1] * s**3, config.features)
        self.from_features = nn.Linear(config.features, widths[-1] * s**3)
        self.from_features_act = _activation(config.activation)
        rev = widths[::-1]
        self.decoder_levels = nn.ModuleList(
            _Level(cin, cout, config, down=False) for cin, cout in zip(rev, rev[1:])
        )
        # the last upsampling goes straight to the output channels: no full-resolution hidden layer
        self.to_channels = nn.Sequential(
            nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv3d(rev[-1], c, 3, padding=1)
        )
        if config.pca_start:
            # the PCA path (set by set_pca_basis; buffers: saved with the weights, never trained) ...
            self.register_buffer("pca_mean", torch.zeros(config.tile_values))
            self.register_buffer("pca_axes", torch.zeros(config.tile_values, config.features))
            self.register_buffer("pca_scale", torch.ones(config.features))
            # ... and the convolutional paths enter through gains that start at zero (as ReZero): Adam's first
            # steps then move a gain by about the learning rate, not every weight of a zeroed layer at once
            self.feature_gain = nn.Parameter(torch.zeros(config.features))
            self.output_gain = nn.Parameter(torch.zeros(c))

    def set_pca_basis(self, mean: Any, axes: Any, variances: Any) -> None:
        """Load a PCA basis (mean (D,), axes (D, K), variances (K,): ``deep.train.pca.PcaBasis``) into the path."""
        if not self.config.pca_start:
            raise InputError("this model has no PCA path (pca_start is off)")
        d, k = self.config.tile_values, self.config.features
        mean, axes, variances = (torch.as_tensor(v, dtype=torch.float32) for v in (mean, axes, variances))
        if mean.shape != (d,) or axes.shape != (d, k) or variances.shape != (k,):
            raise InputError(f"PCA basis of shapes {tuple(mean.shape)}, {tuple(axes.shape)}, {tuple(variances.shape)} "
                             f"does not fit this model (tiles of {d} values, {k} features)")
        with torch.no_grad():
            self.pca_mean.copy_(mean)
            self.pca_axes.copy_(axes)
            self.pca_scale.copy_(variances.clamp_min(1e-12).sqrt())

    def _linear(self):
        """A context in which the PCA path runs in float32 (no bf16 autocast)."""
        return torch.autocast(self.pca_mean.device.type, enabled=False)

    def _run_level(self, level: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if self.config.gradient_checkpointing and self.training and x.requires_grad:
            from torch.utils.checkpoint import checkpoint

            return checkpoint(level, x, use_reentrant=False)
        return level(x)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, t, t, t) in [0, 1] -> (B, K) features."""
        cfg = self.config
        if x.dim() != 5 or x.shape[1] != len(cfg.channels) or tuple(x.shape[2:]) != (cfg.tile,) * 3:
            raise InputError(
                f"model expects tiles of shape (B, {len(cfg.channels)}, {cfg.tile}, {cfg.tile}, {cfg.tile}), "
                f"got {tuple(x.shape)}"
            )
        tiles = x
        for level in self.encoder_levels:
            x = self._run_level(level, x)
        z = self.to_features(x.flatten(1))
        if cfg.pca_start:
            with self._linear():
                scores = (tiles.float().reshape(len(tiles), -1) - self.pca_mean) @ self.pca_axes
                z = z.float() * self.feature_gain + scores / self.pca_scale
        return z

    def decoder_input(self, z: torch.Tensor) -> torch.Tensor:
        """(B, K) features -> the first decoder level's input (B, W, s, s, s), in the weights' memory format."""
        s = self.config.bottleneck_size
        x = self.from_features_act(self.from_features(z))
        x = x.view(z.shape[0], self.config.widths[-1], s, s, s)
        if self.to_channels[1].weight.is_contiguous(memory_format=torch.channels_last_3d):
            x = x.contiguous(memory_format=torch.channels_last_3d)
        return x

    def decode_logits(self, z: torch.Tensor) -> torch.Tensor:
        """(B, K) features -> (B, C, t, t, t) logits (before the sigmoid)."""
        x = self.decoder_input(z)
        for level in self.decoder_levels:
            x = self._run_level(level, x)
        out = self.to_channels(x)
        if not self.config.pca_start:
            return out
        with self._linear():
            linear = torch.addmm(self.pca_mean, z.float() * self.pca_scale, self.pca_axes.T).view(out.shape)
            values = linear + out.float() * self.output_gain.view(1, -1, 1, 1, 1)
            # clip to (0, 1) with the gradient passed straight through, then the logit (its sigmoid is the value)
            clipped = _StraightThroughClip.apply(values, PCA_OUTPUT_EPS, 1 - PCA_OUTPUT_EPS)
            return torch.log(clipped) - torch.log1p(-clipped)

    def output_bias(self) -> torch.Tensor:
        """The (C,) bias of the last convolution (the logits of an all-zero decoder input; with
        ``pca_start``, the value added to the PCA path's output)."""
        return self.to_channels[1].bias

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """(B, K) features -> (B, C, t, t, t) reconstruction in [0, 1]."""
        return torch.sigmoid(self.decode_logits(z))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (reconstruction logits, features z); apply torch.sigmoid for values in [0, 1]."""
        z = self.encode(x)
        return self.decode_logits(z), z


def reconstruction_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    channel_weights: Optional[Sequence[float]] = None,
    mask_channels: Sequence[int] = (),
    mask_bce_weight: float = 0.0,
    terms: Optional[LossTerms] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Weighted chi-square (per-channel mean squared error of sigmoid(logits)) plus optional terms.

    Args:
        logits: (B, C, t, t, t) decoder output before the sigmoid.
        target: (B, C, t, t, t) tiles in [0, 1].
        channel_weights: one weight per channel for the squared error (default 1 each).
        mask_channels: indices of mask channels (binary).
        mask_bce_weight: weight of an extra binary cross-entropy on the mask channels.
        terms: the fidelity terms of :class:`LossTerms` (soft Dice on masks, dose error inside the
            target, dose-gradient error); None or all-zero weights: the plain weighted MSE.

    Returns:
        (scalar loss, per-channel MSE of shape (C,), detached).
    """
    values = torch.sigmoid(logits.float())
    target = target.float()
    per_channel = ((values - target) ** 2).mean(dim=(0, 2, 3, 4))
    weights = (
        torch.ones_like(per_channel)
        if channel_weights is None
        else torch.as_tensor(list(channel_weights), dtype=per_channel.dtype, device=per_channel.device)
    )
    loss = (weights * per_channel).sum() / weights.sum()
    if mask_bce_weight > 0 and len(mask_channels):
        index = list(mask_channels)
        bce = nn.functional.binary_cross_entropy_with_logits(logits[:, index].float(), target[:, index])
        loss = loss + mask_bce_weight * bce
    if terms is not None and terms.active:
        loss = loss + terms(values, target)
    return loss, per_channel.detach()


@dataclass
class LossTerms:
    """Fidelity terms added to the weighted MSE (all off at weight 0).

    - ``dice``: soft Dice loss (1 - 2|AB| / (|A| + |B|), over the batch) on each mask channel: a
      boundary-sensitive term, since a blurred edge costs Dice where it costs little squared error;
    - ``dose_in_target``: extra weight of the squared dose error on target voxels (normalised by all
      voxels, like the MSE: normalising by the target's voxels made a tile's few PTV voxels outweigh the
      rest, and early training raised the dose everywhere);
    - ``gradient``: squared error of the dose's finite differences along z, y and x (the fall-off).
    """

    dose_channels: Sequence[int] = ()
    mask_channels: Sequence[int] = ()
    target_channel: Optional[int] = None  # the PTV mask channel
    dice: float = 0.0
    dose_in_target: float = 0.0
    gradient: float = 0.0

    @property
    def active(self) -> bool:
        return bool((self.dice and self.mask_channels) or (self.dose_channels and (
            self.gradient or (self.dose_in_target and self.target_channel is not None))))

    def __call__(self, values: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        total = values.new_zeros(())
        if self.dice and len(self.mask_channels):
            index = list(self.mask_channels)
            a, b = values[:, index], target[:, index]
            overlap = (a * b).sum(dim=(0, 2, 3, 4))
            sizes = a.sum(dim=(0, 2, 3, 4)) + b.sum(dim=(0, 2, 3, 4))
            total = total + self.dice * (1 - (2 * overlap + 1.0) / (sizes + 1.0)).mean()
        if len(self.dose_channels):
            index = list(self.dose_channels)
            v, t = values[:, index], target[:, index]
            if self.dose_in_target and self.target_channel is not None:
                inside = target[:, self.target_channel : self.target_channel + 1]
                error = ((v - t) ** 2 * inside).mean()  # over all voxels: an extra weight on PTV voxels
                total = total + self.dose_in_target * error
            if self.gradient:
                error = sum(((v.diff(dim=d) - t.diff(dim=d)) ** 2).mean() for d in (2, 3, 4)) / 3
                total = total + self.gradient * error
        return total


def check_channels(config: ModelConfig, channels: Sequence[str], where: str = "the cohort") -> None:
    """InputError saying which channels differ when a model's channels do not match ``channels``."""
    expected, given = list(config.channels), [str(c) for c in channels]
    if expected == given:
        return
    missing = [c for c in expected if c not in given]
    extra = [c for c in given if c not in expected]
    parts = []
    if missing:
        parts.append(f"the model needs {', '.join(missing)}, absent from {where}")
    if extra:
        parts.append(f"{where} has {', '.join(extra)}, unknown to the model")
    if not parts:
        parts.append(f"same channels in another order (model: {expected}, {where}: {given})")
    raise InputError("channel mismatch: " + "; ".join(parts))


def plain_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """CPU, contiguous state dict without DDP/compile prefixes."""
    module = getattr(model, "module", model)
    module = getattr(module, "_orig_mod", module)
    return {k: v.detach().to("cpu").contiguous() for k, v in module.state_dict().items()}


def save_model(
    model_dir: Union[str, Path], model: nn.Module, config: ModelConfig, extra: Optional[dict] = None
) -> Path:
    """Write model.json (config + ``extra``, e.g. a training summary) and model.pt (state dict), atomically."""
    model_dir = Path(model_dir)
    torch_save_atomic(plain_state_dict(model), model_dir / MODEL_WEIGHTS)
    meta = {
        "format": MODEL_FORMAT,
        "format_version": MODEL_FORMAT_VERSION,
        "weights": MODEL_WEIGHTS,
        "config": config.to_dict(),
        "channels": list(config.channels),
        **({"training": extra} if extra else {}),
    }
    write_text_atomic(model_dir / MODEL_JSON, json.dumps(meta, indent=2, default=str) + "\n")
    return model_dir


def read_model_json(model_dir: Union[str, Path]) -> dict[str, Any]:
    """The parsed model.json of a model folder or shipped model (InputError when absent or foreign)."""
    from DeepDosimetricsLib.deep.shipped import resolve_model, shipped_names_hint

    path = resolve_model(model_dir) / MODEL_JSON
    if not path.is_file():
        hint = "" if Path(model_dir).exists() else shipped_names_hint()
        raise InputError(f"{model_dir}: not a DeepDosimetrics model folder (no {MODEL_JSON}){hint}")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise InputError(f"{path}: unreadable model description ({error})") from error
    if not isinstance(meta, dict) or meta.get("format") != MODEL_FORMAT:
        raise InputError(f"{path}: not a DeepDosimetrics model file (format tag missing or foreign)")
    if int(meta.get("format_version", 0)) > MODEL_FORMAT_VERSION:
        raise InputError(
            f"{path}: model format version {meta.get('format_version')} is newer than this "
            f"DeepDosimetrics understands ({MODEL_FORMAT_VERSION}); update DeepDosimetrics"
        )
    return meta


def load_state_dict_file(path: Union[str, Path], device: Union[str, torch.device] = "cpu") -> Any:
    """torch.load with weights_only=True; corrupt or foreign files raise an InputError."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: file not found")
    try:
        return torch.load(path, map_location=device, weights_only=True)
    except Exception as error:  # pickle errors, zip errors, refused globals...
        raise InputError(
            f"{path}: corrupt or not a DeepDosimetrics weights file (it cannot be read safely: "
            f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''})"
        ) from error


def file_sha256(path: Union[str, Path]) -> str:
    """Hex SHA-256 of a file (read in 1 MB blocks)."""
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(2**20), b""):
            digest.update(block)
    return digest.hexdigest()


def check_weights_digest(model_dir: Union[str, Path], meta: dict[str, Any]) -> None:
    """InputError when model.json records a ``weights_sha256`` (shipped models do) that the weights do not have."""
    expected = meta.get("weights_sha256")
    if not expected:
        return
    path = Path(model_dir) / meta.get("weights", MODEL_WEIGHTS)
    if not path.is_file():
        raise InputError(f"{path}: file not found")
    if file_sha256(path) != str(expected).lower():
        raise InputError(f"{path}: its SHA-256 differs from the one {MODEL_JSON} records (a damaged or replaced "
                         "weights file); reinstall the model")


def load_model(
    model_dir: Union[str, Path],
    device: Union[str, torch.device] = "cpu",
    channels: Optional[Sequence[str]] = None,
) -> tuple[TileAutoencoder, ModelConfig]:
    """Load a saved model (eval mode) and its config; with ``channels``, refuse a channel mismatch.

    ``model_dir`` is a model folder or the name of a shipped model (``deep.shipped.resolve_model``).
    """
    from DeepDosimetricsLib.deep.shipped import resolve_model

    model_dir = resolve_model(model_dir)
    meta = read_model_json(model_dir)
    config = ModelConfig.from_dict(dict(meta.get("config") or {}))
    if channels is not None:
        check_channels(config, channels)
    check_weights_digest(model_dir, meta)
    state = load_state_dict_file(Path(model_dir) / meta.get("weights", MODEL_WEIGHTS), device="cpu")
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise InputError(f"{model_dir}/{MODEL_WEIGHTS}: not a state dict of tensors")
    model = TileAutoencoder(config)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as error:
        raise InputError(
            f"{model_dir}: the weights do not fit the configuration in {MODEL_JSON} "
            f"({str(error).splitlines()[0]})"
        ) from error
    model.to(device)
    if torch.device(device).type == "cpu":
        model.to(memory_format=torch.channels_last_3d)
    model.eval()
    return model, config
