"""Enhanced background recomposition: the real clip's background without its person, and the
generated person recomposed over it.

:func:`clean_background` (V_r, M_r -> V_bg), streaming, two passes over the clip:

1. **plate**: for every pixel, the mean of its values in the frames where it lies outside the dilated
   person mask (``sum`` [H, W, 3] and ``count`` [H, W]: memory independent of the clip length). With a
   static camera this is the background behind the person wherever the person moved away at some time.
2. **fill**, frame by frame: inside the dilated person region (the *hole*) a pixel takes the plate
   where the plate saw it (``mode="plate"``), the rest of the hole is inpainted with OpenCV
   (``cv2.inpaint``, Telea) from the frame with the plate already filled in; then the hole is
   smoothed in time with an exponential moving average of the previous output inside it
   (``out_t = (1 - a) * fill_t + a * out_{t-1}`` where the pixel was in the hole at t-1 too), so the
   filled region does not flicker. Outside the hole the frame is kept exactly.
   ``mode="inpaint"`` (moving camera) skips the plate: per-frame inpainting + the same smoothing.

:func:`recompose`: ``V'_g = M_g * V_g + (1 - M_g) * V_bg`` (soft masks allowed, optional dilation and
feathering of M_g as in :mod:`dreamidv_core.preprocess.composite`), chunk by chunk into a preallocated output.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch

from ..errors import InputError
from ..preprocess.composite import composite, dilate, feather
from ..progress import Cancel, Progress, check_cancel, reporter

MODES = ("plate", "inpaint")


def _frames(x, what: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.shape[-1] not in (1, 3, 4) or x.shape[0] < 1:
        raise InputError(f"{what}: expected frames [F, H, W, C] (C = 1, 3 or 4), got "
                         f"{list(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
    return x.detach()


def _rgb(chunk: torch.Tensor) -> torch.Tensor:
    """[k, H, W, C] -> float32 [k, H, W, 3] 0..1 on the CPU."""
    x = chunk.cpu()
    x = x.float() / 255.0 if x.dtype == torch.uint8 else x.float()
    return x.expand(-1, -1, -1, 3) if x.shape[-1] == 1 else x[..., :3]


def _masks(mask, frames: torch.Tensor, what: str, count: Optional[int] = None) -> torch.Tensor:
    if not isinstance(mask, torch.Tensor):
        raise InputError(f"{what}: expected a MASK [F, H, W], got {type(mask).__name__}")
    if mask.dim() == 2:
        mask = mask[None]
    if mask.dim() != 3:
        raise InputError(f"{what}: expected a MASK [F, H, W], got shape {list(mask.shape)}")
    count = frames.shape[0] if count is None else count
    if mask.shape[0] < count:
        raise InputError(f"{what} has {mask.shape[0]} frames but the clip has {count}; it must be the same clip")
    if tuple(mask.shape[1:]) != tuple(frames.shape[1:3]):
        raise InputError(f"{what} is {mask.shape[2]}x{mask.shape[1]} but the frames are "
                         f"{frames.shape[2]}x{frames.shape[1]}; they must have the same size")
    return mask[:count].detach()


def person_holes(mask: torch.Tensor, dilation: int, threshold: float = 0.5) -> torch.Tensor:
    """mask [k, H, W] (soft 0..1) -> bool [k, H, W]: the person region grown by ``dilation`` pixels."""
    return dilate(mask.cpu().float() >= threshold, dilation) > 0.5


def background_plate(frames: torch.Tensor, mask: torch.Tensor, dilation: int = 8, chunk: int = 8,
                     cancel: Cancel = None):
    """-> (plate float32 [H, W, 3] 0..1, seen bool [H, W]): the mean of each pixel over the frames where
    it is outside the dilated person mask (unseen pixels: 0)."""
    h, w = frames.shape[1:3]
    total = torch.zeros(h, w, 3, dtype=torch.float64)
    count = torch.zeros(h, w, dtype=torch.float64)
    for s in range(0, frames.shape[0], chunk):
        check_cancel(cancel, "background recomposition")
        rgb = _rgb(frames[s:s + chunk])
        visible = (~person_holes(mask[s:s + chunk], dilation)).double()
        total += (rgb.double() * visible[..., None]).sum(0)
        count += visible.sum(0)
    seen = count > 0
    plate = (total / count.clamp(min=1)[..., None]).float()
    return plate, seen


def _inpaint(frame: np.ndarray, hole: np.ndarray, radius: int) -> np.ndarray:
    """frame float32 [H, W, 3] 0..1, hole bool [H, W] -> frame with the hole inpainted (Telea)."""
    import cv2

    if not hole.any():
        return frame
    if hole.all():  # nothing to inpaint from: keep the frame's mean colour
        return np.broadcast_to(frame.reshape(-1, 3).mean(0), frame.shape).astype(np.float32)
    img = np.clip(np.rint(frame * 255), 0, 255).astype(np.uint8)
    filled = cv2.inpaint(img, hole.astype(np.uint8), max(1, int(radius)), cv2.INPAINT_TELEA)
    out = frame.copy()
    out[hole] = filled[hole].astype(np.float32) / 255.0
    return out


def clean_background(frames: torch.Tensor, mask: torch.Tensor, dilation: int = 8, mode: str = "plate",
                     smoothing: float = 0.6, inpaint_radius: int = 5, chunk: int = 8,
                     progress: Progress = None, cancel: Cancel = None) -> torch.Tensor:
    """The real clip without its person (see the module docstring).

    frames: V_r [F, H, W, C] 0..1 (uint8 accepted); mask: its person mask M_r [F, H, W] (soft, >= 0.5 =
    person); dilation: pixels the person region is grown by before removal; smoothing: the EMA weight
    ``a`` in [0, 1) of the previous output inside the hole (0: no smoothing). Returns V_bg float32
    [F, H, W, 3] 0..1 on the CPU, equal to V_r outside the dilated person region.
    """
    frames = _frames(frames, "real clip")
    mask = _masks(mask, frames, "real clip person mask")
    if mode not in MODES:
        raise InputError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    if not 0.0 <= smoothing < 1.0:
        raise InputError(f"smoothing must be in [0, 1), got {smoothing}")
    count, h, w = frames.shape[0], frames.shape[1], frames.shape[2]
    plate = seen = None
    if mode == "plate":
        plate, seen = background_plate(frames, mask, dilation, chunk, cancel)
        plate, seen = plate.numpy(), seen.numpy()
    out = torch.empty(count, h, w, 3, dtype=torch.float32)
    report = reporter(progress)
    prev = prev_hole = None
    for s in range(0, count, chunk):
        check_cancel(cancel, "background recomposition")
        rgb = _rgb(frames[s:s + chunk]).numpy()
        holes = person_holes(mask[s:s + chunk], dilation).numpy()
        for k in range(rgb.shape[0]):
            frame, hole = rgb[k], holes[k]
            filled = frame.copy()
            todo = hole
            if plate is not None:
                use = hole & seen
                filled[use] = plate[use]
                todo = hole & ~seen
            filled = _inpaint(filled, todo, inpaint_radius)
            if prev is not None and smoothing > 0:
                both = hole & prev_hole
                filled[both] = (1 - smoothing) * filled[both] + smoothing * prev[both]
            out[s + k] = torch.from_numpy(filled)
            prev, prev_hole = filled, hole
            report("recompose", s + k + 1, count)
    return out


def recompose(generated: torch.Tensor, generated_mask: torch.Tensor, background: torch.Tensor,
              dilation: int = 0, feather_radius: int = 0, chunk: int = 8, cancel: Cancel = None) -> torch.Tensor:
    """V'_g = M_g * V_g + (1 - M_g) * V_bg.

    generated: V_g [G, H, W, C]; generated_mask: M_g [G, H, W] in 0..1 (soft allowed; with ``dilation`` or
    ``feather_radius`` > 0 it is binarised at 0.5, grown and feathered like the SAM2 composite);
    background: V_bg [F, H, W, C] with F >= G (the first G frames are used). Returns float32 [G, H, W, 3]
    on the CPU; exact where M_g is 0 or 1.
    """
    gen = _frames(generated, "generated clip")
    bg = _frames(background, "background clip")
    count = gen.shape[0]
    if bg.shape[0] < count:
        raise InputError(f"the background clip has {bg.shape[0]} frames but the generated clip has {count}")
    if tuple(bg.shape[1:3]) != tuple(gen.shape[1:3]):
        raise InputError(f"the generated clip is {gen.shape[2]}x{gen.shape[1]} but the background is "
                         f"{bg.shape[2]}x{bg.shape[1]}; they must have the same size")
    mask = _masks(generated_mask, gen, "generated clip person mask", count)
    out = torch.empty(count, gen.shape[1], gen.shape[2], 3, dtype=torch.float32)
    for s in range(0, count, chunk):
        check_cancel(cancel, "background recomposition")
        e = min(count, s + chunk)
        m = mask[s:e].cpu().float().clamp(0, 1)
        if dilation > 0 or feather_radius > 0:
            m = feather(dilate(m >= 0.5, dilation), feather_radius)
        out[s:e] = composite(_rgb(bg[s:e]), _rgb(gen[s:e]), m).clamp_(0, 1)
    return out
