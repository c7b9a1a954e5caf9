"""DreamID-V node: the identity report (per-frame ArcFace similarity of a swapped video to the reference)."""
from __future__ import annotations

import json

import folder_paths
import torch
from comfy_api.latest import io

from dreamidv_core.preprocess import identity as face_core
from dreamidv_core.errors import InputError
from dreamidv_core.eval.identity_report import identity_report, insightface_embedder, plot_similarity

from . import common


class DreamIDVIdentityReport(io.ComfyNode):
    """Frames + reference -> similarity numbers (text) and a plot (image)."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="DreamIDVIdentityReport",
            display_name="DreamID-V Identity Report",
            category=common.CATEGORY,
            description="How well the swapped video keeps the identity: per-frame ArcFace cosine similarity to the "
                        "reference, its mean, minimum and frame-to-frame stability, as numbers and a plot.",
            inputs=[
                io.Image.Input("frames", tooltip="The swapped frames."),
                common.Identity.Input("identity", optional=True,
                                      tooltip="The identity from the ArcFace ID token encoder (its embedding is the "
                                              "reference)."),
                io.Image.Input("reference", optional=True,
                               tooltip="Or a reference photo (its largest face); used when no identity is given."),
                io.Combo.Input("insightface_pack", options=list(face_core.PACK_NAMES), default="antelopev2",
                               tooltip="insightface model pack in models/insightface/models/<pack>/."),
                common.onnx_provider_input("face detection and ArcFace"),
            ],
            outputs=[io.String.Output("report", display_name="report", tooltip="The numbers, as JSON."),
                     io.Image.Output("plot", display_name="plot", tooltip="Similarity per frame, mean and minimum.")],
        )

    @classmethod
    def execute(cls, frames, identity=None, reference=None, insightface_pack="antelopev2",
                provider="auto") -> io.NodeOutput:
        ref = identity if identity is not None and getattr(identity, "embedding", None) is not None else reference
        if ref is None:
            raise InputError("identity report: connect an identity or a reference image")
        pack_dir = face_core.find_pack(folder_paths.get_folder_paths("insightface"), insightface_pack)
        bar = common.progress_hook(len(frames), stage="frames")
        report = identity_report(frames, ref, insightface_embedder(pack_dir, provider),
                                 progress=bar)
        plot = torch.from_numpy(plot_similarity(report)).float().div(255)[None]
        return io.NodeOutput(json.dumps(report.as_dict(), indent=1), plot)


NODES = [DreamIDVIdentityReport]
