"""On-disk cache of each training sample's VAE latents, so that later epochs read latents only.

Without it every step decodes three or four videos and VAE-encodes four tensors (driving video, mask,
reference, supervision) before the DiT runs. With ``latent_cache`` set, the first time a sample window is
used its four latents are written to ``<cache folder>/<key[:2]>/<key>.safetensors``; afterwards the dataset
(in a DataLoader worker) reads that file instead of decoding the videos, and the loss skips the VAE. The
identity image (for identity encoders) and the pose video (the PoseGuider may train) are still read.

The key (blake2b) covers everything the latents depend on:

* the **content** of every file that goes into them (a hash of the bytes of identity, driving, mask,
  target; remembered per process by (inode, size, mtime, ctime), so a rewritten file is hashed again),
* the **VAE** (:func:`vae_fingerprint`: a hash of its weights, dtypes and shapes),
* the window (first frame, length), the area cap (width x height) and the preparation version.

A changed file therefore gives a new key (never a stale latent); a file that changes while a sample is read
is detected (its stat signature before and after) and that sample is simply not cached. Writes are atomic
(temporary file + rename): concurrent writers of the same key and interrupted writes leave either the old
file or a complete new one. An unreadable cache file counts as a miss and is rewritten. Samples with a
random augmentation (occlusion) are never cached: their pixels change every epoch.

Nothing is unpickled: the cache holds safetensors only.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import torch

from dreamidv_core.errors import InputError

log = logging.getLogger(__name__)

CACHE_VERSION = 1
LATENT_NAMES = ("video", "mask", "identity", "target")  # what each sample's cache file holds

_HASHES: Dict[Tuple[str, tuple], str] = {}  # (path, stat signature) -> content hash, per process


def stat_signature(path) -> tuple:
    """(inode, size, mtime_ns, ctime_ns): changes whenever the file is rewritten."""
    st = os.stat(path)
    return st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns


def content_hash(path) -> str:
    """blake2b-128 of the file's bytes (remembered while its stat signature does not change)."""
    path = str(path)
    key = (path, stat_signature(path))
    known = _HASHES.get(key)
    if known is None:
        h = hashlib.blake2b(digest_size=16)
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
        known = _HASHES[key] = h.hexdigest()
    return known


def _module_of(vae) -> Optional[torch.nn.Module]:
    """The nn.Module holding a VAE's weights: the VAE itself, or the one a wrapper holds (PixelSpaceVAE's
    ``vae``, ComfyUI's ``first_stage_model``)."""
    for obj in (vae, getattr(vae, "vae", None)):
        if isinstance(obj, torch.nn.Module):
            return obj
        inner = getattr(obj, "first_stage_model", None)
        if isinstance(inner, torch.nn.Module):
            return inner
    return None


@torch.no_grad()
def vae_fingerprint(vae) -> str:
    """A hash of the VAE's weights (names, dtypes, shapes and bytes), or its ``cache_fingerprint`` attribute
    (for a VAE without torch weights). Raises InputError when neither is available."""
    given = getattr(vae, "cache_fingerprint", None)
    if given:
        return str(given)
    module = _module_of(vae)
    if module is None:
        raise InputError(f"latent cache: cannot fingerprint a VAE of type {type(vae).__name__} (no torch weights "
                         "and no 'cache_fingerprint'); turn the latent cache off or give the VAE a fingerprint")
    h = hashlib.blake2b(digest_size=16)
    h.update(type(module).__name__.encode())
    for name, t in module.state_dict().items():
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.detach().contiguous().cpu().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


class LatentCache:
    """The cache folder for one VAE. ``fingerprint``: :func:`vae_fingerprint` of that VAE."""

    def __init__(self, folder, fingerprint: str):
        self.folder = Path(folder)
        self.fingerprint = str(fingerprint)
        self.hits = self.misses = self.writes = 0  # counted in the process that uses the object

    @classmethod
    def for_vae(cls, folder, vae) -> "LatentCache":
        return cls(folder, vae_fingerprint(vae))

    def key(self, files: Sequence, **extra) -> str:
        """The key of latents made from ``files`` (their content) with the settings ``extra`` (JSON-able)."""
        h = hashlib.blake2b(digest_size=20)
        h.update(json.dumps({"version": CACHE_VERSION, "vae": self.fingerprint, "extra": extra},
                            sort_keys=True).encode())
        for f in files:
            h.update(f"{Path(f).name}:{content_hash(f)}".encode())
        return h.hexdigest()

    def path(self, key: str) -> Path:
        return self.folder / key[:2] / f"{key}.safetensors"

    def load(self, key: str) -> Optional[Dict[str, torch.Tensor]]:
        """The latents under ``key`` ({name: tensor} for :data:`LATENT_NAMES`), or None (missing, unreadable
        or incomplete: counted as a miss)."""
        path = self.path(key)
        if not path.is_file():
            self.misses += 1
            return None
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            tensors = load_file(str(path))
        except (SafetensorError, OSError, ValueError) as exc:
            log.warning("latent cache: %s is unreadable (%s); it will be rewritten", path, exc)
            self.misses += 1
            return None
        if set(tensors) != set(LATENT_NAMES):
            log.warning("latent cache: %s holds %s, not %s; it will be rewritten", path, sorted(tensors),
                        list(LATENT_NAMES))
            self.misses += 1
            return None
        self.hits += 1
        return tensors

    def save(self, key: str, latents: Dict[str, torch.Tensor]) -> None:
        """Write ``latents`` ({name: [16, F', h, w]}) under ``key`` atomically (normal file permissions)."""
        from dreamidv_core.io.state_dict import save_safetensors

        missing = [n for n in LATENT_NAMES if n not in latents]
        if missing:
            raise InputError(f"latent cache: latents {missing} missing for {key}")
        bad = [n for n in LATENT_NAMES if not torch.isfinite(latents[n]).all()]
        if bad:  # never cache what would poison every later epoch
            raise InputError(f"latent cache: the VAE gave non-finite values for {bad} (key {key}); not cached")
        save_safetensors({n: latents[n] for n in LATENT_NAMES}, self.path(key),
                         metadata={"format": "pt", "dreamidv_latent_cache": str(CACHE_VERSION), "vae": self.fingerprint})
        self.writes += 1


