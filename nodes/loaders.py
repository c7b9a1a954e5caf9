"""DreamID-V nodes: the DiT loader and the text context.

* ``DreamIDVModelLoader``: a DreamID-V checkpoint from ``diffusion_models`` -> DREAMIDV_MODEL, a
  :class:`LoadedDiT` wrapping the :class:`~dreamidv_core.models.dit.DreamIDVTransformer` in a
  :class:`DiTPatcher` (ComfyUI's ``ModelPatcher``) so that ComfyUI's memory manager moves it to the GPU for a
  run, accounts what is on the device (with block offload too) and frees it when another model needs the
  memory. A file is read once while anything holds the model (same file, dtype, attention, device, ID
  projection -> the same weights); ``offload_blocks`` and the LoRA are settings of a clone of it: a LoRA is a
  ModelPatcher weight patch (any common Wan LoRA format, :mod:`dreamidv_core.weights.lora`), so changing its
  strength reloads nothing and fp8 weights are never merged into. An ArcFace ID-token projection
  (``id_projection.*`` tensors: the ``model.safetensors`` of an ``id_projection`` training run) is added on
  top of the released weights.
* ``DreamIDVTextContext``: the umT5 context of the fixed prompt "chang face" as CONDITIONING, computed
  once per encoder file and cached on disk, or read from a precomputed context file.
"""
from __future__ import annotations

import collections
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple, Optional

import torch

import comfy.lora
import comfy.model_management as mm
import comfy.model_patcher
import comfy.utils
import folder_paths
from comfy_api.latest import io

from dreamidv_core.models.attention import BACKENDS
from dreamidv_core.weights.checkpoints import SWAP_VARIANTS, WEIGHT_DTYPES, load_dit
from dreamidv_core.sampling.offload import BlockOffload, disable_block_offload, offload_memory
from dreamidv_core.errors import CheckpointError, InputError
from dreamidv_core.io.state_dict import read_state_dict
from dreamidv_core.weights.id_projection import apply_id_projection_file, is_id_projection_file
from dreamidv_core.weights.lora import lora_layers
from dreamidv_core.weights.model_files import get_entry
from dreamidv_core.pipelines.text_context import DEFAULT_PROMPT, TEXT_DIM, get_text_context, load_precomputed_context

from . import common

log = logging.getLogger(__name__)

DIT_FOLDER = "diffusion_models"
LORA_FOLDER = "loras"
TEXT_FOLDER = "text_encoders"
CONTEXT_FOLDER = "dreamidv"
DEVICE_CHOICES = ("auto", "auto_offload", "cpu")
NONE = "none"
AUTO = "auto"  # the text encoder: the first umT5-XXL file of the catalogue found in text_encoders
TOKENIZER_DIRS = ("google/umt5-xxl", "umt5-xxl", "umt5_xxl", "google_umt5-xxl")


def expected_dit_names() -> str:
    names = get_entry("dit").accepted_names + get_entry("dit_faster").accepted_names
    return "one of " + ", ".join(names)


def expected_text_encoder_names() -> str:
    return "one of " + ", ".join(get_entry("text_encoder").accepted_names)


def file_problem(folder: str, name: str, expected: str) -> str:
    """'' when the combo choice resolves to a file, else the error message (for ``validate_inputs``)."""
    try:
        common.resolve_model_file(folder, name, expected)
        return ""
    except CheckpointError as exc:
        return str(exc)


# ------------------------------------------------------------------------------------------------ model

FP8 = (torch.float8_e4m3fn, torch.float8_e5m2)
_Backup = collections.namedtuple("Dimension", ["weight", "inplace_update"])  # ModelPatcher's backup record


