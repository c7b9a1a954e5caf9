"""The Wan 2.1 video VAE: encode video to normalised latents and decode them back, streaming.

Compression: 8x in height and width, 4x in time after the first frame, 16 latent channels:
video ``[B, 3, 1 + 4n, H, W]`` in [-1, 1]  <->  latent ``[B, 16, 1 + n, H/8, W/8]``.

The chunked passes (:meth:`WanVAE.encode_iter`, :meth:`WanVAE.decode_iter`, and :meth:`WanVAE.encode`
/ :meth:`WanVAE.decode` built on them) follow the released algorithm: the encoder sees frame 0 alone
and then 4 frames at a time, the decoder one latent frame at a time, each carrying the causal
temporal cache to the next chunk, so peak memory does not grow with the clip length. The
``*_oneshot`` methods run the whole clip through the network at once; they give the same result and
serve as an independent reference. ``decode``/``decode_iter`` also take spatial tiles (``tile=``,
``overlap=``, ``'auto'`` with ``max_bytes``; see :mod:`dreamidv_core.models.vae_tiling` for the blend and
the memory model, and :func:`decode_peak_bytes` for the estimate).

Weights: :func:`load_wan_vae` reads the official ``Wan2.1_VAE.pth`` and ComfyUI's
``wan_2.1_vae.safetensors``. Both use the same tensor names (ComfyUI's ``comfy/ldm/wan/vae.py``
keeps the official module tree), so no renaming is needed.
"""
from __future__ import annotations

from typing import Iterable, Iterator, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import CheckpointError, InputError
from ..io.state_dict import check_floating, read_state_dict
from .configs import TINY_VAE_CONFIG, WAN21_VAE_CONFIG, WanVAEConfig
from .frame_grid import SPATIAL_STRIDE, TEMPORAL_STRIDE
from .vae_blocks import CausalConv3d, Decoder3d, Encoder3d, TemporalCache
from .vae_tiling import (DEFAULT_OVERLAP, TileGrid, TileSpec, choose_tile, decode_peak_bytes, make_grid,
                         parse_tile)

__all__ = ["WanVAEConfig", "WAN21_VAE_CONFIG", "TINY_VAE_CONFIG", "LATENT_MEAN", "LATENT_STD",
           "WanVAE", "load_wan_vae", "is_wan_vae_state_dict", "decode_peak_bytes", "choose_tile"]

# Per-channel statistics of Wan 2.1 latents (official ``wan/modules/vae.py``).
LATENT_MEAN = (-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
               0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921)
LATENT_STD = (2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
              3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160)



