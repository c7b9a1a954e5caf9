"""DreamID-V nodes: the identity report (per-frame ArcFace similarity of a swapped video to the reference) and
the evaluation (:mod:`dreamidv_core.eval.benchmark`: identity, pose/expression, background, flicker and face
motion over a folder of clips or the graph's own clip, with tables, plots and a side-by-side comparison)."""
from __future__ import annotations

import json
import os
from pathlib import Path

import folder_paths
import torch
from comfy_api.latest import io

from dreamidv_core.preprocess import identity as face_core
from dreamidv_core.errors import InputError
from dreamidv_core.eval.identity_report import identity_report, insightface_embedder, plot_similarity

from . import common
from .pose import MEDIAPIPE_FILE, model_file_choices

DEFAULT_RESULTS = "dreamidv_eval"


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


def resolve_output_folder(value: str, default: str = DEFAULT_RESULTS) -> Path:
    """An absolute path as given; a relative one under ComfyUI's output folder."""
    value = (value or "").strip() or default
    path = Path(os.path.expanduser(value))
    return path if path.is_absolute() else Path(folder_paths.get_output_directory()) / path


class DreamIDVEvaluate(io.ComfyNode):
    """Clips (a folder or list, or the graph's swapped/driving/reference images) -> tables, plots, summary."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="DreamIDVEvaluate",
            display_name="DreamID-V Evaluate (IDBench-V-like)",
            category=common.CATEGORY,
            description="Scores swapped videos like the papers do: identity (ArcFace similarity: mean, minimum, "
                        "decay, stability), attribute preservation (head-pose error in degrees, expression and "
                        "landmark error from the MediaPipe landmarker), video quality (background PSNR/SSIM "
                        "outside the face mask, flicker) and face motion (FM_ref, FM_inter). Writes per-clip and "
                        "aggregate tables (CSV, JSON) and plots; optionally compares with an earlier results folder.",
            is_output_node=True,
            inputs=[
                io.String.Input("clips", default="",
                                tooltip="A folder of clip folders (driving.mp4, reference.png, swapped.mp4, optional "
                                        "mask.mp4 / target.mp4) or a .json/.csv list (name, driving, reference, "
                                        "swapped, mask, target). Empty: evaluate the connected images instead."),
                io.String.Input("results_folder", default=DEFAULT_RESULTS,
                                tooltip="Where the tables and plots go (relative: under ComfyUI's output folder)."),
                io.Combo.Input("insightface_pack", options=list(face_core.PACK_NAMES), default="antelopev2",
                               tooltip="ArcFace for the identity numbers: models/insightface/models/<pack>/."),
                common.onnx_provider_input("face detection and ArcFace"),
                io.Combo.Input("landmarker", options=["none"] + model_file_choices("mediapipe", ".task", MEDIAPIPE_FILE),
                               default=MEDIAPIPE_FILE,
                               tooltip="MediaPipe face landmarker (models/mediapipe) for pose, expression, landmark "
                                       "and face-motion numbers; none: skip them."),
                io.String.Input("swapped_folder", default="", optional=True,
                                tooltip="Take each clip's swapped video from <folder>/<clip name>.mp4 (e.g. the "
                                        "outputs of one setting) instead of swapped.mp4 in the clip folder."),
                io.String.Input("compare_with", default="", optional=True,
                                tooltip="Another results folder (e.g. step cache off): writes a side-by-side "
                                        "comparison (comparison.csv/json/png) into results_folder/comparison."),
                io.Image.Input("swapped", optional=True, tooltip="The graph's swapped frames (when clips is empty)."),
                io.Image.Input("driving", optional=True, tooltip="The driving frames (when clips is empty)."),
                io.Image.Input("reference", optional=True, tooltip="The reference face photo (when clips is empty)."),
                io.Image.Input("mask", optional=True, tooltip="The face-mask frames (optional; else from landmarks)."),
            ],
            outputs=[io.String.Output("summary", display_name="summary",
                                      tooltip="The aggregate numbers (JSON), or the comparison with compare_with."),
                     io.Image.Output("table", display_name="table",
                                     tooltip="The aggregate table (or the comparison) as an image."),
                     io.String.Output("results", display_name="results", tooltip="The results folder.")],
        )

    @classmethod
    def execute(cls, clips, results_folder, insightface_pack, provider, landmarker, swapped_folder="",
                compare_with="", swapped=None, driving=None, reference=None, mask=None) -> io.NodeOutput:
        from dreamidv_core.eval import benchmark as bench
        from dreamidv_core.eval.charts import comparison_chart, summary_table
        from dreamidv_core.eval.face_metrics import mediapipe_observer

        out = resolve_output_folder(results_folder)
        if (clips or "").strip():
            clip_list = bench.discover_clips(clips.strip(), (swapped_folder or "").strip() or None)
        elif swapped is None or driving is None or reference is None:
            raise InputError("evaluate: give 'clips' (a folder or list) or connect swapped, driving and reference")
        else:
            clip_list = None
        pack_dir = face_core.find_pack(folder_paths.get_folder_paths("insightface"), insightface_pack)
        embedder = insightface_embedder(pack_dir, provider)
        lm = None
        if landmarker and landmarker != "none":
            from dreamidv_core.preprocess.pose.mediapipe_face import FaceLandmarker

            lm = FaceLandmarker(str(common.resolve_model_file("mediapipe", landmarker, MEDIAPIPE_FILE)))
        observer = mediapipe_observer(lm) if lm is not None else None
        try:
            if clip_list is not None:
                bar = common.progress_hook(len(clip_list), stage="clips")
                results = bench.evaluate_clips(clip_list, embedder, observer, progress=bar)
            else:
                bar = common.progress_hook(min(len(swapped), len(driving)), stage="frames")
                results = [bench.score_clip(swapped, driving, reference[0], embedder, observer, mask=mask,
                                            name="graph", progress=bar)]
        finally:
            if lm is not None:
                lm.close()
        doc = bench.write_results(out, results, {"clips": clips or "(graph)", "pack": insightface_pack,
                                                 "landmarker": landmarker})
        summary, table = json.dumps(doc["aggregate"], indent=1), summary_table(doc)
        if (compare_with or "").strip():
            other = resolve_output_folder(compare_with.strip())
            la, lb = other.name or "A", out.name or "B"
            if la == lb:
                la, lb = f"{la} (A)", f"{lb} (B)"
            cmp = bench.compare_results(bench.load_results(other), doc, (la, lb))
            bench.write_comparison(out / "comparison", cmp)
            summary, table = json.dumps(cmp["metrics"], indent=1), comparison_chart(cmp)
        return io.NodeOutput(summary, torch.from_numpy(table).float().div(255)[None], str(out))


NODES = [DreamIDVIdentityReport, DreamIDVEvaluate]
