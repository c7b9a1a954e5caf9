"""One image's face swapped to the identity I_g with the DreamID-V model itself.

DreamID-V is a video model (clips of 4n+1 >= 5 frames), so the image is repeated to a still clip of
5 frames with its face mask (and pose drawing), swapped with :func:`dreamidv_core.pipelines.swap.swap_face`,
and **frame 0** of the result is kept: with the Wan VAE's causal layout, latent frame 0 encodes video
frame 0 alone, so frame 0 is the one decoded from a latent of that single image (frames 1-4 share
one latent frame). The model's frame (resized and centre-cropped to multiples of 16 within the area)
is pasted back onto the source image (:func:`dreamidv_core.preprocess.geometry.paste_back`), so the result has
the source image's size and every pixel outside the model's crop is the source's.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Optional

import torch

from ..errors import InputError
from ..preprocess.geometry import paste_back, source_crop_box
from ..pipelines.swap import SwapSettings, swap_face

STILL_FRAMES = 5  # the shortest clip the model takes (latent frame 0 + one 4-frame latent)


def _image(x, what: str, channels: bool = True) -> torch.Tensor:
    """[H, W, C] / [1, H, W, C] (or a mask [H, W] / [1, H, W]) -> float32 [1, H, W(, C)] on the CPU."""
    if not isinstance(x, torch.Tensor):
        raise InputError(f"{what}: expected a tensor, got {type(x).__name__}")
    x = x.detach().cpu()
    want = 4 if channels else 3
    if x.dim() == want - 1:
        x = x[None]
    if x.dim() != want or x.shape[0] < 1:
        raise InputError(f"{what}: expected {'an image [1, H, W, C]' if channels else 'a mask [1, H, W]'}, "
                         f"got shape {list(x.shape)}")
    if x.shape[0] > 1:
        x = x[:1]
    x = x.float() / 255.0 if x.dtype == torch.uint8 else x.float()
    return x[..., :3] if channels else x


def swap_image(dit, vae, image, mask, reference, context: torch.Tensor, pose=None,
               settings: SwapSettings = SwapSettings(), ref_latent: Optional[torch.Tensor] = None,
               progress=None, cancel=None) -> torch.Tensor:
    """Swap the face of ``image`` for the identity of ``reference``.

    image: [1, H, W, 3] or [H, W, 3] float 0..1 (uint8 accepted); mask: its face mask [1, H, W] / [H, W]
    in 0..1; pose: its pose drawing [1, H, W, 3] (the full model needs it); reference: the identity image
    I_g [H, W, 3] (or ``ref_latent`` from :func:`dreamidv_core.preprocess.identity_bundle.encode_reference`); context: umT5 text
    context [L, text_dim]. ``settings.frame_num`` is ignored. Returns [1, H, W, 3] float32 0..1.
    """
    img = _image(image, "image")
    msk = _image(mask, "mask", channels=False)
    h, w = img.shape[1:3]
    if tuple(msk.shape[1:3]) != (h, w):
        raise InputError(f"mask is {msk.shape[2]}x{msk.shape[1]} but the image is {w}x{h}; they must have the same size")
    still = img.expand(STILL_FRAMES, -1, -1, -1)
    still_mask = msk.expand(STILL_FRAMES, -1, -1)
    still_pose = None
    if pose is not None:
        p = _image(pose, "pose")
        if tuple(p.shape[1:3]) != (h, w):
            raise InputError(f"pose is {p.shape[2]}x{p.shape[1]} but the image is {w}x{h}; they must have the same size")
        still_pose = p.expand(STILL_FRAMES, -1, -1, -1)
    s = replace(settings, frame_num=None)
    result = swap_face(dit, vae, still, still_mask, reference, context, pose=still_pose, settings=s,
                       progress=progress, cancel=cancel, ref_latent=ref_latent)
    frame = result.frames[:1].clamp(0, 1)
    return paste_back(img, frame, source_crop_box(h, w, s.width, s.height))
