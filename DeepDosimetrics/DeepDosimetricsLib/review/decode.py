"""The tile decoder run for what the review station shows: one channel, and for the displayed planes only
the output slices of each tile that cross them.

``TileAutoencoder.decode`` ends with a nearest-neighbour upsampling and one 3^3 convolution to the output
channels at full resolution (and, with ``pca_start``, a per-voxel linear path): about two thirds of a tile's
decoding time (each nearest upsampling + 3^3 convolution here is one transposed convolution: half the time).
Every layer before it holds GroupNorms, whose statistics span the whole tile, so those run
whole; the last stage is local, so one output slice needs only the three upsampled slices around it and one
channel's weights. The values are those of ``TileAutoencoder.decode`` (the same operations, summed in another
order: equal to float32 rounding; ``test_review.py`` checks them against the full stitcher).
"""

from __future__ import annotations

import weakref
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

#: nearest upsampling by 2 then a 3-tap convolution (padding 1) is a transposed convolution (stride 2,
#: padding 1) of the low-resolution input with 4 taps, each the sum of the 3-tap kernel's taps that fall on
#: the same low-resolution voxel: row k of this matrix picks them
_TAPS = torch.tensor([[0.0, 0.0, 1.0], [0.0, 1.0, 1.0], [1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
#: the transposed kernels of the convolutions run so far: conv module -> {channel: (weight version, kernel)}
_KERNELS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _is_upsample_conv(first, second) -> bool:
    return (isinstance(first, torch.nn.Upsample) and first.mode == "nearest" and first.size is None
            and float(first.scale_factor) == 2.0 and isinstance(second, torch.nn.Conv3d)
            and tuple(second.kernel_size) == (3, 3, 3) and tuple(second.stride) == (1, 1, 1)
            and tuple(second.padding) == (1, 1, 1) and tuple(second.dilation) == (1, 1, 1) and second.groups == 1)


def transposed_kernel(weight: torch.Tensor) -> torch.Tensor:
    """The (in, out, 4, 4, 4) kernel of :func:`upsample_conv` from a (out, in, 3, 3, 3) convolution's."""
    taps = _TAPS.to(weight.dtype)
    return torch.einsum("ak,bl,cm,oiklm->ioabc", taps, taps, taps, weight).contiguous()


def upsample_conv(x: torch.Tensor, conv: torch.nn.Conv3d, channel: Optional[int] = None) -> torch.Tensor:
    """``conv(upsample_nearest_2x(x))`` (only output ``channel`` when given, kept as a size-1 axis) as one
    transposed convolution of ``x``: no upsampled tensor, an eighth of the taps' work over the output's voxels.
    The kernel is made once per module and channel (again when the weights change)."""
    kept = _KERNELS.setdefault(conv, {})
    version = conv.weight._version
    entry = kept.get(channel)
    if entry is None or entry[0] != version:
        weight = conv.weight if channel is None else conv.weight[channel : channel + 1]
        entry = kept[channel] = (version, transposed_kernel(weight.detach()))
    bias = conv.bias if channel is None or conv.bias is None else conv.bias[channel : channel + 1]
    return F.conv_transpose3d(x, entry[1], bias, stride=2, padding=1)


def _run(layers, x: torch.Tensor) -> torch.Tensor:
    """``layers`` (a Sequential's children) on ``x``, each nearest upsampling + 3^3 convolution as
    :func:`upsample_conv`."""
    layers = list(layers)
    i = 0
    while i < len(layers):
        if i + 1 < len(layers) and _is_upsample_conv(layers[i], layers[i + 1]):
            x = upsample_conv(x, layers[i + 1])
            i += 2
        else:
            x = layers[i](x)
            i += 1
    return x


def decode_hidden(model, z: torch.Tensor) -> torch.Tensor:
    """(B, K) features -> the last decoder level's output (B, W, t/2, t/2, t/2), before the last upsampling."""
    s = model.config.bottleneck_size
    x = model.from_features_act(model.from_features(z))
    x = x.view(z.shape[0], model.config.widths[-1], s, s, s)
    if model.to_channels[1].weight.is_contiguous(memory_format=torch.channels_last_3d):
        x = x.contiguous(memory_format=torch.channels_last_3d)
    for level in model.decoder_levels:
        x = _run(level.children(), x)
    return x


def _finish(model, z: torch.Tensor, out: torch.Tensor, channel: int, flat_index: torch.Tensor) -> torch.Tensor:
    """Logits ``out`` (B, ...) of ``channel`` -> values in [0, 1], with the PCA path at the voxels
    ``flat_index`` ((B, n) or (n,) indices into a tile's C*t^3 values, matching ``out``'s trailing voxels)."""
    if not model.config.pca_start:
        return torch.sigmoid(out)
    shape = out.shape
    out = out.reshape(shape[0], -1)
    with torch.autocast(z.device.type, enabled=False):
        axes = model.pca_axes[flat_index]  # (B, n, K) or (n, K)
        scaled = z.float() * model.pca_scale
        if axes.dim() == 2:
            linear = model.pca_mean[flat_index] + scaled @ axes.T
        else:
            linear = model.pca_mean[flat_index] + torch.einsum("bnk,bk->bn", axes, scaled)
        values = linear + out.float() * model.output_gain[channel]
        from DeepDosimetricsLib.deep.model import PCA_OUTPUT_EPS

        clipped = values.clamp(PCA_OUTPUT_EPS, 1 - PCA_OUTPUT_EPS)
        return torch.sigmoid(torch.log(clipped) - torch.log1p(-clipped)).view(shape)


def decode_channel(model, z: torch.Tensor, channel: int) -> torch.Tensor:
    """(B, K) features -> (B, t, t, t) values in [0, 1] of one output channel (``decode(z)[:, channel]``)."""
    out = upsample_conv(decode_hidden(model, z), model.to_channels[1], channel)[:, 0]
    t = model.config.tile
    index = torch.arange(channel * t**3, (channel + 1) * t**3, device=z.device)
    return _finish(model, z, out, channel, index)


def decode_slices(model, z: torch.Tensor, channel: int, tiles: Sequence[int], axes: Sequence[int],
                  offsets: Sequence[int]) -> torch.Tensor:
    """Row r: the slice ``offsets[r]`` along tile axis ``axes[r]`` (0 z, 1 y, 2 x) of
    ``decode(z[tiles[r]])[channel]``: (R, t, t), the two other axes in their order (a tile crossed by two
    planes is decoded once)."""
    conv = model.to_channels[1]
    t = model.config.tile
    hidden = decode_hidden(model, z)  # (B, W, h, h, h)
    axes_t = torch.as_tensor(list(axes), dtype=torch.long)
    offsets_t = torch.as_tensor(list(offsets), dtype=torch.long)
    rows = torch.as_tensor(list(tiles), dtype=torch.long)
    out = torch.empty((len(rows), t, t), dtype=torch.float32, device=z.device)
    weight, bias = conv.weight[channel : channel + 1].float(), conv.bias[channel : channel + 1]
    for axis in range(3):
        chosen = (axes_t == axis).nonzero().flatten()
        if not len(chosen):
            continue
        # the three upsampled slices around each output slice: hidden slices (o - 1) // 2 .. (o + 1) // 2,
        # zero outside the tile (the convolution's padding)
        upsampled = offsets_t[chosen, None] + torch.arange(-1, 2)  # (n, 3) indices on the t grid
        inside = (upsampled >= 0) & (upsampled < t)
        source = hidden.movedim(2 + axis, 2)  # (B, W, h(axis), h, h)
        slab = source[rows[chosen, None], :, upsampled.clamp(0, t - 1) // 2]  # (n, 3, W, h, h)
        slab = slab * inside[:, :, None, None, None].to(slab.dtype)
        slab = slab.permute(0, 2, 1, 3, 4)  # (n, W, 3, h, h)
        slab = slab.repeat_interleave(2, dim=3).repeat_interleave(2, dim=4)  # (n, W, 3, t, t)
        kernel = weight.movedim(2 + axis, 2)  # the kernel's axes in the slab's order
        part = F.conv3d(slab.contiguous(), kernel.contiguous(), bias, padding=(0, 1, 1))[:, 0, 0]  # (n, t, t)
        out[chosen] = part.float()
    # the PCA path's voxels of each row's slice: channel * t^3 + the slice's flat indices
    grid = torch.arange(t**3, device=z.device).view(t, t, t)
    flat = torch.stack([grid.select(a, int(o)).reshape(-1) for a, o in zip(axes, offsets)]) if len(rows) else \
        torch.empty((0, t * t), dtype=torch.long)
    return _finish(model, z[rows], out, channel, channel * t**3 + flat)
