"""The tile decoder run for what the review station shows: one channel, and for the displayed planes only
the output slices of each tile that cross them.

``TileAutoencoder.decode`` ends with a nearest-neighbour upsampling and one 3^3 convolution to the output
channels at full resolution (and, with ``pca_start``, a per-voxel linear path): about two thirds of a tile's
decoding time (each nearest upsampling + 3^3 convolution here is one transposed convolution: half the time).
Every layer before it holds GroupNorms, whose statistics span the whole tile, so those run
whole; the last stage is local, so one output slice needs only the two low-resolution slices under it and
one channel's weights. The values are those of ``TileAutoencoder.decode`` (the same operations, summed in another
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


def _version(weight: torch.Tensor) -> int:
    """The weight's in-place change counter (0 for an inference tensor, which cannot change in place)."""
    try:
        return weight._version
    except RuntimeError:
        return 0


def native_bfloat16() -> bool:
    """Whether this CPU runs bfloat16 convolutions natively (AVX512-BF16 or AMX): about twice as fast as
    float32 there, far slower elsewhere."""
    try:
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def _is_upsample_conv(first, second) -> bool:
    return (isinstance(first, torch.nn.Upsample) and first.mode == "nearest" and first.size is None
            and float(first.scale_factor) == 2.0 and isinstance(second, torch.nn.Conv3d)
            and tuple(second.kernel_size) == (3, 3, 3) and tuple(second.stride) == (1, 1, 1)
            and tuple(second.padding) == (1, 1, 1) and tuple(second.dilation) == (1, 1, 1) and second.groups == 1)


def transposed_kernel(weight: torch.Tensor) -> torch.Tensor:
    """The (in, out, 4, 4, 4) kernel of :func:`upsample_conv` from a (out, in, 3, 3, 3) convolution's."""
    taps = _TAPS.to(weight.dtype)
    return torch.einsum("ak,bl,cm,oiklm->ioabc", taps, taps, taps, weight).contiguous()


#: (parity, low-resolution offset -1/0/+1, transposed tap): the tap of a transposed convolution (stride 2,
#: padding 1, 4 taps) by which the voxel at that offset reaches an output voxel of that parity
_PARITY_TAPS = torch.tensor([[[0.0, 0.0, 0.0, 1.0], [0.0, 1.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]],
                             [[0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0], [1.0, 0.0, 0.0, 0.0]]])
#: at most this many output channels go through :func:`upsample_conv`'s parity convolution (more: transposed)
PARITY_CHANNELS = 4


def parity_kernel(transposed: torch.Tensor) -> torch.Tensor:
    """(in, out, 4, 4, 4) transposed kernel -> (8 * out, in, 3, 3, 3): a 3^3 convolution of the low-resolution
    input whose output channel (pz, py, px, o) is output channel o at the voxels of that parity."""
    taps = _PARITY_TAPS.to(transposed.dtype)
    kernel = torch.einsum("pak,qbl,rcm,ioklm->pqroiabc", taps, taps, taps, transposed)
    return kernel.reshape(-1, *kernel.shape[4:]).contiguous(memory_format=torch.channels_last_3d)


def upsample_conv(x: torch.Tensor, conv: torch.nn.Conv3d, channel: Optional[int] = None) -> torch.Tensor:
    """``conv(upsample_nearest_2x(x))`` (only output ``channel`` when given, kept as a size-1 axis) without the
    upsampled tensor: one transposed convolution of ``x`` (an eighth of the taps' work), or, for a few output
    channels (which a transposed convolution runs slowly), one 3^3 convolution of ``x`` giving each output
    parity as a channel. The kernel is made once per module and channel (again when the weights change)."""
    kept = _KERNELS.setdefault(conv, {})
    version = _version(conv.weight)
    entry = kept.get(channel)
    if entry is None or entry[0] != version:
        weight = conv.weight if channel is None else conv.weight[channel : channel + 1]
        with torch.autocast(weight.device.type, enabled=False):  # kept in the weights' precision
            kernel = transposed_kernel(weight.detach())
            kernel = kernel if kernel.shape[1] > PARITY_CHANNELS else parity_kernel(kernel)
        entry = kept[channel] = (version, kernel)
    bias = conv.bias if channel is None or conv.bias is None else conv.bias[channel : channel + 1]
    kernel = entry[1]
    if kernel.shape[2] == 4:
        return F.conv_transpose3d(x, kernel, bias, stride=2, padding=1)
    batch, _, h, w, d = x.shape
    out = F.conv3d(x, kernel, None if bias is None else bias.repeat(8), padding=1)  # (B, 8 * out, h, w, d)
    out = out.view(batch, 2, 2, 2, -1, h, w, d).permute(0, 4, 5, 1, 6, 2, 7, 3)
    return out.reshape(batch, -1, 2 * h, 2 * w, 2 * d)


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
    x = model.decoder_input(z)
    for level in model.decoder_levels:
        x = _run(level.children(), x)
    return x


