"""SAM 2 head segmentation for the background composite (the ``sam2`` package, no ComfyUI).

SAM 2 is prompted with the face mask of the first frames (``add_new_mask``) and propagated through the
clip with its video predictor. Frames are fed from a frame sequence (an IMAGE tensor or a lazy video
reader, :mod:`dreamidv_core.io.frames`): one frame is read, resized and normalised when the predictor asks
for it, so no folder of JPEGs and no resized copy of the whole clip is made; old per-frame tracking memory
beyond what SAM 2 reads back is dropped as the clip advances. :func:`track_head_iter` hands each frame's
mask over as it is found (nothing clip-sized is kept); :func:`track_head` collects them.

Checkpoints are the official ``{"model": state_dict}`` ``.pt`` files (read with
``torch.load(weights_only=True)``), a bare state dict, or a ``.safetensors`` file. The model config is
told from the weights (SAM 2.0 / 2.1, tiny / small / base_plus / large), else from the file name, or
given explicitly (a bundled config name or a ``.yaml`` path).
"""
from __future__ import annotations

import contextlib
import os
import re
import threading
from pathlib import Path
from typing import Callable, Iterator, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from .. import optional
from ..errors import Cancelled, CheckpointError, InputError


# The official checkpoint file names (what users download), for error messages.
OFFICIAL_NAMES = tuple(f"{v}_hiera_{s}.pt" for v in ("sam2.1", "sam2")
                       for s in ("tiny", "small", "base_plus", "large"))

# Hiera trunk (embed dim, block count) -> the size letter used by the bundled config names.
_ARCH_SIZE = {(96, 12): "t", (96, 16): "s", (112, 24): "b+", (144, 48): "l"}
_NAME_SIZE = (("b+", r"base[_\-]?plus|b\+|hiera_b(?![a-z])"), ("t", r"tiny|hiera_t(?![a-z])"),
              ("s", r"small|hiera_s(?![a-z])"), ("l", r"large|hiera_l(?![a-z])"))
_IMG_MEAN = (0.485, 0.456, 0.406)  # the normalisation SAM 2's image encoder was trained with
_IMG_STD = (0.229, 0.224, 0.225)
_PATCH_LOCK = threading.Lock()
_ALLOWED_TARGETS = ("sam2.modeling.", "sam2.sam2_video_predictor.")


def _sam2_package():
    """``sam2.sam2_video_predictor``, or :class:`optional.MissingDependency` with the install commands."""
    optional.require("sam2", "SAM 2 segmentation", "sam2.sam2_video_predictor")
    import sam2.sam2_video_predictor as video_predictor

    return video_predictor


def bundled_config(version: str, size: str) -> str:
    """Config name inside the sam2 package, e.g. ``configs/sam2.1/sam2.1_hiera_t.yaml``."""
    return f"configs/{version}/{version}_hiera_{size}.yaml"


def bundled_configs() -> list:
    """Every model config the sam2 package ships (SAM 2.0 and 2.1, tiny to large)."""
    return [bundled_config(v, s) for v in ("sam2.1", "sam2") for s in ("t", "s", "b+", "l")]


def config_from_name(filename: str) -> Optional[str]:
    """Bundled config named by a checkpoint file name (``sam2.1_hiera_small.pt`` -> ...s.yaml), or None."""
    name = os.path.basename(filename).lower()
    if not name.startswith("sam2"):
        return None
    version = "sam2.1" if re.match(r"sam2[._\-]1", name) else "sam2"
    for size, pattern in _NAME_SIZE:
        if re.search(pattern, name):
            return bundled_config(version, size)
    return None


def config_from_weights(state_dict: dict) -> Optional[str]:
    """Bundled config matching a state dict's architecture, or None when it is not a known SAM 2."""
    patch = state_dict.get("image_encoder.trunk.patch_embed.proj.weight")
    if patch is None:
        return None
    blocks = {k.split(".")[3] for k in state_dict if k.startswith("image_encoder.trunk.blocks.")}
    size = _ARCH_SIZE.get((int(patch.shape[0]), len(blocks)))
    if size is None:
        return None
    return bundled_config("sam2.1" if "no_obj_embed_spatial" in state_dict else "sam2", size)


