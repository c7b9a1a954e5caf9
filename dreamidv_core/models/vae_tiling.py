"""Spatial tiles for the Wan 2.1 VAE decoder: tile layout, seamless blend weights, peak-memory estimate.

A latent ``[B, 16, T, h, w]`` is covered by overlapping tiles (sizes in *latent* pixels; one latent
pixel is 8x8 video pixels). Each tile is decoded on its own, with its own causal temporal cache, and
the decoded tiles are summed with weights that ramp (raised cosine) across every overlap and sum to
1 everywhere, so there is no seam. Tiling is not exact: a tile's convolutions see zeros beyond its
edges and its attention (middle block, one frame at a time) sees only the tile; the overlap keeps
those edge effects where the weights are small.

Memory (measured on the released architecture, fp32, CPU; see :func:`decode_peak_bytes`): per
decoded latent frame the decoder's transient activations take about 31 x ``dim`` floats per video
pixel of the tile, and the causal cache that must survive to the next latent frame takes
24.6 x ``dim`` floats per video pixel. The cache is therefore *not* small next to the activations:
when all tiles stream together (time-major, as :meth:`WanVAE.decode_iter` must, to yield frames in
order) the caches of every tile stay alive and cover the whole frame, and tiling alone removes only
the activation part of the peak (about 55 %). ``offload_caches=True`` parks each idle tile's cache in
CPU memory (useful on a GPU), so the device holds one tile's cache and activations. A whole-clip
:meth:`WanVAE.decode` runs tile-major (every frame of one tile, then the next tile), so it needs
only one tile's cache at any time without any offload.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple, Union

import torch

from ..errors import InputError
from .configs import WAN21_VAE_CONFIG
from .frame_grid import SPATIAL_STRIDE as SCALE
from .vae_blocks import Decoder3d, TemporalCache

__all__ = ["TileSpec", "TileGrid", "parse_tile", "tile_spans", "make_grid", "cache_floats_per_pixel",
           "decode_peak_bytes", "choose_tile", "DEFAULT_OVERLAP"]

DEFAULT_OVERLAP = 8  # latent pixels (64 video pixels)

TileSpec = Union[None, int, Tuple[int, int], str]
"""``None`` (no tiles), an int (square tile, latent px), ``(height, width)`` (latent px) or ``'auto'``."""


def parse_tile(tile: TileSpec, overlap: int) -> Optional[Tuple[int, int]]:
    """Validate a tile spec (not ``'auto'``) and the overlap; return ``(th, tw)`` or None.

    Raises :class:`InputError` for a tile that is not a positive int (or pair of them), a negative
    overlap, or an overlap that is not smaller than the tile.
    """
    if isinstance(overlap, bool) or not isinstance(overlap, int) or overlap < 0:
        raise InputError(f"tile overlap must be an integer >= 0 (latent pixels), got {overlap!r}")
    if tile is None:
        return None
    if isinstance(tile, int) and not isinstance(tile, bool):
        th = tw = tile
    elif (isinstance(tile, (tuple, list)) and len(tile) == 2
          and all(isinstance(v, int) and not isinstance(v, bool) for v in tile)):
        th, tw = tile
    else:
        raise InputError(f"tile must be None, 'auto', an int or (height, width) in latent pixels, got {tile!r}")
    if th < 1 or tw < 1:
        raise InputError(f"tile size must be >= 1 latent pixel, got {th}x{tw}")
    if overlap >= min(th, tw):
        raise InputError(f"tile overlap ({overlap} latent px) must be smaller than the tile ({th}x{tw} latent px)")
    return th, tw


def tile_spans(size: int, tile: int, overlap: int) -> List[Tuple[int, int]]:
    """``[(start, stop), ...]`` covering ``range(size)`` with the fewest tiles of length ``tile`` that
    overlap by at least ``overlap``; starts are spread evenly, so the last tile ends at ``size``
    even when ``tile`` does not divide it (the real overlaps may then exceed ``overlap``)."""
    if tile >= size:
        return [(0, size)]
    n = 1 + math.ceil((size - tile) / (tile - overlap))
    starts = [round(i * (size - tile) / (n - 1)) for i in range(n)]
    return [(s, s + tile) for s in starts]


TRIM = 0.25  # fraction of an overlap, at each end, where the ramp is flat (0 or 1)


def _ramp(n: int) -> torch.Tensor:
    """``n`` weights rising from 0 to 1: zero over the first ``TRIM`` of the overlap (the pixels
    nearest the tile edge, the most affected by its zero padding), ``sin^2`` over the middle, one
    over the last ``TRIM``. Mirrored (``1 - ramp``, reversed) it is the neighbour's ramp."""
    pos = (torch.arange(n, dtype=torch.float64) + 0.5) / n  # 0..1 across the overlap
    u = ((pos - TRIM) / (1 - 2 * TRIM)).clamp(0, 1)
    return torch.sin(math.pi / 2 * u) ** 2


