"""Face swaps from the command line on several processes: one clip on a group of ranks, or many clips over groups.

* :func:`swap_jobs`: the jobs of a ``swap-batch`` run, from a folder of videos or a ``.csv``/``.jsonl`` list;
* :func:`load_swap_models`: the models on every rank (the DiT everywhere, sharded or offloaded if asked; the VAE
  on group leaders only; the text context made once on rank 0 and broadcast);
* :func:`swap_job`: one clip on this rank's group: the leader reads the files (and makes the pose and mask
  videos when none are given), every rank samples (:func:`.swap_parallel.swap_face_parallel`), the leader writes
  the video atomically (a hidden temporary renamed into place: an output that exists is complete);
* :func:`run_swap_batch`: every job whose output does not exist yet, balanced over the groups, a line per clip,
  a summary (:func:`dreamidv_core.parallel.batch.run_jobs`).

Each clip's seed is its own (``seed`` in the list) or the run's ``--seed``: results do not depend on how many
processes ran them, nor in which order.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, List, Optional

import torch

from ..errors import InputError
from ..io.audio import clip_rate_and_sound
from ..io.video import VideoReader, VideoWriter, read_image
from ..parallel.batch import (IMAGE_SUFFIXES, VIDEO_SUFFIXES, BatchReport, Job, check_files, check_names,
                              files_by_stem, leftover_partials, plan_jobs, read_job_table, run_jobs, say,
                              video_cost)
from ..parallel.mesh import Mesh
from .swap import SwapSettings
from .swap_parallel import swap_face_parallel

Extract = Callable[[object, object], tuple]  # (video, reference) -> (mask frames, pose frames)
ROLES = ("video", "reference", "mask", "pose")


# ------------------------------------------------------------------------------------------------ jobs

def swap_jobs(inputs, reference=None, frame_num: Optional[int] = None, area=(832, 480)) -> List[Job]:
    """The jobs of a batch: ``inputs`` is a folder or a list file.

    * folder: every video file (``.mp4 .mov .mkv .avi .webm .m4v``) is a clip; its reference is the image with
      the same name (``clip.mp4`` + ``clip.png``/``.jpg``/...) or, failing that, ``reference`` (one face for
      every clip); pose and mask videos are made with MediaPipe;
    * ``.csv`` (header row) or ``.jsonl``: fields ``video``, ``reference`` (or the run's ``reference``), and
      optionally ``mask`` + ``pose`` (your own pose and mask videos), ``name`` (output name; default the video's
      name) and ``seed``. Relative paths are relative to the list.

    Outputs are ``<name>.mp4``. Jobs are checked (files exist, names unique) before anything runs.
    """
    inputs = Path(inputs)
    if inputs.is_dir():
        videos = files_by_stem(inputs, VIDEO_SUFFIXES)
        images = files_by_stem(inputs, IMAGE_SUFFIXES)
        if not videos:
            raise InputError(f"{inputs}: no video files ({', '.join(VIDEO_SUFFIXES)}) in this folder")
        rows = [{"video": str(v), **({"reference": str(images[s])} if s in images else {}), "name": s}
                for s, v in videos.items()]
    elif inputs.is_file():
        rows = read_job_table(inputs, ROLES)
    else:
        raise InputError(f"--inputs {inputs}: neither a folder of videos nor a .csv/.jsonl job list")
    jobs, lacking = [], []
    for row in rows:
        if "video" not in row:
            raise InputError(f"{inputs}, line {row.get('line')}: no 'video'")
        if "reference" not in row:
            if reference is None:
                lacking.append(Path(row["video"]).name)
                continue
            row["reference"] = str(reference)
        if "pose" in row and "mask" not in row:
            raise InputError(f"{inputs}, line {row.get('line')}: a 'pose' without a 'mask'; give both (your own pose "
                             "and mask videos) or neither (made with MediaPipe)")
        seed = row.get("seed")
        try:
            seed = None if seed is None else int(seed)
        except ValueError:
            raise InputError(f"{inputs}, line {row.get('line')}: seed {seed!r} is not an integer") from None
        files = {k: row[k] for k in ROLES if k in row}
        name = str(row.get("name") or Path(row["video"]).stem)
        jobs.append(Job(name=name, files=files, seed=seed, cost=video_cost(files["video"], frame_num, area)))
    if lacking:
        raise InputError(f"{inputs}: no reference face for {', '.join(lacking[:10])}"
                         f"{' ...' if len(lacking) > 10 else ''}: put an image with the same name beside each video "
                         "(clip.mp4 + clip.png) or give one --reference for all")
    check_names(jobs, str(inputs))
    check_files(jobs, str(inputs))
    return jobs


# ------------------------------------------------------------------------------------------------ models

@dataclass
class SwapModels:
    """dit: on every rank; vae: on group leaders (None elsewhere); context: the text context [L, 4096] (CPU)."""

    dit: torch.nn.Module
    vae: Optional[object]
    context: torch.Tensor


def load_swap_models(mesh: Mesh, dit_path, vae_path, context_fn: Callable[[], torch.Tensor], weight_dtype="bf16",
                     attention="sdpa", device="cpu", offload_blocks: int = 0, settings: Optional[SwapSettings] = None,
                     log: Callable[[str], None] = say) -> SwapModels:
    """Load what every rank needs (module docstring). ``device``: used by a single process only (under torchrun
    every rank takes ``cuda:LOCAL_RANK``, or the CPU). ``context_fn()`` runs on rank 0 only. The parallel layout
    is checked against the model (heads) and the ``settings`` (guidance, step cache) before anything heavy."""
    from ..models import vae as vae_module
    from ..weights.checkpoints import SWAP_VARIANTS, load_dit

    device = torch.device(mesh.device if mesh.active else device)
    config = mesh.config
    s = settings or SwapSettings()
    config.check(guidance=s.guidance, batch_guidance=s.batch_guidance, offload_blocks=offload_blocks,
                 step_cache=s.step_cache)
    context = mesh.run_on_main(context_fn, "making the text context")
    offload = offload_blocks and device.type == "cuda"
    if mesh.is_main:
        where = (f"each of the {mesh.world} processes ({'cuda:LOCAL_RANK' if device.type == 'cuda' else 'CPU'}; the "
                 f"VAE on each group's leader)") if mesh.active else device
        log(f"loading {dit_path} ({weight_dtype}) and {vae_path} on {where}")
    # FSDP and block offload start from the CPU: only the rank's share (or the resident part) reaches the device
    dit = load_dit(dit_path, weight_dtype=weight_dtype, device="cpu" if (config.fsdp or offload) else device,
                   attention_backend=attention, variants=SWAP_VARIANTS)
    config.check(num_heads=dit.cfg.num_heads)
    if config.fsdp:
        from ..parallel.fsdp import shard_for_inference

        shard_for_inference(dit, device, mesh.groups, mesh.group_size)
    elif offload:
        from ..sampling.offload import enable_block_offload

        described = enable_block_offload(dit, offload_blocks, device).describe()
        if mesh.is_main:
            log(described)
    vae = vae_module.load_wan_vae(vae_path, device=device) if mesh.is_leader else None
    return SwapModels(dit=dit, vae=vae, context=context)


# ------------------------------------------------------------------------------------------------ one clip

def _open_inputs(job: Job, settings: SwapSettings, extract: Optional[Extract]):
    """The leader's readers of a job's files -> (video, mask, pose, reference, fps)."""
    files = job.files
    video = VideoReader(files["video"], max_frames=settings.frame_num)
    reference = read_image(files["reference"])
    if "mask" in files:
        mask = VideoReader(files["mask"], max_frames=settings.frame_num)
        pose = VideoReader(files["pose"], max_frames=settings.frame_num) if "pose" in files else None
    elif extract is None:
        raise InputError(f"{job.name}: no mask video given and no MediaPipe face landmarker to make one")
    else:
        mask, pose = extract(video, reference)
    return video, mask, pose, reference, video.fps


def swap_job(mesh: Mesh, models: SwapModels, job: Job, output, settings: SwapSettings,
             extract: Optional[Extract] = None, fps: Optional[float] = None, progress=None,
             sound: bool = True) -> str:
    """Swap one job's clip on this rank's group and write ``output`` (leader) -> a one-line description.
    Called by every rank of the group. ``fps``: the output's rate (default the source's, exactly, with the
    source's sound unless ``sound`` is False)."""
    output = Path(output)
    s = settings if job.seed is None else replace(settings, seed=job.seed)
    opened = mesh.run_on_leader(lambda: _open_inputs(job, s, extract), f"reading the files of {job.name}")
    if not mesh.is_leader:
        res = swap_face_parallel(mesh, models.dit, None, None, None, None, None, settings=s)
        return f"{res.frames_used} frames"
    video, mask, pose, reference, _ = opened
    rate, audio = clip_rate_and_sound(job.files["video"], video.probe, len(video), fps=fps, sound=sound)
    for stale in leftover_partials(output):  # from a run killed while writing this output
        stale.unlink(missing_ok=True)
    start = time.time()
    with VideoWriter(output, rate, audio=audio) as writer:

        def sink(frames, first):
            if first != writer.frames_written:
                raise RuntimeError(f"decoded frames arrive out of order ({first} after {writer.frames_written})")
            writer.write(frames.numpy())

        res = swap_face_parallel(mesh, models.dit, models.vae, video, mask, reference, models.context, pose=pose,
                                 settings=s, progress=progress, sink=sink)
    took = time.time() - start
    cached = f", {res.skipped} of {res.evaluations} evaluations skipped" if res.skipped else ""
    sound_note = ", with the source's sound" if audio is not None else ""
    return f"{res.frames_used} frames at {float(rate):g} fps{sound_note}, {took / max(res.frames_used, 1):.2f} s/frame{cached} -> {output}"


def swap_output(out_dir, job: Job) -> Path:
    return Path(out_dir) / f"{job.name}.mp4"


def run_swap_batch(mesh: Mesh, models: Optional[SwapModels], jobs: List[Job], out_dir, settings: SwapSettings,
                   extract: Optional[Extract] = None, fps: Optional[float] = None, log: Callable[[str], None] = say,
                   load: Optional[Callable[[], SwapModels]] = None, sound: bool = True) -> Optional[BatchReport]:
    """Every job whose ``<out_dir>/<name>.mp4`` does not exist yet (module docstring): a line per clip, a
    summary. ``models``, or ``load()`` to load them only when some clip is left to do. Returns the report on rank 0
    (None elsewhere)."""
    clash = [str(swap_output(out_dir, j)) for j in jobs
             if swap_output(out_dir, j).resolve() in {Path(f).resolve() for f in j.files.values()}]
    if clash:
        raise InputError(f"--out-dir {out_dir}: the output {clash[0]} would be one of its clip's input files"
                         f"{f' (and {len(clash) - 1} more)' if len(clash) > 1 else ''}; choose another --out-dir")
    pending, finished = plan_jobs(mesh, jobs, lambda j: swap_output(out_dir, j).is_file())
    if pending and models is None:
        models = load()
    return run_jobs(mesh, pending, lambda j: swap_job(mesh, models, j, swap_output(out_dir, j), settings, extract, fps,
                                                     sound=sound),
                    finished, log=log, what="clips")