def still_unchanged(signatures: Dict[str, tuple]) -> bool:
    """True when every file of ``signatures`` ({path: stat_signature}) still has that signature."""
    try:
        return all(stat_signature(p) == sig for p, sig in signatures.items())
    except OSError:
        return False


# ---------------------------------------------------------------------------------------- encoding a batch
def _rows(value, rows: List[int]) -> torch.Tensor:
    """Stack rows ``rows`` of a batched tensor [B, ...] or of a list of per-sample tensors."""
    if torch.is_tensor(value):
        return value[rows]
    return torch.stack([value[r] for r in rows])


@torch.no_grad()
def batch_latents(batch: Dict, vae, cache: Optional[LatentCache] = None) -> Dict[str, torch.Tensor]:
    """The four latents of a collated :class:`training.dataset.DreamIDVDataset` batch -> {name: [B, 16, F', h, w]}
    (identity: [B, 16, 1, h, w]), in the sampler's conventions (:func:`training.objective.encode_latents`).

    Samples that came from the cache (``batch["latents"][b]`` is a dict) are used as they are; the others are
    encoded from their pixels (video/target [3, F, H, W] in [-1, 1], mask [3, F, H, W] in [0, 1], identity
    [3, 1, H, W] in [-1, 1]) in one VAE call per tensor, and written to ``cache`` when they carry a
    ``cache_key``. Call it under :func:`training.objective.frozen_vae_for`.
    """
    from .objective import encode_latents

    n = len(batch["index"]) if "index" in batch else batch["video"].shape[0]
    cached = list(batch.get("latents") or [None] * n)
    todo = [b for b in range(n) if cached[b] is None]
    fresh: Dict[str, torch.Tensor] = {}
    if todo:
        missing = [k for k in ("video", "mask", "identity", "target") if k not in batch]
        if missing:
            raise InputError(f"training batch lacks {missing}; expected training.dataset.DreamIDVDataset items")
        mask = _rows(batch["mask"], todo).float()
        if mask.shape[1] == 1:
            mask = mask.expand(-1, 3, -1, -1, -1)
        video_lat, mask_lat, ref_lat = encode_latents(
            vae, _rows(batch["video"], todo).float().add(1).div(2), mask,
            _rows(batch["identity"], todo)[:, :, 0].float().add(1).div(2))
        fresh = {"video": video_lat, "mask": mask_lat, "identity": ref_lat,
                 "target": vae.encode(_rows(batch["target"], todo).float())}
        keys = batch.get("cache_key") or [None] * n
        for j, b in enumerate(todo):
            if cache is not None and keys[b]:
                try:
                    cache.save(keys[b], {k: v[j] for k, v in fresh.items()})
                except InputError as exc:
                    log.warning("%s", exc)
    out = {}
    for name in LATENT_NAMES:
        rows: List[Optional[torch.Tensor]] = [None] * n
        for j, b in enumerate(todo):
            rows[b] = fresh[name][j]
        for b in range(n):
            if rows[b] is None:
                rows[b] = cached[b][name]
        ref = next(r for r in rows)
        out[name] = torch.stack([r.to(ref.device, ref.dtype) for r in rows])
    return out


def cache_stats(caches: Iterable[Optional[LatentCache]]) -> Dict[str, int]:
    """Summed hit / miss / write counts of cache objects (those of this process)."""
    out = {"hits": 0, "misses": 0, "writes": 0}
    for c in caches:
        if c is not None:
            out["hits"] += c.hits
            out["misses"] += c.misses
            out["writes"] += c.writes
    return out
