"""DreamID-V nodes: the DiT loader and the text context.

* ``DreamIDVModelLoader``: a DreamID-V checkpoint from ``diffusion_models`` -> DREAMIDV_MODEL, a
  :class:`LoadedDiT` wrapping the :class:`~dreamidv_core.models.dit.DreamIDVTransformer` in ComfyUI's
  ``ModelPatcher`` so that ComfyUI's memory manager moves it to the GPU for a run and frees it when
  another model needs the memory. Loaded models are shared while anything holds them (same file and
  options -> same object). Optional add-ons from ``loras``: a LoRA merged into the weights, and an
  ArcFace ID-token projection (``id_projection.*`` tensors: the ``model.safetensors`` of an
  ``id_projection`` training run) added on top of the released weights.
* ``DreamIDVTextContext``: the umT5 context of the fixed prompt "chang face" as CONDITIONING, computed
  once per encoder file and cached on disk, or read from a precomputed context file.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple, Optional

import torch

import comfy.model_management as mm
import comfy.model_patcher
import folder_paths
from comfy_api.latest import io

from dreamidv_core.models.attention import BACKENDS
from dreamidv_core.weights.checkpoints import SWAP_VARIANTS, WEIGHT_DTYPES, load_dit
from dreamidv_core.sampling.offload import disable_block_offload, enable_block_offload, offload_memory
from dreamidv_core.errors import CheckpointError, InputError
from dreamidv_core.weights.id_projection import apply_id_projection_file, is_id_projection_file
from dreamidv_core.weights.lora import apply_lora_file
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

@dataclass(eq=False)
class LoadedDiT:
    """DREAMIDV_MODEL: a DreamID-V DiT under ComfyUI's memory management.

    ``patcher.model`` is the :class:`DreamIDVTransformer`; ``key`` identifies file and options (pose
    tokens record it); ``offload_after`` moves the weights back to the CPU after every run.
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
        """Put the model on its load device (ComfyUI frees other models as needed).

        Without block offload a full load through ComfyUI's model manager (the DiT's modules are not
        ComfyUI ``ops`` and cannot run partly offloaded); with it, everything but the last
        ``offload_blocks`` blocks goes to the device and those stream in block by block.
        """
        device = self.patcher.load_device
        if self.offload_blocks and not mm.is_device_cpu(device):
            plan = offload_memory(self.dit, self.offload_blocks)
            mm.free_memory(int(memory_required) + plan.device_weights, device)
            enable_block_offload(self.dit, self.offload_blocks, device)
            return
        mm.load_models_gpu([self.patcher], memory_required=int(memory_required), force_full_load=True)

    def release(self) -> None:
        """After a run: with block offload the weights go back to the CPU; with ``offload_after`` the
        model leaves the GPU now."""
        if self.offload_blocks and getattr(self.dit, "block_offload", None) is not None:
            disable_block_offload(self.dit, self.patcher.offload_device)
            return
        if not self.offload_after or mm.is_device_cpu(self.patcher.load_device):
            return
        unload_patcher(self.patcher)


def unload_patcher(patcher) -> None:
    """Unload one model from ComfyUI's list of loaded models (weights go to its offload device)."""
    for i in range(len(mm.current_loaded_models) - 1, -1, -1):
        loaded = mm.current_loaded_models[i]
        if loaded.model is patcher:
            mm.current_loaded_models.pop(i).model_unload()
    mm.soft_empty_cache()


def model_devices(choice: str):
    if choice == "cpu":
        cpu = torch.device("cpu")
        return cpu, cpu
    if choice in ("auto", "auto_offload"):
        return mm.get_torch_device(), mm.unet_offload_device()
    raise InputError(f"device: unknown choice '{choice}'; choose one of {', '.join(DEVICE_CHOICES)}")


_MODELS = common.ModelCache()


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


def load_model(name: str, weight_dtype: str = "bf16", attention: str = "sdpa", device: str = "auto",
               offload_blocks: int = 0, lora: str = NONE, lora_strength: float = 1.0,
               id_projection: str = NONE) -> LoadedDiT:
    """The DiT of ``diffusion_models/<name>`` (with ``loras/<lora>`` merged at ``lora_strength`` and the
    ID projection ``loras/<id_projection>`` added); the same object again while anything (ComfyUI's output
    cache, another node) still holds it. When nothing does, it is garbage-collected."""
    path = common.resolve_model_file(DIT_FOLDER, name, expected_dit_names())
    lora_file = lora_choice(lora, lora_strength)
    id_file = id_projection_choice(id_projection)
    key = (common.FileStamp.of(path), weight_dtype, attention, device, offload_blocks, lora_file, id_file)

    def load():
        load_device, offload_device = model_devices(device)
        try:
            dit = load_dit(path, weight_dtype=weight_dtype, device=offload_device, attention_backend=attention,
                           variants=SWAP_VARIANTS)
        except CheckpointError as exc:
            raise CheckpointError(path, f"{exc.problem}. DreamIDVModelLoader needs a DreamID-V checkpoint in "
                                        f"{common.folder_hint(DIT_FOLDER)}: {expected_dit_names()}") from None
        if lora_file is not None:
            if is_id_projection_file(lora_file.file.path):
                raise CheckpointError(lora_file.file.path, "is an ArcFace ID-projection file, not a LoRA: choose "
                                                           "it in the loader's id_projection input instead of lora")
            patched = apply_lora_file(dit, lora_file.file.path, strength=lora_file.strength)
            log.info("DreamID-V: applied LoRA %s (strength %g) to %d layers", lora, lora_file.strength, len(patched))
        if id_file is not None:
            proj = apply_id_projection_file(dit, id_file.path)
            log.info("DreamID-V: added the ID-token projection %s (%d tokens, gates %s)", id_projection,
                     proj.num_tokens, "all 0: a no-op" if proj.is_noop() else "trained")
        patcher = comfy.model_patcher.ModelPatcher(dit, load_device=load_device, offload_device=offload_device)
        handle = LoadedDiT(patcher=patcher, name=name, path=str(path), key=common.cache_key_text(key),
                           offload_after=(device == "auto_offload"), offload_blocks=offload_blocks)
        if offload_blocks:
            if offload_blocks > len(dit.blocks):
                raise InputError(f"offload_blocks: {name} has {len(dit.blocks)} blocks; asked to offload {offload_blocks}")
            log.info("DreamID-V: block offload: %s", offload_memory(dit, offload_blocks).describe())
        log.info("DreamID-V: loaded %s (%s, %s weights, %s attention) for %s", name, dit.cfg.variant,
                 weight_dtype, attention, load_device)
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
                             tooltip="Keep this many of the 30 transformer blocks in CPU RAM and stream each in "
                                     "just before it runs (for 8-12 GB cards: 15-30; saves ~107 MB per block in "
                                     "bf16, nothing below 3). Output is identical; slower by the copy time."),
                io.Combo.Input("lora", options=[NONE] + common.model_choices(LORA_FOLDER, (".safetensors",)),
                               default=NONE, optional=True,
                               tooltip=f"A DreamID-V LoRA in models/{LORA_FOLDER} (lora.safetensors from the "
                                       "DreamIDVIRLFineTune checkpoint folder), merged into the weights at load."),
                io.Float.Input("lora_strength", default=1.0, min=-4.0, max=4.0, step=0.05, optional=True,
                               tooltip="How much of the LoRA to merge (1: as trained; 0: none)."),
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
