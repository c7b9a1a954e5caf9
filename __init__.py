"""DreamID-V for ComfyUI: video face swapping with DreamID-V.

ComfyUI entry point (V1 API): ComfyUI imports this folder as a package from ``custom_nodes/`` and
reads ``NODE_CLASS_MAPPINGS`` / ``NODE_DISPLAY_NAME_MAPPINGS``. The model code lives in the
ComfyUI-free library ``dreamidv_core`` (also usable from the command line: ``python -m dreamidv_core``).
"""
import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
# Make ``import dreamidv_core`` work inside ComfyUI too (the pack's folder is not on sys.path there).
# Appended, never prepended, so nothing of ComfyUI's is shadowed. The nodes package itself must be
# imported relatively: ComfyUI has a top-level module called ``nodes``.
if _HERE not in sys.path:
    sys.path.append(_HERE)

if __package__:
    from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS
else:  # loaded as a plain file (not as a package): nothing to register
    NODE_CLASS_MAPPINGS = {}
    NODE_DISPLAY_NAME_MAPPINGS = {}

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