class WanVAE(nn.Module):
    """Wan 2.1 video VAE with the official parameter names (``encoder.*``, ``conv1``, ``conv2``, ``decoder.*``).

    Inputs may live on any device and dtype; each chunk is moved to the model's device and weight
    dtype as it is processed. Latents are returned as float32 and normalised with
    :data:`LATENT_MEAN` / :data:`LATENT_STD`; decoded video is float32 clamped to [-1, 1].
    """

    def __init__(self, config: WanVAEConfig = WAN21_VAE_CONFIG):
        super().__init__()
        if config.z_dim != len(LATENT_MEAN):
            raise ValueError(f"z_dim must be {len(LATENT_MEAN)} (one latent statistic per channel), "
                             f"got {config.z_dim}")
        self.config = config
        z = config.z_dim
        self.encoder = Encoder3d(config.dim, 2 * z, config.dim_mult, config.num_res_blocks,
                                 config.temporal_downsample)
        self.conv1 = CausalConv3d(2 * z, 2 * z, 1)  # quant conv: encoder output -> (mu, log_var)
        self.conv2 = CausalConv3d(z, z, 1)  # post-quant conv
        self.decoder = Decoder3d(config.dim, z, config.dim_mult, config.num_res_blocks,
                                 tuple(reversed(config.temporal_downsample)))

    # ------------------------------------------------------------------ properties / helpers

    @property
    def device(self) -> torch.device:
        return self.conv2.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.conv2.weight.dtype

    def _latent_stats(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """``mean`` and ``1 / std`` as float32 ``[1, 16, 1, 1, 1]`` (the official stores 1/std)."""
        shape = (1, self.config.z_dim, 1, 1, 1)
        mean = torch.tensor(LATENT_MEAN, dtype=torch.float32, device=self.device).view(shape)
        inv_std = 1.0 / torch.tensor(LATENT_STD, dtype=torch.float32, device=self.device).view(shape)
        return mean, inv_std

    def _mu(self, features: torch.Tensor, mean: torch.Tensor, inv_std: torch.Tensor) -> torch.Tensor:
        """Encoder features ``[B, 32, T, h, w]`` -> normalised float32 mean ``[B, 16, T, h, w]``.

        Only the ``mu`` half of the quant conv is computed; ``log_var`` is never used.
        """
        z = self.config.z_dim
        mu = F.conv3d(features, self.conv1.weight[:z], self.conv1.bias[:z])
        return (mu.float() - mean) * inv_std

    def _check_video(self, video: torch.Tensor, what: str) -> None:
        if video.dim() != 5 or video.shape[1] != 3:
            raise InputError(f"{what}: expected a video tensor [B, 3, F, H, W], got shape {tuple(video.shape)}")
        h, w = video.shape[-2:]
        if h % SPATIAL_STRIDE or w % SPATIAL_STRIDE:
            raise InputError(f"{what}: height and width must be multiples of {SPATIAL_STRIDE}, got {h}x{w}")

    def _check_frame_count(self, frames: int, what: str) -> None:
        if frames < 1 or (frames - 1) % TEMPORAL_STRIDE:
            raise InputError(f"{what}: the Wan VAE needs 4n+1 frames (1, 5, 9, ..., 81, ...), got {frames}")

    def _check_latent(self, latent: torch.Tensor) -> None:
        if latent.dim() != 5 or latent.shape[1] != self.config.z_dim or latent.shape[2] < 1:
            raise InputError(f"latent: expected [B, {self.config.z_dim}, T, h, w] with T >= 1, "
                             f"got shape {tuple(latent.shape)}")

    # ------------------------------------------------------------------ encoding

    @torch.no_grad()
    def encode_iter(self, chunks: Iterable[torch.Tensor]) -> Iterator[torch.Tensor]:
        """Stream-encode a clip given as consecutive frame chunks.

        ``chunks`` yields ``[B, 3, n_i, H, W]`` tensors in [-1, 1] of any sizes ``n_i >= 1``; their
        total must be ``4n+1``. Yields one normalised latent frame ``[B, 16, 1, H/8, W/8]`` (float32)
        per encoder step: after frame 0, then after every further 4 frames. At most one chunk plus
        3 leftover frames are held at a time.
        """
        cache = TemporalCache()
        mean, inv_std = self._latent_stats()
        pending: Optional[torch.Tensor] = None  # frames received but not yet encoded
        need, total, geometry = 1, 0, None
        for chunk in chunks:
            self._check_video(chunk, f"frame chunk starting at frame {total}")
            if geometry is None:
                geometry = (chunk.shape[0], *chunk.shape[-2:])
            elif (chunk.shape[0], *chunk.shape[-2:]) != geometry:
                raise InputError(f"frame chunk starting at frame {total}: shape {tuple(chunk.shape)} does "
                                 f"not match the first chunk's batch and size {geometry}")
            total += chunk.shape[2]
            pending = chunk if pending is None else torch.cat([pending, chunk.to(pending)], dim=2)
            while pending is not None and pending.shape[2] >= need:
                step = pending[:, :, :need].to(self.device, self.dtype)
                pending = pending[:, :, need:] if pending.shape[2] > need else None
                yield self._mu(self.encoder(step, cache), mean, inv_std)
                need = TEMPORAL_STRIDE
        self._check_frame_count(total, "video")

    @torch.no_grad()
    def encode(self, video: torch.Tensor) -> torch.Tensor:
        """Video ``[B, 3, 4n+1, H, W]`` in [-1, 1] -> normalised latent ``[B, 16, n+1, H/8, W/8]`` (float32).

        Returns ``(mu - mean) / std`` of the posterior (no sampling), as the official ``encode``.
        """
        self._check_video(video, "video")
        frames = video.shape[2]
        self._check_frame_count(frames, "video")
        b, _, _, h, w = video.shape
        out = torch.empty(b, self.config.z_dim, 1 + (frames - 1) // TEMPORAL_STRIDE,
                          h // SPATIAL_STRIDE, w // SPATIAL_STRIDE, dtype=torch.float32, device=self.device)
        chunks = (video[:, :, max(0, s - TEMPORAL_STRIDE + 1):s + 1] for s in range(0, frames, TEMPORAL_STRIDE))
        for i, latent_frame in enumerate(self.encode_iter(chunks)):
            out[:, :, i:i + 1] = latent_frame
        return out

    @torch.no_grad()
    def encode_oneshot(self, video: torch.Tensor) -> torch.Tensor:
        """As :meth:`encode`, but the whole clip passes through the network at once (no cache).

        Memory grows with the clip length; used as a reference and for benchmarks.
        """
        self._check_video(video, "video")
        self._check_frame_count(video.shape[2], "video")
        mean, inv_std = self._latent_stats()
        return self._mu(self.encoder(video.to(self.device, self.dtype)), mean, inv_std)

    # ------------------------------------------------------------------ decoding

    def _decoder_input(self, latent: torch.Tensor) -> torch.Tensor:
        """Undo the normalisation and apply the post-quant conv, once for the whole latent."""
        self._check_latent(latent)
        mean, inv_std = self._latent_stats()
        z = latent.to(self.device, torch.float32) / inv_std + mean
        return self.conv2(z.to(self.dtype))

    def _tiling(self, latent: torch.Tensor, tile: TileSpec, overlap: int, max_bytes: Optional[int],
                streaming: bool, offload_caches: bool) -> Optional[TileGrid]:
        """Resolve a tile spec (``'auto'`` included) into a :class:`TileGrid`; None = untiled."""
        self._check_latent(latent)
        if isinstance(tile, str):
            if tile != "auto":
                raise InputError(f"tile must be None, 'auto', an int or (height, width), got {tile!r}")
            parse_tile(None, overlap)  # validates the overlap
            if max_bytes is None:
                if self.device.type != "cuda":
                    raise InputError("tile='auto' needs max_bytes (the memory the decode may use) "
                                     "on a device other than CUDA")
                max_bytes = int(0.9 * torch.cuda.mem_get_info(self.device)[0])
            parsed = choose_tile(latent.shape, max_bytes, overlap, config=self.config, dtype=self.dtype,
                                 streaming=streaming, offload_caches=offload_caches)
        else:
            parsed = parse_tile(tile, overlap)
        h, w = latent.shape[-2:]
        if parsed is None or (parsed[0] >= h and parsed[1] >= w):
            return None
        return make_grid(h, w, parsed, overlap)

    @torch.no_grad()
    def decode_iter(self, latent: torch.Tensor, tile: TileSpec = None, overlap: int = DEFAULT_OVERLAP,
                    max_bytes: Optional[int] = None, offload_caches: bool = False) -> Iterator[torch.Tensor]:
        """Stream-decode normalised latents ``[B, 16, T, h, w]``.

        Yields the video in chunks, float32 in [-1, 1]: ``[B, 3, 1, 8h, 8w]`` for latent frame 0, then
        ``[B, 3, 4, 8h, 8w]`` per further latent frame (``1 + 4(T-1)`` frames in all). Only one
        chunk's activations and the temporal cache are alive at a time.

        Spatial tiles (see :mod:`dreamidv_core.models.vae_tiling`): ``tile`` None (off), an int or
        ``(height, width)`` in latent pixels, or ``'auto'`` (the largest tile whose estimated peak,
        :func:`decode_peak_bytes`, fits ``max_bytes``; on CUDA ``max_bytes`` defaults to 90 % of the
        free memory); ``overlap`` in latent pixels. Per latent frame the tiles are decoded one after
        another, each with its own temporal cache, and blended with raised-cosine ramps. Every
        tile's cache stays alive between latent frames (together they cover the whole frame:
        ``offload_caches=True`` keeps the idle ones in CPU memory). A tile at least as large as the
        latent decodes untiled.
        """
        grid = self._tiling(latent, tile, overlap, max_bytes, True, offload_caches)
        x = self._decoder_input(latent)
        if grid is None:
            cache = TemporalCache()
            for t in range(x.shape[2]):
                yield self.decoder(x[:, :, t:t + 1], cache).float().clamp_(-1.0, 1.0)
            return
        tiles, weights = grid.tiles(), grid.weights(self.device)
        caches = [TemporalCache() for _ in tiles]
        park = torch.device("cpu") if offload_caches and self.device.type != "cpu" else None
        b, _, frames, h, w = x.shape
        for t in range(frames):
            out = None
            for (rows, cols), weight, cache in zip(tiles, weights, caches):
                if park is not None:
                    _move_cache(cache, self.device)
                y = self.decoder(x[:, :, t:t + 1, rows, cols], cache)
                if park is not None:
                    _move_cache(cache, park)
                if out is None:
                    out = torch.zeros(b, 3, y.shape[2], h * SPATIAL_STRIDE, w * SPATIAL_STRIDE,
                                      dtype=torch.float32, device=self.device)
                out[..., _video(rows), _video(cols)] += y.float() * weight
                del y
            yield out.clamp_(-1.0, 1.0)

    @torch.no_grad()
    def decode(self, latent: torch.Tensor, tile: TileSpec = None, overlap: int = DEFAULT_OVERLAP,
               max_bytes: Optional[int] = None) -> torch.Tensor:
        """Normalised latent ``[B, 16, T, h, w]`` -> video ``[B, 3, 1 + 4(T-1), 8h, 8w]``, float32 in [-1, 1].

        ``tile``, ``overlap``, ``max_bytes`` as for :meth:`decode_iter`, with the same result; tiles
        are decoded tile-major here (all frames of one tile, then the next), so only one tile's
        temporal cache is alive at any time.
        """
        self._check_latent(latent)
        b, _, t, h, w = latent.shape
        out = torch.zeros(b, 3, 1 + TEMPORAL_STRIDE * (t - 1), h * SPATIAL_STRIDE, w * SPATIAL_STRIDE,
                          dtype=torch.float32, device=self.device)
        grid = self._tiling(latent, tile, overlap, max_bytes, False, False)
        if grid is None:
            start = 0
            for chunk in self.decode_iter(latent):
                out[:, :, start:start + chunk.shape[2]] = chunk
                start += chunk.shape[2]
            return out
        x = self._decoder_input(latent)
        for (rows, cols), weight in zip(grid.tiles(), grid.weights(self.device)):
            cache, start = TemporalCache(), 0
            for i in range(t):
                y = self.decoder(x[:, :, i:i + 1, rows, cols], cache)
                out[:, :, start:start + y.shape[2], _video(rows), _video(cols)] += y.float() * weight
                start += y.shape[2]
                del y
        return out.clamp_(-1.0, 1.0)

    @torch.no_grad()
    def decode_oneshot(self, latent: torch.Tensor) -> torch.Tensor:
        """As :meth:`decode`, but all latent frames pass through the network at once (no cache)."""
        return self.decoder(self._decoder_input(latent)).float().clamp_(-1.0, 1.0)


def _video(latent_slice: slice) -> slice:
    """Latent-pixel slice -> the video-pixel slice it decodes to."""
    return slice(latent_slice.start * SPATIAL_STRIDE, latent_slice.stop * SPATIAL_STRIDE)


def _move_cache(cache: TemporalCache, device: torch.device) -> None:
    """Move a tile's cached tails to ``device`` (to park an idle tile's cache off the accelerator)."""
    for key, value in cache.tails.items():
        cache.tails[key] = value.to(device)


# ---------------------------------------------------------------------- weight files

_MARKER_KEYS = ("encoder.conv1.weight", "conv1.weight", "conv2.weight",
                "decoder.middle.0.residual.0.gamma", "decoder.upsamples.0.residual.0.gamma")
_WAN22_MARKER = "decoder.upsamples.0.upsamples.0.residual.0.gamma"
_DIFFUSERS_MARKER = "decoder.conv_in.weight"


def is_wan_vae_state_dict(names: Iterable[str]) -> bool:
    """Whether tensor ``names`` look like a Wan 2.1 VAE in the official (= ComfyUI) layout.

    False for the Wan 2.2 VAE and for the diffusers ``AutoencoderKLWan`` layout.
    """
    names = set(names)
    return all(k in names for k in _MARKER_KEYS) and _WAN22_MARKER not in names


def _layout_hint(names) -> str:
    if _WAN22_MARKER in names:
        return " This is the Wan 2.2 VAE (48 latent channels); DreamID-V needs the Wan 2.1 VAE."
    if _DIFFUSERS_MARKER in names:
        return (" This is the diffusers (AutoencoderKLWan) layout; use Wan2.1_VAE.pth or ComfyUI's "
                "wan_2.1_vae.safetensors.")
    return ""


def _name_list(names, limit: int = 8) -> str:
    names = sorted(names)
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")


def load_wan_vae(path, device="cpu", dtype: torch.dtype = torch.float32,
                 config: WanVAEConfig = WAN21_VAE_CONFIG) -> WanVAE:
    """Load a Wan 2.1 VAE from ``Wan2.1_VAE.pth`` or ``wan_2.1_vae.safetensors``.

    The model is built on the ``meta`` device and each tensor is read (memory-mapped), converted to
    ``dtype`` on ``device`` and assigned into place, so no second copy of the weights is made.
    Raises :class:`CheckpointError` naming the file when it is unreadable or its tensor names or
    shapes are not exactly those of the model.
    """
    reader = read_state_dict(path)
    with torch.device("meta"):
        model = WanVAE(config)
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    found = set(reader.keys())
    missing, unexpected = expected.keys() - found, found - expected.keys()
    if missing or unexpected:
        problem = "not a Wan 2.1 VAE weight file (tensor names differ)."
        if missing:
            problem += f" Missing {len(missing)}: {_name_list(missing)}."
        if unexpected:
            problem += f" Unexpected {len(unexpected)}: {_name_list(unexpected)}."
        raise CheckpointError(path, problem + _layout_hint(found))
    wrong = [f"{n} {reader.shape(n)} (expected {s})" for n, s in expected.items()
             if tuple(reader.shape(n)) != s]
    if wrong:
        raise CheckpointError(path, f"tensor shapes differ from the Wan 2.1 VAE: {_name_list(wrong, 4)}."
                              + _layout_hint(found))
    check_floating(reader, list(expected), "VAE")
    state = {name: reader[name].to(device=device, dtype=dtype) for name in expected}
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval().requires_grad_(False)
