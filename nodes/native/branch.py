"""DreamID-V inside ComfyUI's own Wan model: the pose branch and the released conditioning conventions,
added to a clone of a core MODEL through ModelPatcher patches and wrappers (core's model is neither copied nor
changed).

ComfyUI loads a DreamID-V checkpoint as a Wan2.1 model (reference tokens included) and drops the pose tensors;
:func:`patch_model` gives a clone of that MODEL:

* the pose branch (:class:`~dreamidv_core.models.pose_branch.PoseBranch`: PoseGuider, every block's pose
  layers, the ArcFace ID-token projection when present), read from the same checkpoint file, as an additional
  model of the clone: ComfyUI's memory manager loads, accounts and frees it with the Wan model;
* a ``("dit", "double_block", i)`` replace per block that adds ``gate * Attn(q, K_pose, V_pose)`` (and the ID
  tokens' attention, query before RoPE) to the block's self-attention, through an
  ``optimized_attention_override`` that the replace installs for the block's first attention call (its
  self-attention) only; another replace already on the block is called inside it, another override chained;
* a DIFFUSION_MODEL wrapper: the reference's integer timesteps (``floor(1000 sigma)``) and the per-evaluation
  state the replaces read (which pose tokens, which ID embedding rows);
* an APPLY_MODEL wrapper that slices the conditioning latent (``c_concat``) to ComfyUI's context window
  (0.3.75 windows the noise but not a 5-D ``c_concat``);
* a SAMPLER_SAMPLE wrapper that computes the clip's PoseGuider tokens once the models are loaded, outside the
  diffusion model (which TorchCompileModel may compile), and an OUTER_SAMPLE wrapper that frees what a sampling
  run computed once: those tokens and, per window, every block's pose K/V (kept while they fit a share of the
  device's free memory, the rule the pack's own sampler uses).

The pose video and the ArcFace embedding ride in the conditioning (``model_conds``), see :mod:`.conditioning`.
"""
from __future__ import annotations

import logging
from types import SimpleNamespace
from typing import Dict, List, Optional, Tuple

import torch

import comfy.model_management as mm
import comfy.model_patcher
import comfy.model_sampling
import comfy.ops
import comfy.patcher_extension
import comfy.utils
from comfy.ldm.flux.math import apply_rope1

from dreamidv_core.errors import CheckpointError, InputError
from dreamidv_core.models.pose_branch import PoseBranch, add_gated, pose_sequence
from dreamidv_core.pipelines.clip_stream import FrameSource, clip_pose_tokens
from dreamidv_core.sampling.windows import CacheBudget

log = logging.getLogger(__name__)

KEY = "dreamidv"  # wrapper key and transformer_options key of the per-evaluation state
POSE_COND = "dreamidv_pose"  # model_conds: the clip's PoseSource (CONDConstant, the same object in both conds)
ID_COND = "dreamidv_id_embedding"  # model_conds: ArcFace embedding row [1, E] (zeros in the negative)
CACHE_FRACTION = 0.25  # share of the device's free memory the per-window pose K/V may take


class ComfyOps:
    """The layer constructors of :class:`PoseBranch` from ComfyUI's ``comfy.ops.manual_cast``: they compute in
    the input's dtype on the input's device, so the memory manager may load them partly (LoRA patches and
    weight casting as for core's layers)."""

    Linear = comfy.ops.manual_cast.Linear
    Conv1d = comfy.ops.manual_cast.Conv1d
    Conv2d = comfy.ops.manual_cast.Conv2d

    @staticmethod
    def RMSNorm(dim, eps):  # noqa: N802 - a constructor
        return comfy.ops.manual_cast.RMSNorm(dim, eps=eps, elementwise_affine=True)

    @staticmethod
    def LayerNorm(dim, eps, affine=False):  # noqa: N802
        return comfy.ops.manual_cast.LayerNorm(dim, eps=eps, elementwise_affine=affine)