class DiTPatcher(comfy.model_patcher.ModelPatcher):
    """ComfyUI ``ModelPatcher`` of the pack's :class:`DreamIDVTransformer`, fully accounted by ComfyUI's memory
    manager.

    The pack's layers are not ComfyUI ``ops``: the model runs with every weight on the device, or with its last
    blocks in host memory streamed in block by block (:mod:`dreamidv_core.sampling.offload`). :meth:`load`
    offloads ``offload_blocks`` blocks, or more when the manager's budget asks for it; ``loaded_size()`` is what
    is on the device (staging slots included); :meth:`partially_unload` frees memory by offloading more blocks;
    unloading (``free_memory``, ``unload_all_models``) brings everything back to the offload device. LoRA
    patches are computed where each weight lives; a patched fp8 weight is kept in the compute dtype instead of
    being rounded back to fp8 (the fp8 original stays in the backup).
    """

    offload_blocks = 0

    def clone(self):
        n = super().clone()
        n.offload_blocks = self.offload_blocks
        return n

    def _blocks_to_offload(self, budget: float) -> int:
        """The user's offload count, raised until the device weights fit ``budget`` bytes (0: no limit)."""
        dit, n = self.model, self.offload_blocks
        if budget <= 0:
            return n
        while n < len(dit.blocks) and offload_memory(dit, n).device_weights > budget:
            n += 1
        return n

    def load(self, device_to=None, lowvram_model_memory=0, force_patch_weights=False, full_load=False):
        n = self._blocks_to_offload(0 if full_load else lowvram_model_memory)
        dit = self.model
        dit.dreamidv_offload_request = self.offload_blocks
        if n == 0:
            disable_block_offload(dit, device_to)  # a clone that streamed blocks was loaded before
            return super().load(device_to, 0, force_patch_weights, full_load=True)
        with self.use_ejected():
            disable_block_offload(dit, self.offload_device)
            offloaded = {f"blocks.{b}." for b in range(len(dit.blocks) - n, len(dit.blocks))}
            for key in list(self.patches):
                if key not in self.backup:  # patched where the weight will live: host for offloaded blocks
                    host = any(key.startswith(p) for p in offloaded)
                    self.patch_weight_to_device(key, device_to=None if host else device_to)
            dit.block_offload = BlockOffload(dit, n, device_to, self.offload_device)
            self._loaded(device_to, n)
        if n > self.offload_blocks:
            log.info("DreamID-V: %d of %d blocks streamed from host memory to fit the device", n, len(dit.blocks))

    def _loaded(self, device_to, n: int) -> None:
        model = self.model
        model.device = device_to
        model.model_loaded_weight_memory = offload_memory(model, n).device_weights
        model.model_lowvram = False
        model.current_weight_patches_uuid = self.patches_uuid

    def partially_load(self, device_to, extra_memory=0, force_patch_weights=False):
        if getattr(self.model, "dreamidv_offload_request", self.offload_blocks) != self.offload_blocks:
            self.model.model_lowvram = True  # the shared model streams what another clone asked for: plan again
        return super().partially_load(device_to, extra_memory, force_patch_weights)

    def partially_unload(self, device_to, memory_to_free=0, force_patch_weights=False):
        """Free at least ``memory_to_free`` bytes of the device by streaming more blocks; 0 if that cannot
        (ComfyUI then unloads the whole model)."""
        dit = self.model
        off = getattr(dit, "block_offload", None)
        if self.model.model_loaded_weight_memory <= 0:
            return 0
        now = 0 if off is None else len(off.indices)
        loaded = self.model.model_loaded_weight_memory
        for n in range(now + 1, len(dit.blocks) + 1):
            freed = loaded - offload_memory(dit, n).device_weights
            if freed >= memory_to_free:
                device = off.device if off is not None else self.load_device
                with self.use_ejected():
                    disable_block_offload(dit, self.offload_device)
                    dit.block_offload = BlockOffload(dit, n, device, self.offload_device)
                    self._loaded(device, n)
                self.model.model_lowvram = True  # the next load may bring the blocks back
                return freed
        return 0

    def unpatch_model(self, device_to=None, unpatch_weights=True):
        if unpatch_weights:
            disable_block_offload(self.model, device_to or self.offload_device)
        return super().unpatch_model(device_to, unpatch_weights)

    def patch_weight_to_device(self, key, device_to=None, inplace_update=False):
        weight = comfy.utils.get_attr(self.model, key)
        if key not in self.patches or weight.dtype not in FP8:
            return super().patch_weight_to_device(key, device_to, inplace_update)
        if key not in self.backup:
            self.backup[key] = _Backup(weight, False)
        temp = mm.cast_to_device(weight, device_to or weight.device, torch.float32, copy=True)
        out = comfy.lora.calculate_weight(self.patches[key], temp, key)
        comfy.utils.set_attr_param(self.model, key, out.to(self.model.compute_dtype))


