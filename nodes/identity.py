"""DreamID-V nodes: the ArcFace ID-token encoder (reference photo -> DREAMIDV_IDENTITY).

A thin adapter over :mod:`dreamidv_core.preprocess.identity`; the model files come from ComfyUI's
``insightface`` model folder(s) (``models/insightface/models/<antelopev2|buffalo_l>/``) and run on
onnxruntime (the optional "face" extra; the insightface package is not needed).
"""
from __future__ import annotations

import numpy as np
import torch
import folder_paths
from comfy_api.latest import io

from dreamidv_core.preprocess import identity as core
from dreamidv_core.pipelines.adapters import PixelSpaceVAE

from . import common
from .video import video_size as video_frame_size

# The chosen face's L2-normalised ArcFace embedding, float32 [1, 512].
FaceEmbedding = io.Custom("DREAMIDV_FACE_EMBEDDING")


def _image(arr: np.ndarray) -> torch.Tensor:
    """uint8 [H, W, 3] -> IMAGE [1, H, W, 3] float 0..1."""
    return torch.from_numpy(np.array(arr, dtype=np.uint8, copy=True)).float().div(255)[None]


class DreamIDVIdentityEncoder(io.ComfyNode):
    """Finds the face in the reference photo and builds the identity the sampler uses."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="DreamIDVIdentityEncoder",
            display_name="DreamID-V ArcFace ID Token Encoder",
            category=common.CATEGORY,
            description="Reference photo -> DreamID-V identity: the face found by the insightface pack's detector, its "
                        "ArcFace embedding, the photo letterboxed onto the video frame size and its VAE latent "
                        "(the released model's identity tokens).",
            inputs=[
                io.Image.Input("reference", tooltip="The photo of the face to put into the video (alpha and "
                               "greyscale are fine; the first image of a batch is used)."),
                io.Combo.Input("insightface_pack", options=list(core.PACK_NAMES), default="antelopev2",
                               tooltip="insightface model pack in models/insightface/models/<pack>/: antelopev2 "
                               "(scrfd_10g_bnkps.onnx + glintr100.onnx) or buffalo_l (det_10g.onnx + "
                               "w600k_r50.onnx). Never downloaded automatically."),
                common.onnx_provider_input("face detection and ArcFace"),
                io.Int.Input("detection_size", default=640, min=128, max=2048, step=32,
                             tooltip="Square size the photo is fitted into for face detection (multiple of 32)."),
                io.Float.Input("detection_threshold", default=0.5, min=0.05, max=0.99, step=0.01,
                               tooltip="Minimum detector confidence for a face."),
                io.Combo.Input("face_selection", options=list(core.SELECT_MODES), default="largest",
                               tooltip="With several faces in the photo: the largest, the one at face_index "
                               "(counted left to right from 0), or the most similar to the face in "
                               "'similar_to'."),
                io.Int.Input("face_index", default=0, min=0, max=63,
                             tooltip="Which face when face_selection is 'index': 0 = leftmost. The 'faces' "
                             "output shows the numbers."),
                io.Image.Input("similar_to", optional=True,
                               tooltip="For face_selection 'most similar': another photo of the person; its "
                               "largest face is compared (ArcFace cosine similarity) with every face found."),
                io.MultiType.Input(io.Image.Input("video", optional=True,
                                                  tooltip="The driving video (IMAGE frames or a VIDEO; only its "
                                                          "frame size is read): it sets the letterbox (and the "
                                                          "latent). Without it only the face and embedding are "
                                                          "computed."),
                                   types=[io.Video]),
                io.Vae.Input("vae", optional=True,
                             tooltip="The Wan 2.1 VAE: with the video frames, the identity latent is encoded "
                             "here once instead of in the sampler."),
                io.Int.Input("width", default=832, min=16, max=4096, step=16,
                             tooltip="Area width of the swap (same as the sampler's), for the latent."),
                io.Int.Input("height", default=480, min=16, max=4096, step=16,
                             tooltip="Area height of the swap (same as the sampler's), for the latent."),
            ],
            outputs=[
                common.Identity.Output(display_name="identity", tooltip="Face, embedding, letterboxed "
                                       "reference and its latent, for the DreamID-V sampler."),
                io.Image.Output(display_name="preview", tooltip="The reference as the model sees it: "
                                "letterboxed onto the video frame size (the photo itself without video)."),
                io.Image.Output(display_name="faces", tooltip="The photo with every face found, numbered "
                                "left to right; the chosen one in green."),
                FaceEmbedding.Output(display_name="embedding", tooltip="L2-normalised ArcFace embedding "
                                     "[1, 512] of the chosen face."),
                io.String.Output("info", display_name="info", tooltip="Which model files ran on which onnxruntime "
                                 "build and device, the faces found and the one chosen."),
            ],
        )

    @classmethod
    def execute(cls, reference, insightface_pack, provider, detection_size, detection_threshold,
                face_selection, face_index, similar_to=None, video=None, vae=None, width=832,
                height=480) -> io.NodeOutput:
        pack_dir = core.find_pack(folder_paths.get_folder_paths("insightface"), insightface_pack)
        analyzer = core.load_analyzer(pack_dir, provider, detection_size, detection_threshold)
        video_size = None if video is None else video_frame_size(video, "video")
        bundle, faces, chosen = core.encode_identity(
            analyzer, reference, face_selection, face_index, similar_to, video_size,
            None if vae is None else PixelSpaceVAE(vae), (width, height))
        preview = bundle.letterboxed if bundle.letterboxed is not None else bundle.image
        embedding = torch.from_numpy(bundle.embedding.copy())[None]
        info = (f"{analyzer.info}; {len(faces)} face{'s' if len(faces) != 1 else ''} found, "
                f"#{chosen} chosen ({face_selection}, numbered left to right)")
        return io.NodeOutput(bundle, _image(preview), _image(core.draw_faces(bundle.image, faces, chosen)), embedding,
                             info)


NODES = [DreamIDVIdentityEncoder]
