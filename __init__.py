"""DreamID-V for ComfyUI: video face swapping with DreamID-V.

ComfyUI entry point (V3 API): ComfyUI imports this folder as a package from ``custom_nodes/`` and
calls ``comfy_entrypoint``. The model code lives in the ComfyUI-free library ``dreamidv_core`` (also
usable from the command line: ``python -m dreamidv_core``).

``sys.path`` is left alone, so no other pack can shadow this pack's modules and this pack shadows none
of theirs: the node modules and the training package are reached relatively (``<pack>.nodes``,
``<pack>.training``), and ``dreamidv_core`` (a name only this pack uses) is registered from this
folder explicitly.
"""
import importlib.util
import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
CORE = "dreamidv_core"


def _register_core():
    """Import this pack's ``dreamidv_core`` under its own name without touching ``sys.path``."""
    path = os.path.join(_HERE, CORE)
    loaded = sys.modules.get(CORE)
    if loaded is not None:
        where = os.path.dirname(os.path.realpath(getattr(loaded, "__file__", None) or ""))
        if where == os.path.realpath(path):
            return loaded
        raise ImportError(f"DreamID-V: another copy of '{CORE}' is already loaded from {where}, not this pack's "
                          f"({path}). Two copies of the DreamID-V pack are installed: keep one folder in "
                          "custom_nodes/ and remove (or disable) the other.")
    spec = importlib.util.spec_from_file_location(CORE, os.path.join(path, "__init__.py"),
                                                  submodule_search_locations=[path])
    module = importlib.util.module_from_spec(spec)
    sys.modules[CORE] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(CORE, None)
        raise
    return module


# Inside ComfyUI (``comfy`` already imported) the nodes are registered; imported elsewhere (e.g. by a
# test runner walking the folder) the package stays inert instead of failing on ComfyUI's modules.
if __package__ and "comfy" in sys.modules:
    _register_core()
    from .nodes import comfy_entrypoint

    __all__ = ["comfy_entrypoint"]