@dataclass(eq=False)
class LoadedDiT:
    """DREAMIDV_MODEL: a DreamID-V DiT under ComfyUI's memory management.

    ``patcher.model`` is the :class:`DreamIDVTransformer` (a :class:`DiTPatcher` from the loader; any
    ModelPatcher from other nodes); ``key`` identifies file and options (pose tokens record it);
    ``offload_after`` moves the weights back to the CPU after every run.
    """

    patcher: object
    name: str
    path: str
    key: str
    offload_after: bool = False
    offload_blocks: int = 0  # blocks kept in CPU RAM and streamed in (dreamidv_core.sampling.offload)

    @property
    def dit(self):
        return self.patcher.model

    @property
    def variant(self) -> str:
        return self.dit.cfg.variant

    @property
    def device(self) -> torch.device:
        return self.dit.patch_embedding.weight.device

    def load(self, memory_required: int = 0) -> None:
        """Put the model on its load device through ComfyUI's model manager (it frees other models as needed
        and accounts what this one keeps on the device). A :class:`DiTPatcher` may stream its last blocks
        (``offload_blocks``, or when the memory does not suffice); any other patcher loads fully."""
        mm.load_models_gpu([self.patcher], memory_required=int(memory_required),
                           force_full_load=not isinstance(self.patcher, DiTPatcher))

    def release(self) -> None:
        """After a run: with ``offload_after`` the model leaves the GPU now; otherwise it stays loaded (and
        accounted) until ComfyUI needs the memory."""
        if not self.offload_after or mm.is_device_cpu(self.patcher.load_device):
            return
        unload_patcher(self.patcher)


def patched_weights(patcher) -> dict:
    """{key: weight} that make a copy of ``patcher.model`` hold exactly ``patcher``'s weights (its LoRA merged in),
    whatever clone's patches are applied to the shared model now: every weight some clone patched (back to its
    original) and every weight this one patches (original + its patches, in the weight's dtype)."""
    out = {}
    for key, backup in patcher.backup.items():
        out[key] = backup.weight
    for key, patches in patcher.patches.items():
        original = out.get(key, comfy.utils.get_attr(patcher.model, key))
        merged = comfy.lora.calculate_weight(patches, original.detach().to(torch.float32, copy=True), key)
        out[key] = merged.to(original.dtype if original.dtype not in FP8 else patcher.model.compute_dtype)
    return out


def unload_patcher(patcher) -> None:
    """Unload one model (and its clones) through ComfyUI's model manager; its weights go to the offload device."""
    unload = getattr(mm, "unload_model_and_clones", None)
    if unload is not None:  # newer ComfyUI
        unload(patcher, all_devices=True)
    else:
        keep = [lm for lm in mm.current_loaded_models if not patcher.is_clone(lm.model)]
        mm.free_memory(1e30, patcher.load_device, keep_loaded=keep)
    mm.soft_empty_cache()


def model_devices(choice: str):
    if choice == "cpu":
        cpu = torch.device("cpu")
        return cpu, cpu
    if choice in ("auto", "auto_offload"):
        return mm.get_torch_device(), mm.unet_offload_device()
    raise InputError(f"device: unknown choice '{choice}'; choose one of {', '.join(DEVICE_CHOICES)}")