def _axis_weights(spans: Sequence[Tuple[int, int]]) -> List[torch.Tensor]:
    """Per span, float64 weights over its ``SCALE * length`` video pixels; across spans they sum to 1.

    Each span's weight rises (:func:`_ramp`) across its overlap with the previous span and falls
    (mirrored) across its overlap with the next one (1 elsewhere); where exactly two spans overlap
    the two ramps already sum to 1, and a final normalisation covers spans overlapping three deep.
    """
    size = spans[-1][1] * SCALE
    weights = []
    for i, (a, b) in enumerate(spans):
        w = torch.ones((b - a) * SCALE, dtype=torch.float64)
        if i > 0 and spans[i - 1][1] > a:  # ramp up across [a, prev_stop)
            w[:(spans[i - 1][1] - a) * SCALE] *= _ramp((spans[i - 1][1] - a) * SCALE)
        if i + 1 < len(spans) and spans[i + 1][0] < b:  # ramp down across [next_start, b)
            w[-(b - spans[i + 1][0]) * SCALE:] *= _ramp((b - spans[i + 1][0]) * SCALE).flip(0)
        weights.append(w)
    total = torch.zeros(size, dtype=torch.float64)
    for (a, b), w in zip(spans, weights):
        total[a * SCALE:b * SCALE] += w
    return [w / total[a * SCALE:b * SCALE] for (a, b), w in zip(spans, weights)]


@dataclass(frozen=True)
class TileGrid:
    """Tiles over a latent of ``height x width`` (latent px): ``rows x cols`` spans, row-major."""

    rows: Tuple[Tuple[int, int], ...]
    cols: Tuple[Tuple[int, int], ...]

    def __len__(self) -> int:
        return len(self.rows) * len(self.cols)

    def tiles(self) -> List[Tuple[slice, slice]]:
        """Latent-pixel ``(row_slice, col_slice)`` of every tile; times 8 gives the video region."""
        return [(slice(*r), slice(*c)) for r in self.rows for c in self.cols]

    def weights(self, device, dtype=torch.float32) -> List[torch.Tensor]:
        """Per tile, ``[1, 1, 1, 8*th, 8*tw]`` blend weights; over all tiles they sum to 1 per pixel."""
        wr, wc = _axis_weights(self.rows), _axis_weights(self.cols)
        return [(r[:, None] * c[None, :]).to(device, dtype)[None, None, None] for r in wr for c in wc]


def make_grid(height: int, width: int, tile: Tuple[int, int], overlap: int) -> TileGrid:
    """The :class:`TileGrid` for a ``height x width`` latent and a parsed ``(th, tw)`` tile."""
    return TileGrid(tuple(tile_spans(height, tile[0], overlap)), tuple(tile_spans(width, tile[1], overlap)))


# ---------------------------------------------------------------------- memory estimate

@functools.lru_cache(maxsize=8)
def cache_floats_per_pixel(config) -> float:
    """Values of decoder temporal cache per *video* pixel (exact: a run on the ``meta`` device)."""
    with torch.device("meta"), torch.no_grad():
        decoder = Decoder3d(config.dim, config.z_dim, config.dim_mult, config.num_res_blocks,
                            tuple(reversed(config.temporal_downsample)))
        cache, x = TemporalCache(), torch.empty(1, config.z_dim, 1, 1, 1)
        decoder(x, cache)  # latent frame 0 ...
        decoder(x, cache)  # ... and one later frame: every causal layer now holds its tail
    return sum(t.numel() for t in cache.tails.values()) / SCALE ** 2


