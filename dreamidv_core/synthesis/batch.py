"""The SyncID-Pipe over a folder of real clips, spread over ``torchrun`` processes (one clip per rank at a time).

Jobs (:func:`syncid_jobs`): a folder of real clips with a folder of new faces I_g (clip k, in name order, gets
face k mod the number of faces; a photo of a clip's real person, ``<clip>.png``/``.jpg`` beside the clip, is
used for its backward sample), or a ``.csv``/``.jsonl`` list with fields ``clip``, ``identity`` and optionally
``real_identity``, ``name`` (the sample prefix; default the clip's name) and ``seed``.

Every clip is one :func:`.pipeline.synthesize_clip`; when it is finished (samples written, or rejected) a marker
``<dataset>/.syncid-batch/<name>.json`` records the outcome, so a rerun skips it (a rejected pair is not
synthesised again: delete its marker to retry). The samples themselves are written atomically by the quadruplet
writer; a run killed mid-clip leaves no sample that looks complete and no marker, and the clip is redone.

Ranks work data-parallel (each on its own clips, balanced by length): the stages of one clip (MediaPipe,
inpainting, ArcFace) are CPU work that sequence parallelism would not speed up.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, List, Optional

from ..errors import InputError
from ..io.state_dict import atomic_write
from ..io.video import VideoReader, read_image
from ..parallel.batch import (IMAGE_SUFFIXES, VIDEO_SUFFIXES, BatchReport, Job, check_files, check_names,
                              files_by_stem, plan_jobs, read_job_table, run_jobs, say, video_cost)
from ..parallel.mesh import Mesh
from .pipeline import SyncIDModels, SyncIDSettings, synthesize_clip
from .writer import summary

MARKERS = ".syncid-batch"
ROLES = ("clip", "identity", "real_identity")


def syncid_jobs(clips, identities=None, frame_num: Optional[int] = None, area=(832, 480)) -> List[Job]:
    """The jobs of a run (module docstring): ``clips`` a folder (with ``identities`` a folder of face images) or
    a list file. ``frame_num`` / ``area`` only weigh the clips for balancing."""
    clips = Path(clips)
    if clips.is_dir():
        if identities is None or not Path(identities).is_dir():
            raise InputError("--identities: give the folder of new faces I_g (one image each; clip k gets face k mod "
                             "their number) for a folder of clips")
        videos = files_by_stem(clips, VIDEO_SUFFIXES)
        photos = files_by_stem(clips, IMAGE_SUFFIXES)
        faces = list(files_by_stem(identities, IMAGE_SUFFIXES).values())
        if not videos:
            raise InputError(f"{clips}: no video files ({', '.join(VIDEO_SUFFIXES)}) in this folder")
        if not faces:
            raise InputError(f"{identities}: no images ({', '.join(IMAGE_SUFFIXES)}) in this folder")
        rows = [{"clip": str(v), "identity": str(faces[k % len(faces)]), "name": stem,
                 **({"real_identity": str(photos[stem])} if stem in photos else {})}
                for k, (stem, v) in enumerate(videos.items())]
    elif clips.is_file():
        rows = read_job_table(clips, ROLES)
    else:
        raise InputError(f"--clips {clips}: neither a folder of real clips nor a .csv/.jsonl list")
    jobs = []
    for row in rows:
        for need in ("clip", "identity"):
            if need not in row:
                raise InputError(f"{clips}, line {row.get('line')}: no '{need}'")
        try:
            seed = None if row.get("seed") is None else int(row["seed"])
        except ValueError:
            raise InputError(f"{clips}, line {row.get('line')}: seed {row['seed']!r} is not an integer") from None
        files = {k: row[k] for k in ROLES if k in row}
        jobs.append(Job(name=str(row.get("name") or Path(row["clip"]).stem), files=files, seed=seed,
                        cost=video_cost(files["clip"], frame_num, area)))
    check_names(jobs, str(clips))
    check_files(jobs, str(clips))
    return jobs


def marker_path(root, name: str) -> Path:
    return Path(root) / MARKERS / f"{name}.json"


def syncid_job(models: SyncIDModels, job: Job, root, settings: SyncIDSettings) -> str:
    """One clip -> its samples under ``root`` and its marker; -> a one-line description."""
    from dataclasses import replace

    s = settings if job.seed is None else replace(settings, seed=job.seed)
    real = VideoReader(job.files["clip"], max_frames=s.frame_num)
    identity = read_image(job.files["identity"])
    real_identity = read_image(job.files["real_identity"]) if "real_identity" in job.files else None
    source = {"video": job.files["clip"], "identity": job.files["identity"],
              "pipeline": "SyncID-Pipe command line (syncid-batch)"}
    reports = synthesize_clip(models, real, identity, root, job.name, s, real_identity=real_identity, fps=real.fps,
                              source=source)
    record = {"name": job.name, "files": job.files, "seed": s.seed,
              "samples": {r.name: {"status": r.status, "reason": r.reason} for r in reports}}
    atomic_write(marker_path(root, job.name),
                 lambda tmp: Path(tmp).write_text(json.dumps(record, indent=1), encoding="utf-8"))
    return summary(reports).splitlines()[0]


def load_syncid_models(mesh: Mesh, models_dir, dit=None, ivs=None, vae=None, text_encoder=None, tokenizer=None,
                       context=None, landmarker=None, insightface_dir=None, insightface_pack: str = "antelopev2",
                       provider: str = "CPU", sam2=None, weight_dtype: str = "bf16", device="cpu") -> SyncIDModels:
    """Every model of a SyncID-Pipe run on this process: explicit files, else found in ``models_dir`` (laid out like
    ComfyUI/models). Everything missing is named in one error. The text context is made once, on rank 0."""
    import torch

    from ..errors import DreamIDVError
    from ..models import vae as vae_module
    from ..pipelines.text_context import get_text_context, load_precomputed_context
    from ..preprocess import identity as id_core
    from ..preprocess.pose.mediapipe_face import FaceLandmarker
    from ..weights.checkpoints import load_dit, load_ivs
    from ..weights.model_files import find_model_files, format_missing
    from .similarity import analyzer_encoder

    found = find_model_files(models_dir)
    dit, ivs, vae = dit or found.path("dit"), ivs or found.path("ivs"), vae or found.path("vae")
    landmarker = landmarker or found.path("face_landmarker")
    enc = found["text_encoder"]
    text_encoder = text_encoder or (enc.found[0] if enc.found else None)
    missing = [n for n, v in (("the DreamID-V DiT", dit),
                              ("an IVS (not released: train one with training/configs/ivs_from_dreamidv.toml)", ivs),
                              ("the VAE", vae), ("the MediaPipe face landmarker", landmarker)) if v is None]
    if text_encoder is None and context is None:
        missing.append("the umT5 text encoder (or a precomputed --context)")
    pack = None
    try:
        pack = id_core.find_pack([str(insightface_dir or Path(models_dir) / "insightface")], insightface_pack)
    except DreamIDVError as exc:
        missing.append(f"the insightface pack {insightface_pack} (ArcFace, for the identity check: {exc})")
    if missing:
        raise DreamIDVError("syncid-batch needs " + "; ".join(missing) + ".\n" + format_missing(found))
    device = torch.device(mesh.device if mesh.active else device)

    def make_context():
        if context:
            return load_precomputed_context(context)
        return get_text_context(text_encoder, tokenizer, device=device)

    ctx = mesh.run_on_main(make_context, "making the text context")
    predictor = None
    if sam2:
        from ..preprocess.segmentation import load_video_predictor

        predictor = load_video_predictor(sam2, "auto", device=device)
    analyzer = id_core.load_analyzer(pack, provider)
    return SyncIDModels(dit=load_dit(dit, weight_dtype=weight_dtype, device=device),
                        ivs=load_ivs(ivs, weight_dtype=weight_dtype, device=device)[0],
                        vae=vae_module.load_wan_vae(vae, device=device), context=ctx.to(device),
                        landmarker=FaceLandmarker(str(landmarker)), encoder=analyzer_encoder(analyzer), sam2=predictor)


def run_syncid_batch(mesh: Mesh, models: Optional[SyncIDModels], jobs: List[Job], root, settings: SyncIDSettings,
                     log: Callable[[str], None] = say,
                     load: Optional[Callable[[], SyncIDModels]] = None) -> Optional[BatchReport]:
    """Every clip without a marker, spread over the ranks (one rank per clip); ``models``, or ``load()`` to load
    them only when some clip is left to do. Report on rank 0."""
    if mesh.group_size != 1:
        raise InputError("syncid-batch runs one clip per rank (data parallel): drop --ulysses / --cfg-parallel")
    pending, finished = plan_jobs(mesh, jobs, lambda j: marker_path(root, j.name).is_file())
    loaded = pending and models is None
    if loaded:
        models = load()
    try:
        return run_jobs(mesh, pending, lambda j: syncid_job(models, j, root, settings), finished, log=log,
                        what="clips")
    finally:
        if loaded:
            models.close()