_MODELS = common.ModelCache()
# the weights of a file (a DiTPatcher), shared by every LoRA / offload clone of it; the last one stays while the
# loader re-runs with another LoRA, strength or offload (ComfyUI drops the old output first)
_BASES = common.ModelCache(keep_last=True)


class LoraChoice(NamedTuple):
    """A LoRA file chosen in the loader and the strength it is applied with."""

    file: common.FileStamp
    strength: float


def lora_choice(lora: str, strength: float) -> Optional[LoraChoice]:
    """The loader's LoRA input, resolved: None for none (or strength 0)."""
    if not lora or lora == NONE or float(strength) == 0.0:
        return None
    path = common.resolve_model_file(LORA_FOLDER, lora, "a DreamID-V LoRA file (lora.safetensors from DreamIDVIRLFineTune)")
    return LoraChoice(common.FileStamp.of(path), float(strength))


ID_PROJECTION_EXPECTED = "an ArcFace ID-projection file (model.safetensors of an id_projection training run)"


def id_projection_choice(id_projection: str) -> Optional[common.FileStamp]:
    """The loader's ID-projection input, resolved: None for none."""
    if not id_projection or id_projection == NONE:
        return None
    return common.FileStamp.of(common.resolve_model_file(LORA_FOLDER, id_projection, ID_PROJECTION_EXPECTED))


def lora_patches(path, targets: dict) -> dict:
    """A LoRA file -> ModelPatcher patches (``add_patches``) for the model keys ``targets`` maps layer names to
    (``{"blocks.0.self_attn.q": "<key of its weight>"}``); any common Wan LoRA format
    (:func:`dreamidv_core.weights.lora.lora_layers`); CheckpointError naming the file for a LoRA of another model."""
    if is_id_projection_file(path):
        raise CheckpointError(path, "is an ArcFace ID-projection file, not a LoRA: choose it in the loader's "
                                    "id_projection input instead of lora")
    reader = read_state_dict(path)
    layers = lora_layers(list(reader), targets, path)
    tensors = {n: reader[n] for n in reader}
    return comfy.lora.load_lora(tensors, {layer.base: targets[layer.module] for layer in layers}, log_missing=False)


def _load_base(path, name: str, weight_dtype: str, attention: str, device: str, id_file) -> DiTPatcher:
    """The DiT of a checkpoint file under a :class:`DiTPatcher` (no LoRA, no offload): read once."""
    load_device, offload_device = model_devices(device)
    try:
        dit = load_dit(path, weight_dtype=weight_dtype, device=offload_device, attention_backend=attention,
                       variants=SWAP_VARIANTS)
    except CheckpointError as exc:
        raise CheckpointError(path, f"{exc.problem}. DreamIDVModelLoader needs a DreamID-V checkpoint in "
                                    f"{common.folder_hint(DIT_FOLDER)}: {expected_dit_names()}") from None
    if id_file is not None:
        proj = apply_id_projection_file(dit, id_file.path)
        log.info("DreamID-V: added the ID-token projection %s (%d tokens, gates %s)", Path(id_file.path).name,
                 proj.num_tokens, "all 0: a no-op" if proj.is_noop() else "trained")
    log.info("DreamID-V: loaded %s (%s, %s weights, %s attention) for %s", name, dit.cfg.variant,
             weight_dtype, attention, load_device)
    return DiTPatcher(dit, load_device=load_device, offload_device=offload_device)