def _activation_floats_per_pixel(config) -> float:
    """Transient activation values per video pixel for one latent frame (4 video frames).

    Fitted to peak resident memory measured on CPU, fp32 (released config: 2 950 per px = 30.7 x dim;
    tiny config, dim 8: 1 080), plus 10 % margin. The per-pixel cost grows with ``dim`` and the number
    of residual blocks; other configs are scaled from the released one.
    """
    per_dim = 22.0 * (config.num_res_blocks + 1) / 3  # released: 3 residual blocks per stage
    return 1.1 * (per_dim * config.dim + 900.0)


def decode_peak_bytes(latent_shape: Sequence[int], tile: TileSpec = None, overlap: int = DEFAULT_OVERLAP,
                      *, config=None, dtype: torch.dtype = torch.float32, streaming: bool = True,
                      offload_caches: bool = False) -> int:
    """Estimated peak bytes a decode of ``latent_shape`` ``[B, 16, T, h, w]`` adds on the VAE's device.

    ``tile``: None or a tile spec as for :meth:`WanVAE.decode_iter` (not ``'auto'``). ``streaming``:
    :meth:`WanVAE.decode_iter` (all tile caches alive unless ``offload_caches``) rather than
    :meth:`WanVAE.decode` (tile-major: one tile's cache; the float32 output clip is counted too).
    Counts the decoder input, the per-tile caches, one tile's activations and the blend buffer; not
    the weights. ``dtype`` is the VAE weight dtype (activations and caches use it).
    """
    config = config or WAN21_VAE_CONFIG
    b, _, t, h, w = (int(v) for v in latent_shape)
    parsed = parse_tile(tile, overlap)
    grid = make_grid(h, w, parsed or (h, w), overlap)
    areas = [(r[1] - r[0]) * (c[1] - c[0]) * SCALE ** 2 for r in grid.rows for c in grid.cols]
    item = torch.empty((), dtype=dtype).element_size()
    cache_px = max(areas) if (offload_caches or not streaming) else sum(areas)
    frames = 1 + 4 * (t - 1)
    chunk_out = 3 * 4 * h * w * SCALE ** 2 * 4  # one float32 chunk of 4 frames (blend buffer)
    total = (cache_floats_per_pixel(config) * cache_px + _activation_floats_per_pixel(config) * max(areas)) * item
    total += config.z_dim * t * h * w * item  # decoder input (post-quant conv of the whole latent)
    total += 2 * chunk_out if streaming else 3 * frames * h * w * SCALE ** 2 * 4
    return int(b * total)


def choose_tile(latent_shape: Sequence[int], max_bytes: int, overlap: int = DEFAULT_OVERLAP, *,
                config=None, dtype: torch.dtype = torch.float32, streaming: bool = True,
                offload_caches: bool = False) -> Optional[Tuple[int, int]]:
    """The largest square-ish tile whose :func:`decode_peak_bytes` fits ``max_bytes``; None = no tiles.

    Raises :class:`InputError` when even the smallest tile (``2 * overlap`` latent px, at least 4)
    does not fit, saying what it would need.
    """
    _, _, _, h, w = (int(v) for v in latent_shape)
    kwargs = dict(config=config, dtype=dtype, streaming=streaming, offload_caches=offload_caches)
    if decode_peak_bytes(latent_shape, None, overlap, **kwargs) <= max_bytes:
        return None
    smallest = max(2 * overlap, overlap + 1, 4)
    for size in range(max(h, w) - 1, smallest - 1, -1):
        tile = (min(size, h), min(size, w))
        if min(tile) > overlap and decode_peak_bytes(latent_shape, tile, overlap, **kwargs) <= max_bytes:
            return tile
    tile = (min(smallest, h), min(smallest, w))
    need = decode_peak_bytes(latent_shape, tile, min(overlap, min(tile) - 1), **kwargs)
    hint = "" if (offload_caches or not streaming) else " (streaming keeps every tile's cache: try offload_caches=True)"
    raise InputError(f"VAE decode cannot fit {max_bytes / 2**20:.0f} MiB: even {tile[0]}x{tile[1]} latent-pixel "
                     f"tiles need about {need / 2**20:.0f} MiB{hint}")
