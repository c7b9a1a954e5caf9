"""ComfyUI nodes of the DreamID-V pack (V3 node API).

Each node module lists its classes in ``NODES``; :func:`comfy_entrypoint` hands them all to ComfyUI.
Node code imports the model library as ``dreamidv_core`` (absolute import; the root ``__init__``
registers the pack's own copy under that name), the pack's training package relatively
(``from ..training import x``) and sibling node modules relatively (``from . import x``): ``import nodes``
or ``import training`` would find ComfyUI's own ``nodes`` or another pack's module.
"""
from typing_extensions import override

from comfy_api.latest import ComfyExtension, io

from . import common, composite, identity, ivs, loaders, native, pose, report, sampler, synthesis, training

common.register_model_folders()

NODE_MODULES = (loaders, pose, identity, sampler, composite, report, training, ivs, synthesis, native)


def all_nodes() -> list:
    return [node for module in NODE_MODULES for node in module.NODES]


class DreamIDVExtension(ComfyExtension):
    @override
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return all_nodes()


async def comfy_entrypoint() -> DreamIDVExtension:
    return DreamIDVExtension()