def load_model(name: str, weight_dtype: str = "bf16", attention: str = "sdpa", device: str = "auto",
               offload_blocks: int = 0, lora: str = NONE, lora_strength: float = 1.0,
               id_projection: str = NONE) -> LoadedDiT:
    """The DiT of ``diffusion_models/<name>`` (with the ID projection ``loras/<id_projection>`` added), as a clone
    patched with ``loras/<lora>`` at ``lora_strength`` that streams ``offload_blocks`` blocks; the same object
    again while anything (ComfyUI's output cache, another node) still holds it. The file is read once for every
    LoRA, strength and offload setting. When nothing holds it, it is garbage-collected."""
    path = common.resolve_model_file(DIT_FOLDER, name, expected_dit_names())
    lora_file = lora_choice(lora, lora_strength)
    id_file = id_projection_choice(id_projection)
    base_key = (common.FileStamp.of(path), weight_dtype, attention, device, id_file)
    key = base_key + (offload_blocks, lora_file)

    def load():
        base = _BASES.get_or_load(base_key, lambda: (_load_base(path, name, weight_dtype, attention, device,
                                                                 id_file), None))[0]
        dit = base.model
        if offload_blocks > len(dit.blocks):
            raise InputError(f"offload_blocks: {name} has {len(dit.blocks)} blocks; asked to offload {offload_blocks}")
        patcher = base.clone()  # holds the base (its parent) while it lives
        patcher.offload_blocks = offload_blocks
        if lora_file is not None:
            targets = {n: f"{n}.weight" for n, m in dit.named_modules()
                       if isinstance(getattr(m, "weight", None), torch.Tensor)}
            patches = lora_patches(lora_file.file.path, targets)
            patcher.add_patches(patches, lora_file.strength)
            log.info("DreamID-V: LoRA %s at strength %g patches %d weights (the model is not reloaded)", lora,
                     lora_file.strength, len(patches))
        if offload_blocks:
            log.info("DreamID-V: block offload: %s", offload_memory(dit, offload_blocks).describe())
        handle = LoadedDiT(patcher=patcher, name=name, path=str(path), key=common.cache_key_text(key),
                           offload_after=(device == "auto_offload"), offload_blocks=offload_blocks)
        return handle, None

    return _MODELS.get_or_load(key, load)[0]


class DreamIDVModelLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="DreamIDVModelLoader",
            display_name="DreamID-V Model Loader",
            category=common.CATEGORY,
            description="Loads a DreamID-V diffusion transformer (full with pose attention, or faster; detected "
                        "from the file).",
            inputs=[
                io.Combo.Input("model_name", options=common.model_choices(DIT_FOLDER),
                               tooltip=f"DreamID-V checkpoint in models/{DIT_FOLDER}: {expected_dit_names()}. "
                                       "Full or faster is detected from the file."),
                io.Combo.Input("weight_dtype", options=list(WEIGHT_DTYPES), default="bf16",
                               tooltip="Precision of the weights in memory. bf16 is the reference's; fp8_e4m3fn "
                                       "halves memory (computes in bf16); fp32 for CPU accuracy checks."),
                io.Combo.Input("attention", options=list(BACKENDS), default="sdpa",
                               tooltip="Attention kernel: sdpa (PyTorch, always available), flash (flash-attn) "
                                       "or sage (sageattention) if installed. All are exact except sage."),
                io.Combo.Input("device", options=list(DEVICE_CHOICES), default="auto",
                               tooltip="auto: ComfyUI's GPU, kept there until ComfyUI needs the memory; "
                                       "auto_offload: GPU during a run, moved to CPU after it; cpu: run on the CPU."),
                io.Int.Input("offload_blocks", default=0, min=0, max=64, optional=True,
                             tooltip="Keep at least this many of the 30 transformer blocks in CPU RAM and stream "
                                     "each in just before it runs (for 8-12 GB cards: 15-30; saves ~107 MB per "
                                     "block in bf16, nothing below 3; ComfyUI streams more when memory is short). "
                                     "Output is identical; slower by the copy time. Counted by ComfyUI's model "
                                     "manager, which can free it."),
                io.Combo.Input("lora", options=[NONE] + common.model_choices(LORA_FOLDER, (".safetensors",)),
                               default=NONE, optional=True,
                               tooltip=f"A LoRA in models/{LORA_FOLDER}: this pack's (lora.safetensors from "
                                       "DreamIDVIRLFineTune) or any common Wan2.1 format (ComfyUI/diffusers "
                                       "lora_A/lora_B, kohya lora_down/lora_up with alpha). Applied as a weight "
                                       "patch: the file is not reloaded when the LoRA or its strength changes."),
                io.Float.Input("lora_strength", default=1.0, min=-4.0, max=4.0, step=0.05, optional=True,
                               tooltip="How much of the LoRA to apply (1: as trained; 0: none)."),
                io.Combo.Input("id_projection", options=[NONE] + common.model_choices(LORA_FOLDER, (".safetensors",)),
                               default=NONE, optional=True,
                               tooltip=f"An ArcFace ID-token projection in models/{LORA_FOLDER} (the "
                                       "model.safetensors of a DreamIDVIRLFineTune run that trained "
                                       "'id_projection'), added to the model. The sampler then also uses the "
                                       "identity's ArcFace embedding."),
            ],
            outputs=[common.DreamIDVModel.Output(display_name="model",
                                                 tooltip="The loaded DreamID-V model (full or faster, with the LoRA "
                                                         "and ID projection applied), for the PoseGuider, the "
                                                         "sampler and the fine-tune node.")],
        )

    @classmethod
    def validate_inputs(cls, model_name):
        """Replaces ComfyUI's 'value not in list' with a message naming the folder and the expected files."""
        return file_problem(DIT_FOLDER, model_name, expected_dit_names()) or True

    @classmethod
    def execute(cls, model_name, weight_dtype="bf16", attention="sdpa", device="auto",
                offload_blocks=0, lora=NONE, lora_strength=1.0, id_projection=NONE) -> io.NodeOutput:
        return io.NodeOutput(load_model(model_name, weight_dtype, attention, device, offload_blocks, lora,
                                        lora_strength, id_projection))


