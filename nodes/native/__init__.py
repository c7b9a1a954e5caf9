"""DreamID-V as a native ComfyUI model: core loaders, LoRA loaders, samplers, context windows, previews and
memory management on ComfyUI's own Wan model, patched (never forked) with DreamID-V's pose branch.

:mod:`.branch` (patches and wrappers), :mod:`.conditioning` (conditioning and decode), :mod:`.sampling` (the
released sampler, noise and window blending as ComfyUI objects), :mod:`.nodes` (the nodes).
"""
from .nodes import NODES

__all__ = ["NODES"]