def load_state_dict(path) -> dict:
    """Read a SAM 2 checkpoint without unpickling code. Returns ``{name: tensor}``."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(path, "SAM2 checkpoint not found")
    try:
        if path.suffix.lower() == ".safetensors":
            from safetensors.torch import load_file
            sd = load_file(str(path))
        else:
            sd = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001  (pickle/zip/safetensors errors have many types)
        raise CheckpointError(path, f"cannot be read as a weights-only SAM2 checkpoint ({type(exc).__name__}: {exc}); "
                              f"expected an official file such as {OFFICIAL_NAMES[0]}") from exc
    if isinstance(sd, dict) and isinstance(sd.get("model"), dict):
        sd = sd["model"]
    if not isinstance(sd, dict) or not sd or not all(torch.is_tensor(v) for v in sd.values()):
        raise CheckpointError(path, "is not a SAM2 checkpoint (expected {'model': state_dict} or a state dict)")
    return sd


def resolve_config(config: Optional[str], state_dict: Optional[dict] = None, ckpt_name: str = "") -> Path:
    """Path of the model config YAML.

    ``config``: None/"auto" (from the weights, else the checkpoint name), a bundled name such as
    ``configs/sam2.1/sam2.1_hiera_t.yaml`` (``configs/`` optional) or a path to a ``.yaml`` file.
    """
    package_dir = Path(_sam2_package().__file__).parent
    if config in (None, "", "auto"):
        config = (config_from_weights(state_dict) if state_dict else None) or config_from_name(ckpt_name)
        if config is None:
            raise CheckpointError(ckpt_name or "SAM2 checkpoint",
                                  "cannot tell which SAM2 model this is (neither its weights nor its name match "
                                  f"{', '.join(OFFICIAL_NAMES)}): choose its config explicitly")
    if os.path.isfile(config):
        return Path(config)
    name = config if config.startswith("configs/") else f"configs/{config}"
    path = package_dir / name
    if not path.is_file():
        raise CheckpointError(config, "no such SAM2 config file or bundled config "
                              f"(bundled: {', '.join(bundled_configs())})")
    return path


def _targets(node) -> list:
    """Every hydra ``_target_`` in a config tree (dicts and lists)."""
    if isinstance(node, dict):
        found = [str(node["_target_"])] if "_target_" in node else []
        return found + [t for v in node.values() for t in _targets(v)]
    if isinstance(node, list):
        return [t for v in node for t in _targets(v)]
    return []


def build_video_predictor(config_path, state_dict: Optional[dict] = None, device="cpu",
                          image_size: Optional[int] = None, source: str = "SAM2 checkpoint"):
    """Instantiate ``SAM2VideoPredictor`` from a config YAML and load ``state_dict`` (random weights if None).

    ``image_size`` overrides the config's (1024); tests use 256. Small-hole filling is off (it needs
    SAM 2's CUDA extension; the composite dilates the mask anyway).
    """
    _sam2_package()
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(str(config_path))
    if "model" not in cfg:
        raise CheckpointError(config_path, "is not a SAM2 model config (it has no 'model' section)")
    model_over = {
        "_target_": "sam2.sam2_video_predictor.SAM2VideoPredictor",
        "sam_mask_decoder_extra_args": {"dynamic_multimask_via_stability": True,
                                        "dynamic_multimask_stability_delta": 0.05,
                                        "dynamic_multimask_stability_thresh": 0.98},
        "binarize_mask_from_pts_for_mem_enc": True,
        "fill_hole_area": 0,
    }
    if image_size:
        model_over["image_size"] = int(image_size)
    cfg = OmegaConf.merge(cfg, OmegaConf.create({"model": model_over}))
    OmegaConf.resolve(cfg)
    bad = sorted(t for t in _targets(OmegaConf.to_container(cfg.model)) if not t.startswith(_ALLOWED_TARGETS))
    if bad:  # a config names the classes hydra builds: only SAM 2's own, never arbitrary callables
        raise CheckpointError(config_path, f"is not a SAM2 model config: it builds {', '.join(bad[:3])} "
                              f"(only {', '.join(_ALLOWED_TARGETS)} classes are allowed)")
    model = instantiate(cfg.model, _recursive_=True)
    if state_dict is not None:
        result = model.load_state_dict(state_dict, strict=False)
        if result.missing_keys or result.unexpected_keys:
            raise CheckpointError(source, f"does not match the config {Path(config_path).name}: "
                                  f"{len(result.missing_keys)} missing weights (e.g. {result.missing_keys[:3]}), "
                                  f"{len(result.unexpected_keys)} unexpected (e.g. {result.unexpected_keys[:3]})")
    return model.to(device).eval()


def load_video_predictor(ckpt_path, config: Optional[str] = "auto", device="cpu", image_size: Optional[int] = None):
    """Checkpoint file (+ config or "auto") -> ready ``SAM2VideoPredictor`` on ``device``."""
    _sam2_package()  # the missing package is reported before any file is read
    sd = load_state_dict(ckpt_path)
    cfg = resolve_config(config, sd, str(ckpt_path))
    return build_video_predictor(cfg, sd, device=device, image_size=image_size, source=str(ckpt_path))


def rgb_view(frames: torch.Tensor, what: str = "frames") -> torch.Tensor:
    """[F,H,W,C] with C in 1/3/4 -> [F,H,W,3] view (grey expanded, alpha dropped), no copy."""
    if frames.dim() != 4 or frames.shape[-1] not in (1, 3, 4):
        raise InputError(f"{what}: expected an IMAGE batch [frames, height, width, 1/3/4 channels], "
                         f"got shape {tuple(frames.shape)}")
    if frames.shape[-1] == 1:
        return frames.expand(-1, -1, -1, 3)
    return frames[..., :3]


def frame_tensor(frames, index: int) -> torch.Tensor:
    """Frame ``index`` of a frame sequence as float32 [H, W, 3] in [0, 1] (uint8 frames divided by 255, as
    ComfyUI's video loader does; grey expanded, alpha dropped)."""
    frame = frames[index:index + 1]
    frame = torch.from_numpy(np.ascontiguousarray(frame)) if isinstance(frame, np.ndarray) else frame
    frame = frame.float() / 255.0 if frame.dtype == torch.uint8 else frame.float()
    if frame.dim() == 3:  # [1, H, W]: a mask-like grey frame
        frame = frame[..., None]
    return rgb_view(frame, "frames")[0]


class _InMemoryFrames:
    """What SAM 2's ``init_state`` expects from its frame loader: ``frames[i]`` -> [3,S,S] normalised.

    Frames are read and resized on access (bilinear, antialiased, like SAM 2's own square resize).
    """

    def __init__(self, frames, size: int):
        self.frames = frames
        self.size = int(size)
        self.mean = torch.tensor(_IMG_MEAN).view(3, 1, 1)
        self.std = torch.tensor(_IMG_STD).view(3, 1, 1)

    def __len__(self) -> int:
        return len(self.frames)

    def __getitem__(self, index: int) -> torch.Tensor:
        img = frame_tensor(self.frames, index).permute(2, 0, 1)[None]
        img = F.interpolate(img, size=(self.size, self.size), mode="bilinear", align_corners=False, antialias=True)
        return (img[0].clamp(0, 1).cpu() - self.mean) / self.std


@contextlib.contextmanager
def _frames_from_memory(module, frames, height: int, width: int):
    """Make the predictor's ``init_state`` take frames from ``frames`` instead of a path."""
    original = module.load_video_frames

    def load(video_path, image_size, **_kwargs):
        return _InMemoryFrames(frames, image_size), int(height), int(width)

    with _PATCH_LOCK:
        module.load_video_frames = load
        try:
            yield
        finally:
            module.load_video_frames = original


def mask_frame(masks, index: int) -> torch.Tensor:
    """Frame ``index`` of a mask sequence as float32 [H, W] in [0, 1]: a MASK tensor [F, H, W], uint8 masks
    [F, H, W] in {0, 255}, or mask frames [F, H, W, C] (the first channel, e.g. a mask video)."""
    m = masks[index:index + 1]
    m = torch.from_numpy(np.ascontiguousarray(m)) if isinstance(m, np.ndarray) else m
    m = m.float() / 255.0 if m.dtype == torch.uint8 else m.float()
    return (m[..., 0] if m.dim() == 4 else m)[0]


def prompt_frame_indices(face_mask, count: int) -> list:
    """The first ``count`` frames whose face mask (a mask sequence, :func:`mask_frame`) is not empty (>= 0.5
    somewhere)."""
    found = []
    for i in range(len(face_mask)):
        if bool((mask_frame(face_mask, i) >= 0.5).any()):
            found.append(i)
            if len(found) >= count:
                break
    if not found:
        raise InputError("face_mask is empty on every frame: there is no face to prompt SAM2 with")
    return found


def _drop_old_memory(predictor, state: dict, frame_idx: int) -> None:
    """Forget non-conditioning outputs SAM 2 will not read again (it looks back a fixed window)."""
    keep = max(predictor.num_maskmem * max(1, predictor.memory_temporal_stride_for_eval),
               predictor.max_obj_ptrs_in_encoder) + 2
    for out in state["output_dict_per_obj"].values():
        store = out["non_cond_frame_outputs"]
        for t in [t for t in store if abs(t - frame_idx) > keep]:
            del store[t]


def track_head_iter(predictor, frames, face_mask, prompt_frames: int = 4,
                    progress: Optional[Callable[[str, int, int], None]] = None,
                    cancel: Optional[Callable[[], bool]] = None) -> Iterator[Tuple[int, torch.Tensor]]:
    """Segment the head through the clip, handing each frame's mask over as SAM 2 finds it.

    frames: a frame sequence [F, H, W, C] (float 0..1 or uint8, C 1/3/4); face_mask: a mask sequence
    (:func:`mask_frame`; >= 0.5 = face). Yields ``(frame index, bool mask [H, W] on the CPU)``: SAM 2's
    object mask (logit > 0), from the first prompted frame to the end, then (when the face first shows
    later than frame 0) from there back to frame 0.
    """
    module = _sam2_package()
    n = len(frames)
    h, w = frame_tensor(frames, 0).shape[:2]
    prompts = prompt_frame_indices(face_mask, max(1, int(prompt_frames)))
    device = predictor.device

    def modes():  # entered around each step only: the caller's code between masks runs in its own modes
        autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda"
                    else contextlib.nullcontext())
        stack = contextlib.ExitStack()
        stack.enter_context(torch.inference_mode())
        stack.enter_context(autocast)
        return stack

    done = set()
    with modes(), _frames_from_memory(module, frames, h, w):
        state = predictor.init_state(video_path="<in-memory frames>", offload_video_to_cpu=True,
                                     offload_state_to_cpu=False)
    try:
        with modes():
            for i in prompts:
                predictor.add_new_mask(state, frame_idx=i, obj_id=1, mask=mask_frame(face_mask, i) >= 0.5)
        for reverse in [False] + ([True] if prompts[0] > 0 else []):
            steps = predictor.propagate_in_video(state, start_frame_idx=prompts[0], reverse=reverse)
            while True:
                with modes():
                    step = next(steps, None)
                    if step is None:
                        break
                    idx, _ids, masks = step
                    done.add(idx)
                    _drop_old_memory(predictor, state, idx)
                    mask = (masks[0, 0] > 0).cpu()
                yield idx, mask.clone()  # cloned outside inference mode: an ordinary tensor
                if progress is not None:
                    progress("segment", len(done), n)
                if cancel is not None and cancel():
                    raise Cancelled("SAM2 segmentation cancelled")
    finally:
        predictor.reset_state(state)
        state.clear()