# ------------------------------------------------------------------------------------------------ text

def context_cache_dir() -> Path:
    """``<first 'dreamidv' model folder>/text_context`` if writable, else ComfyUI's user folder."""
    candidates = []
    if CONTEXT_FOLDER in folder_paths.folder_names_and_paths:
        candidates += [Path(p) / "text_context" for p in folder_paths.get_folder_paths(CONTEXT_FOLDER)]
    candidates.append(Path(folder_paths.get_user_directory()) / "dreamidv" / "text_context")
    for cand in candidates:
        try:
            cand.mkdir(parents=True, exist_ok=True)
            if os.access(cand, os.W_OK):
                return cand
        except OSError:
            continue
    return candidates[-1]


def find_tokenizer(encoder: Path) -> Optional[Path]:
    """The google/umt5-xxl tokenizer folder for an official encoder .pth: next to the file or in any
    ``text_encoders`` folder. ``None`` when the file embeds its tokenizer (ComfyUI's safetensors)."""
    from dreamidv_core.models.umt5 import read_embedded_tokenizer

    try:
        if read_embedded_tokenizer(encoder) is not None:
            return None
    except CheckpointError:
        pass
    roots = [encoder.parent] + [Path(p) for p in folder_paths.get_folder_paths(TEXT_FOLDER)]
    looked = []
    for root in roots:
        for sub in TOKENIZER_DIRS:
            cand = root / sub
            looked.append(str(cand))
            if cand.is_dir():
                return cand
    raise CheckpointError(encoder, "has no embedded tokenizer, and no google/umt5-xxl tokenizer folder was found "
                                   f"(looked in: {', '.join(dict.fromkeys(looked))}). Put the google/umt5-xxl "
                                   "folder (spiece.model or tokenizer.json) next to the encoder, or use ComfyUI's "
                                   "umt5_xxl_*.safetensors")


def auto_text_encoder() -> Optional[str]:
    """The first umT5-XXL file of the catalogue (README "Model files" order) among the text_encoders choices."""
    choices = common.model_choices(TEXT_FOLDER)
    for option in get_entry("text_encoder").options:
        found = [c for c in choices if os.path.basename(c) == option[0]]
        if found:
            return found[0]
    return None