def _finish(model, z: torch.Tensor, out: torch.Tensor, channel: int, flat_index) -> torch.Tensor:
    """Logits ``out`` (B, ...) of ``channel`` -> values in [0, 1], with the PCA path at the voxels
    ``flat_index`` ((B, n) or (n,) indices into a tile's C*t^3 values, or a slice of them, matching ``out``'s
    trailing voxels)."""
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
    return _finish(model, z, out, channel, slice(channel * t**3, (channel + 1) * t**3))


#: per parity of an output slice (0: even, 1: odd), the weights of the 3-tap kernel's taps on the two
#: low-resolution slices under it ((o - 1) // 2 and (o + 1) // 2)
_SLICE_TAPS = torch.tensor([[[1.0, 0.0, 0.0], [0.0, 1.0, 1.0]], [[1.0, 1.0, 0.0], [0.0, 0.0, 1.0]]])


def _slice_kernel(conv: torch.nn.Conv3d, channel: int, axis: int, parity: int) -> torch.Tensor:
    """The (2 * in, 1, 4, 4) transposed 2-D kernel of output slices of ``parity`` across ``axis``."""
    kept = _KERNELS.setdefault(conv, {})
    key = (channel, axis, parity)
    entry = kept.get(key)
    if entry is None or entry[0] != _version(conv.weight):
        weight = conv.weight.detach()[channel : channel + 1].movedim(2 + axis, 2)  # (1, in, across, a, b)
        taps, across = _TAPS.to(weight.dtype), _SLICE_TAPS[parity].to(weight.dtype)
        with torch.autocast(weight.device.type, enabled=False):  # kept in the weights' precision
            kernel = torch.einsum("jk,bl,cm,oiklm->jiobc", across, taps, taps, weight)  # (2, in, 1, 4, 4)
        entry = kept[key] = (_version(conv.weight), kernel.reshape(-1, 1, 4, 4).contiguous())
    return entry[1]


#: the plane slices of a batch go through the last layer in groups padded to a multiple of this many rows
ROWS = 8


def decode_slices(model, z: torch.Tensor, channel: int, tiles: Sequence[int], axes: Sequence[int],
                  offsets: Sequence[int]) -> torch.Tensor:
    """Row r: the slice ``offsets[r]`` along tile axis ``axes[r]`` (0 z, 1 y, 2 x) of
    ``decode(z[tiles[r]])[channel]``: (R, t, t), the two other axes in their order (a tile crossed by two
    planes is decoded once). Each slice is one transposed 2-D convolution of the two low-resolution slices
    under it."""
    conv = model.to_channels[1]
    t = model.config.tile
    h = t // 2
    hidden = decode_hidden(model, z)  # (B, W, h, h, h)
    axes_t = torch.as_tensor(list(axes), dtype=torch.long)
    offsets_t = torch.as_tensor(list(offsets), dtype=torch.long)
    rows = torch.as_tensor(list(tiles), dtype=torch.long)
    out = torch.empty((len(rows), t, t), dtype=torch.float32, device=z.device)
    bias = None if conv.bias is None else conv.bias[channel : channel + 1]
    for axis in range(3):
        source = hidden.movedim(2 + axis, 1)  # (B, h(axis), W, h, h)
        for parity in range(2):
            chosen = ((axes_t == axis) & (offsets_t % 2 == parity)).nonzero().flatten()
            if not len(chosen):
                continue
            # the low-resolution slices (o - 1) // 2 and (o + 1) // 2, zero outside the tile (the padding)
            under = torch.stack([(offsets_t[chosen] - 1).div(2, rounding_mode="floor"),
                                 (offsets_t[chosen] + 1).div(2, rounding_mode="floor")], 1)  # (n, 2)
            inside = ((under >= 0) & (under < h)).to(hidden.dtype)
            pair = source[rows[chosen, None], under.clamp(0, h - 1)]  # (n, 2, W, h, h)
            pair = (pair * inside[:, :, None, None, None]).reshape(len(chosen), -1, h, h)
            # rows padded to a multiple of ROWS: a few convolution shapes, each prepared once
            padded = -(-len(chosen) // ROWS) * ROWS
            if padded != len(chosen):
                pair = torch.cat([pair, pair.new_zeros((padded - len(chosen), *pair.shape[1:]))])
            part = F.conv_transpose2d(pair, _slice_kernel(conv, channel, axis, parity), bias, stride=2, padding=1)
            out[chosen] = part[: len(chosen), 0].float()
    # the PCA path's voxels of each row's slice: channel * t^3 + the slice's flat indices
    grid = torch.arange(t**3, device=z.device).view(t, t, t)
    flat = torch.stack([grid.select(a, int(o)).reshape(-1) for a, o in zip(axes, offsets)]) if len(rows) else \
        torch.empty((0, t * t), dtype=torch.long)
    return _finish(model, z[rows], out, channel, channel * t**3 + flat)
