"""DreamID-V for ComfyUI: video face swapping with DreamID-V.

ComfyUI entry point (V3 API): ComfyUI imports this folder as a package from ``custom_nodes/`` and
calls ``comfy_entrypoint``. The model code lives in the ComfyUI-free library ``dreamidv_core`` (also
usable from the command line: ``python -m dreamidv_core``).
"""
import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
# Make ``import dreamidv_core`` work inside ComfyUI too (the pack's folder is not on sys.path there).
# Appended, never prepended, so nothing of ComfyUI's is shadowed. The nodes package itself must be
# imported relatively: ComfyUI has a top-level module called ``nodes``.
if _HERE not in sys.path:
    sys.path.append(_HERE)

# Inside ComfyUI (``comfy`` already imported) the nodes are registered; imported elsewhere (e.g. by a
# test runner walking the folder) the package stays inert instead of failing on ComfyUI's modules.
if __package__ and "comfy" in sys.modules:
    from .nodes import comfy_entrypoint

    __all__ = ["comfy_entrypoint"]
