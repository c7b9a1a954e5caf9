"""ComfyUI nodes of the DreamID-V pack.

Each node module adds its classes to the two mappings below; the pack's root ``__init__.py`` hands
them to ComfyUI. Node code imports the model library as ``dreamidv_core`` (absolute import; the root
``__init__`` puts the pack folder on ``sys.path``) and imports sibling node modules relatively
(``from . import x``): ``import nodes`` would be ComfyUI's own module.
"""

NODE_CLASS_MAPPINGS = {}
NODE_DISPLAY_NAME_MAPPINGS = {}

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