def text_encoder_choice(text_encoder: str) -> str:
    """The combo value with 'auto' resolved; an InputError saying what to put where when nothing fits."""
    if text_encoder == AUTO:
        found = auto_text_encoder()
        if found is None:
            raise InputError(f"text_encoder 'auto': no umT5-XXL file in {common.folder_hint(TEXT_FOLDER)}; put "
                             f"{expected_text_encoder_names()} there, or choose a precomputed_context")
        return found
    if not text_encoder or text_encoder == NONE:
        raise InputError("DreamIDVTextContext: choose a text_encoder (" + expected_text_encoder_names() +
                         f" in {common.folder_hint(TEXT_FOLDER)}) or a precomputed_context")
    return text_encoder


def context_conditioning(context: torch.Tensor) -> list:
    """[L, 4096] -> ComfyUI CONDITIONING [[cond [1, L, 4096] float32, {...}]]."""
    return [[context.to(torch.float32)[None], {"pooled_output": None, "dreamidv_tokens": int(context.shape[0])}]]


class DreamIDVTextContext(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="DreamIDVTextContext",
            display_name="DreamID-V Text Context",
            category=common.CATEGORY,
            description=f"The umT5-XXL context of DreamID-V's fixed prompt \"{DEFAULT_PROMPT}\", computed once per "
                        "encoder file and cached on disk (or read from a precomputed context file).",
            inputs=[
                io.Combo.Input("text_encoder", options=[AUTO, NONE] + common.model_choices(TEXT_FOLDER),
                               default=AUTO,
                               tooltip="umT5-XXL encoder in models/text_encoders: " + expected_text_encoder_names() +
                                       ". 'auto': the first of these found there. Runs only once; later runs read "
                                       "the cache. Not used when a precomputed_context is chosen."),
                io.Combo.Input("precomputed_context", options=[NONE] + common.model_choices(CONTEXT_FOLDER),
                               default=NONE, optional=True,
                               tooltip="A context file in models/dreamidv ([L, 4096] tensor: the official "
                                       "context.pth or a cache .safetensors). Used instead of the encoder."),
                io.Combo.Input("encoder_device", options=["cpu", "auto"], default="cpu", optional=True,
                               tooltip="Where the encoder runs on a cache miss: cpu (slow, needs ~12 GB RAM for "
                                       "bf16) or auto (ComfyUI's GPU)."),
            ],
            outputs=[io.Conditioning.Output(display_name="positive",
                                            tooltip="The umT5-XXL context of \"chang face\" as CONDITIONING, for "
                                                    "the sampler (and the fine-tune and IVS nodes).")],
        )

    @classmethod
    def validate_inputs(cls, text_encoder, precomputed_context=NONE):
        if precomputed_context and precomputed_context != NONE:
            return file_problem(CONTEXT_FOLDER, precomputed_context, "a [L, 4096] context file") or True
        if not text_encoder or text_encoder == NONE:
            return True  # execute explains what to choose
        try:
            text_encoder = text_encoder_choice(text_encoder)
        except InputError as exc:
            return str(exc)
        return file_problem(TEXT_FOLDER, text_encoder, expected_text_encoder_names()) or True

    @classmethod
    def execute(cls, text_encoder=AUTO, precomputed_context=NONE, encoder_device="cpu") -> io.NodeOutput:
        if precomputed_context and precomputed_context != NONE:
            path = common.resolve_model_file(CONTEXT_FOLDER, precomputed_context, "a [L, 4096] context file")
            return io.NodeOutput(context_conditioning(load_precomputed_context(path, TEXT_DIM)))
        encoder = common.resolve_model_file(TEXT_FOLDER, text_encoder_choice(text_encoder),
                                            expected_text_encoder_names())
        device = mm.get_torch_device() if encoder_device == "auto" else "cpu"
        context = get_text_context(encoder, find_tokenizer(encoder), cache_dir=context_cache_dir(), device=device)
        return io.NodeOutput(context_conditioning(context))


NODES = [DreamIDVModelLoader, DreamIDVTextContext]