class PoseSource:
    """The pose video of one clip as the conditioning node leaves it (frames [N, H, W, 3] and the clip's
    :class:`~dreamidv_core.pipelines.plan.ClipPlan`); the sampling model computes its PoseGuider tokens once per
    run. Compared by identity: both conditionings hold the same object, so ComfyUI batches them."""

    def __init__(self, frames, plan):
        self.frames, self.plan = frames, plan

    @property
    def latent_frames(self) -> int:
        return self.plan.layout.latent_frames


class FlowShift(comfy.model_sampling.ModelSamplingDiscreteFlow, comfy.model_sampling.CONST):
    """Rectified-flow sampling with a shift (what core's ModelSamplingSD3 node sets; DreamID-V: 5)."""


def unrope(q: torch.Tensor, pe: torch.Tensor, heads: int) -> torch.Tensor:
    """Undo core's RoPE: q [B, L, N*D] rotated by ``pe`` -> the query before RoPE (rotations are orthogonal)."""
    b, length, c = q.shape
    return apply_rope1(q.view(b, length, heads, c // heads), pe.transpose(-1, -2)).view(b, length, c)


class _WindowKV:
    """One window's pose sequence and (as the blocks run) every block's pose K/V [1, L, N*D]."""

    def __init__(self, sequence: torch.Tensor, layers: int, keep: bool):
        self.sequence, self.keep = sequence, keep
        self.kv: List[Optional[Tuple[torch.Tensor, torch.Tensor]]] = [None] * layers


class BranchRuntime:
    """The pose branch of one patched MODEL and what a sampling run computes with it once."""

    def __init__(self, branch: PoseBranch, name: str):
        self.branch, self.name = branch, name
        self.cfg = branch.cfg
        self.has_pose = branch.has_pose
        self.id_active = branch.id_projection_active
        self.end()

    def __deepcopy__(self, memo):  # ModelPatcher.clone deep-copies model_options: share, never copy weights
        return self

    def end(self) -> None:
        """Forget the run's tokens and K/V (end of a sampling run)."""
        self.tokens: Dict[int, Tuple[PoseSource, torch.Tensor]] = {}
        self.windows: Dict[tuple, _WindowKV] = {}
        self.id_cache: Optional[Tuple[torch.Tensor, list]] = None
        self.budget: Optional[CacheBudget] = None

    # ---------------------------------------------------------------- once per run
    def pose_tokens(self, source: PoseSource, dtype: torch.dtype, device) -> torch.Tensor:
        """The clip's PoseGuider tokens [F', hw, C] (CPU, ``dtype``), computed once per run window piece by piece."""
        hit = self.tokens.get(id(source))
        if hit is not None:
            return hit[1]
        guider = SimpleNamespace(pose_tokens=lambda video: self.branch.pose_tokens(video.to(device), dtype))
        plan = source.plan
        tokens = clip_pose_tokens(guider, FrameSource(source.frames, plan, "pose video"))
        tokens = tokens.reshape(plan.layout.latent_frames, -1, tokens.shape[-1])
        self.tokens[id(source)] = (source, tokens)
        return tokens

    def window(self, source: PoseSource, frames: Tuple[int, ...], length: int, dtype: torch.dtype,
               device) -> _WindowKV:
        """The pose sequence of latent ``frames`` of the clip (zeros in front for ``length`` - video tokens
        reference tokens) and its per-block K/V store; kept for the run while it fits the cache budget."""
        key = (id(source), frames, length, dtype, str(device))
        hit = self.windows.get(key)
        if hit is not None:
            return hit
        tokens = self.pose_tokens(source, dtype, device)[list(frames)]
        tokens = tokens.reshape(1, -1, tokens.shape[-1])
        sequence = pose_sequence(tokens, length - tokens.shape[1]).to(device, dtype)
        if self.budget is None:
            self.budget = CacheBudget(int(CACHE_FRACTION * mm.get_free_memory(device)))
        kv_bytes = 2 * sequence.numel() * sequence.element_size() * len(self.branch.blocks)
        entry = _WindowKV(sequence, len(self.branch.blocks), self.budget.reserve(kv_bytes))
        if entry.keep:
            self.windows[key] = entry
        return entry

    def block_kv(self, entry: _WindowKV, i: int, pe: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Block ``i``'s pose K/V [1, L, N*D] (the RoPE of the whole sequence, ``pe``), from the window's store."""
        kv = entry.kv[i]
        if kv is None:
            k, v = self.branch.pose_kv(i, entry.sequence, lambda t: apply_rope1(t, pe))
            kv = (k.flatten(2), v.flatten(2))
            if entry.keep:
                entry.kv[i] = kv
                if all(x is not None for x in entry.kv):
                    entry.sequence = None  # every block's K/V are kept: the sequence is not needed any more
        return kv

    def id_kv(self, embedding: torch.Tensor) -> list:
        """Every block's ID K/V [B, T, N*D] float32 for embedding rows [B, E] (cached per run by value)."""
        emb = embedding.detach().float()
        if self.id_cache is not None and self.id_cache[0].shape == emb.shape and torch.equal(self.id_cache[0], emb):
            return self.id_cache[1]
        kv = [(k.flatten(2), v.flatten(2)) for k, v in self.branch.id_kv(emb, torch.float32, emb.device)]
        self.id_cache = (emb, kv)
        return kv


class EvalState:
    """What one evaluation's block replaces need: which latent frames of which clip (the window's pose K/V
    store is looked up when the first block sees the sequence length) and the ID embedding rows."""

    def __init__(self, runtime: BranchRuntime, source: Optional[PoseSource], frames: Tuple[int, ...],
                 embedding: Optional[torch.Tensor]):
        self.runtime, self.source, self.frames, self.embedding = runtime, source, frames, embedding
        self.window_kv: Optional[_WindowKV] = None

    def attention_override(self, i: int, pe: torch.Tensor, previous):
        """An ``optimized_attention_override`` adding block ``i``'s pose (and ID) terms to the block's first
        attention call, its self-attention; ``previous`` (another override) is chained."""
        done = [False]

        def override(func, *args, **kwargs):
            out = previous(func, *args, **kwargs) if previous is not None else func(*args, **kwargs)
            if done[0]:
                return out
            done[0] = True
            q, k = args[0], args[1]
            heads = kwargs.get("heads", args[3] if len(args) > 3 else None)
            if q.dim() != 3 or q.shape[1] != k.shape[1]:
                raise RuntimeError(f"DreamID-V: block {i}'s first attention is not its self-attention (query "
                                   f"{tuple(q.shape)}, key {tuple(k.shape)}); this ComfyUI's Wan blocks differ from "
                                   "the ones the pose branch was written for")
            rest = {name: value for name, value in kwargs.items() if name != "heads"}
            return self.add_terms(i, out, q, pe, heads, lambda qq, kk, vv: func(qq, kk, vv, heads=heads, **rest))

        return override

    def add_terms(self, i, out, q, pe, heads, attend):
        rt, b = self.runtime, q.shape[0]
        res = out
        if self.source is not None:
            if self.window_kv is None:
                self.window_kv = rt.window(self.source, self.frames, q.shape[1], q.dtype, q.device)
            kp, vp = rt.block_kv(self.window_kv, i, pe)
            gate = mm.cast_to(rt.branch.pose_gate(i), torch.float32, q.device)
            res = add_gated(res, gate, attend(q, kp.to(q.dtype).expand(b, -1, -1), vp.to(q.dtype).expand(b, -1, -1)))
        if self.embedding is not None:
            kid, vid = rt.id_kv(self.embedding)[i]
            gate = mm.cast_to(rt.branch.id_projection.blocks[i].gate, torch.float32, q.device)
            res = add_gated(res, gate, attend(unrope(q, pe, heads), kid.to(q.dtype), vid.to(q.dtype)))
        return res.to(out.dtype)


class PoseBlockPatch:
    """``("dit", "double_block", i)`` replace: runs the block (or the replace that was there) with an attention
    override that adds the block's pose / ID terms to its self-attention."""

    def __init__(self, index: int, previous=None):
        self.index, self.previous = index, previous

    def __deepcopy__(self, memo):
        return self

    def __call__(self, args, extra):
        options = args["transformer_options"]
        state = options.get(KEY)
        run = self.previous if self.previous is not None else (lambda a, e: e["original_block"](a))
        if state is None:
            return run(args, extra)
        override = state.attention_override(self.index, args["pe"], options.get("optimized_attention_override"))
        return run({**args, "transformer_options": {**options, "optimized_attention_override": override}}, extra)


class Wrappers:
    """The wrappers a patched MODEL carries (one object per patch; see the module docstring)."""

    def __init__(self, runtime: Optional[BranchRuntime], has_reference: bool, model_name: str):
        self.runtime, self.has_reference, self.model_name = runtime, has_reference, model_name

    def __deepcopy__(self, memo):
        return self

    def outer_sample(self, executor, *args, **kwargs):
        try:
            return executor(*args, **kwargs)
        finally:
            if self.runtime is not None:
                self.runtime.end()

    def sampler_sample(self, executor, guider, *args, **kwargs):
        """The models are loaded: compute the clips' PoseGuider tokens now, once, outside the diffusion model
        (which TorchCompileModel may compile)."""
        rt = self.runtime
        if rt is not None and rt.has_pose:
            model = guider.model_patcher.model
            dtype = model.manual_cast_dtype or model.get_dtype()
            for conds in guider.conds.values():
                for cond in conds:
                    source = cond.get("model_conds", {}).get(POSE_COND)
                    if source is not None:
                        rt.pose_tokens(source.cond, dtype, guider.model_patcher.load_device)
        return executor(guider, *args, **kwargs)

    @staticmethod
    def apply_model(executor, x, t, c_concat=None, c_crossattn=None, control=None, transformer_options={},
                    **kwargs):
        window = transformer_options.get("context_window")
        if window is not None and c_concat is not None and c_concat.shape[2] != x.shape[2]:
            c_concat = c_concat[:, :, list(window.index_list)]
        return executor(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)

    def diffusion_model(self, executor, x, timestep, context, clip_fea=None, time_dim_concat=None,
                        transformer_options={}, **kwargs):
        source = kwargs.pop(POSE_COND, None)
        embedding = kwargs.pop(ID_COND, None)
        if self.has_reference and "reference_latent" not in kwargs:
            raise InputError(f"{self.model_name} is DreamID-V: its conditioning needs the reference latent (and the "
                             "zeroed one in the negative); build positive and negative with DreamID-V Conditioning")
        timestep = torch.floor(timestep)  # the reference feeds integer timesteps trunc(1000 sigma)
        rt = self.runtime
        if rt is not None:
            state = self._state(rt, x, source, embedding, transformer_options)
            transformer_options = {**transformer_options, KEY: state}
        return executor(x, timestep, context, clip_fea, time_dim_concat, transformer_options, **kwargs)

    def _state(self, rt: BranchRuntime, x, source, embedding, options) -> EvalState:
        t, h, w = x.shape[2:]
        frames = ()
        if rt.has_pose:
            if source is None:
                raise InputError(f"{self.model_name} is the full DreamID-V model and needs the pose video: connect "
                                 "pose_video on DreamID-V Conditioning (or load dreamidv_faster)")
            frames = self._frames(options, t, source)
            plan = source.plan
            if plan.tokens_per_latent_frame != (h // 2) * (w // 2):
                raise InputError(f"the pose video was prepared for {plan.size[1]}x{plan.size[0]} frames; the latent "
                                 f"is {w * 8}x{h * 8}: build pose and latent with the same DreamID-V Conditioning")
        else:
            source = None
        if rt.id_active:
            if embedding is None:
                raise InputError(f"{self.model_name} has a trained ArcFace ID-token projection: connect the DreamID-V "
                                 "identity (with a detected face) to DreamID-V Conditioning")
        else:
            embedding = None
        return EvalState(rt, source, frames, embedding)

    @staticmethod
    def _frames(options, t: int, source: PoseSource) -> Tuple[int, ...]:
        window = options.get("context_window")
        frames = tuple(window.index_list) if window is not None else tuple(range(t))
        if len(frames) != t or max(frames) >= source.latent_frames:
            raise InputError(f"the latent has {t if window is None else 'a window of ' + str(t)} frames, the pose "
                             f"video {source.latent_frames} latent frames: use the latent of the DreamID-V "
                             "Conditioning node that got this pose video")
        return frames


# ------------------------------------------------------------------------------------------------ patching

def _base_weight(model, key: str) -> torch.Tensor:
    """A weight of a MODEL as loaded (a LoRA-patched weight's backup when it is patched now)."""
    backup = model.backup.get(key)
    return backup.weight if backup is not None else comfy.utils.get_attr(model.model, key)


def check_same_checkpoint(model, cfg, reference: torch.Tensor, path) -> None:
    """Raise a CheckpointError naming ``path`` unless the core MODEL has the sizes of ``cfg`` and its
    ``blocks.0.modulation`` equals the file's (``reference``): the pose branch must come from the same file."""
    dm = model.get_model_object("diffusion_model")
    if not (hasattr(dm, "blocks") and hasattr(dm, "rope_encode") and hasattr(dm, "patch_embedding")):
        raise InputError(f"model: expected a Wan 2.1 model loaded by Load Diffusion Model, got {type(dm).__name__}")
    have = (dm.dim, len(dm.blocks), dm.num_heads, getattr(dm, "ref_conv", None) is not None)
    want = (cfg.dim, cfg.num_layers, cfg.num_heads, cfg.has_ref)
    if have != want:
        raise CheckpointError(path, f"is a DreamID-V {cfg.variant} checkpoint of width {cfg.dim}, {cfg.num_layers} "
                                    f"blocks, {cfg.num_heads} heads; the model is width {have[0]}, {have[1]} blocks, "
                                    f"{have[2]} heads{'' if have[3] else ', without reference tokens'}: choose the "
                                    "file the Load Diffusion Model node loaded")
    mine = _base_weight(model, "diffusion_model.blocks.0.modulation").float().cpu()
    if mine.shape != reference.shape or not torch.allclose(mine, reference.float(), rtol=1e-2, atol=1e-3):
        raise CheckpointError(path, "is not the checkpoint this model was loaded from (its weights differ): choose "
                                    "the file the Load Diffusion Model node loaded")


def patch_model(model, branch: Optional[PoseBranch], branch_patcher, name: str, shift: float):
    """A clone of the core Wan MODEL with DreamID-V's pose branch (``branch``, under ``branch_patcher``; None for
    a checkpoint without pose branch and ID projection), wrappers and flow shift (module docstring)."""
    wrappers_mp = comfy.patcher_extension.WrappersMP
    if model.get_wrappers(wrappers_mp.DIFFUSION_MODEL, KEY):
        raise InputError("model: DreamID-V is already applied to this model (use one DreamID-V Apply node)")
    m = model.clone()
    dm = m.get_model_object("diffusion_model")
    runtime = None
    if branch is not None and (branch.has_pose or branch.id_projection_active):
        runtime = BranchRuntime(branch, name)
        m.set_additional_models(KEY, [branch_patcher])
        replaces = m.model_options["transformer_options"].get("patches_replace", {}).get("dit", {})
        for i in range(len(dm.blocks)):
            m.set_model_patch_replace(PoseBlockPatch(i, replaces.get(("double_block", i))), "dit", "double_block", i)
    wrappers = Wrappers(runtime, getattr(dm, "ref_conv", None) is not None, name)
    m.add_wrapper_with_key(wrappers_mp.OUTER_SAMPLE, KEY, wrappers.outer_sample)
    m.add_wrapper_with_key(wrappers_mp.SAMPLER_SAMPLE, KEY, wrappers.sampler_sample)
    m.add_wrapper_with_key(wrappers_mp.APPLY_MODEL, KEY, wrappers.apply_model)
    m.add_wrapper_with_key(wrappers_mp.DIFFUSION_MODEL, KEY, wrappers.diffusion_model)
    sampling = FlowShift(m.model.model_config)
    sampling.set_parameters(shift=float(shift), multiplier=1000)
    m.add_object_patch("model_sampling", sampling)
    return m


def branch_patcher_for(branch: PoseBranch, model):
    """The ModelPatcher of a pose branch, on the MODEL's load and offload devices."""
    return comfy.model_patcher.ModelPatcher(branch, load_device=model.load_device, offload_device=model.offload_device)