def track_head(predictor, frames, face_mask, prompt_frames: int = 4,
               progress: Optional[Callable[[str, int, int], None]] = None,
               cancel: Optional[Callable[[], bool]] = None) -> torch.Tensor:
    """:func:`track_head_iter` collected: a bool mask [F, H, W] on the CPU (a whole clip of masks)."""
    result = None
    for idx, mask in track_head_iter(predictor, frames, face_mask, prompt_frames, progress, cancel):
        if result is None:
            result = torch.zeros((len(frames), *mask.shape), dtype=torch.bool)
        result[idx] = mask
    return result


def head_masks(ckpt_or_predictor, frames: torch.Tensor, face_mask: torch.Tensor, prompt_frames: int = 4,
               config: Optional[str] = "auto", device="cpu", image_size: Optional[int] = None,
               progress=None, cancel=None) -> torch.Tensor:
    """Convenience: load (if given a path) and run :func:`track_head`. Returns bool [F,H,W]."""
    predictor = ckpt_or_predictor
    if isinstance(ckpt_or_predictor, (str, os.PathLike)):
        predictor = load_video_predictor(ckpt_or_predictor, config, device=device, image_size=image_size)
    return track_head(predictor, frames, face_mask, prompt_frames, progress=progress, cancel=cancel)


__all__ = ("OFFICIAL_NAMES", "bundled_configs", "config_from_name", "config_from_weights", "load_state_dict",
           "resolve_config", "build_video_predictor", "load_video_predictor", "rgb_view", "prompt_frame_indices",
           "track_head", "track_head_iter", "frame_tensor", "mask_frame", "head_masks")
