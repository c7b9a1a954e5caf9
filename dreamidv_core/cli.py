"""Command line: ``python -m dreamidv_core {swap,swap-batch,syncid-batch,convert,text-context,check-models,
identity-report,evaluate}``.

The swap needs no ComfyUI: it reads the weights from a folder laid out like ``ComfyUI/models``. Under ``torchrun``
``swap`` runs one clip on several processes (``--ulysses``, ``--cfg-parallel``, ``--dit-fsdp``) and
``swap-batch`` / ``syncid-batch`` spread many clips over them (:mod:`dreamidv_core.parallel`).
"""
from __future__ import annotations

import argparse
import sys
import time
from typing import Optional, Sequence

from .errors import DreamIDVError, InputError, numeric_problems


def _size(text: str):
    try:
        w, h = (int(v) for v in text.lower().replace("x", "*").split("*"))
        return w, h
    except ValueError:
        raise argparse.ArgumentTypeError(f"size must look like 832*480, got {text!r}") from None


def _device(name: str, option: str = "--device") -> str:
    """``auto`` -> cuda if available else cpu; anything else must name a device this PyTorch can use."""
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    choices = "use auto, cpu, cuda, cuda:N or mps"
    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError):
        raise InputError(f"{option} '{name}' is not a device; {choices}") from None
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise InputError(f"{option} '{name}': no CUDA GPU is usable here (a CPU-only PyTorch, or no GPU/driver "
                             "found); use --device cpu (or auto)")
        if dev.index is not None and dev.index >= count:
            raise InputError(f"{option} '{name}': there {'is' if count == 1 else 'are'} only {count} CUDA "
                             f"device{'s' if count > 1 else ''} (cuda:0{f' .. cuda:{count - 1}' if count > 1 else ''})")
    elif dev.type == "mps":
        if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise InputError(f"{option} '{name}': Apple MPS is not available here; use --device cpu (or auto)")
    elif dev.type != "cpu":
        raise InputError(f"{option} '{name}': {dev.type} devices are not supported; {choices}")
    return str(dev)


def _option_name(setting: str) -> str:
    """A SwapSettings field as the option that sets it."""
    return {"width": "--size (width)", "height": "--size (height)"}.get(setting, "--" + setting.replace("_", "-"))


def swap_settings(args):
    """The swap's settings from the command line (``swap``, ``swap-batch``, the parallel swap), every option
    checked before anything is read or computed (an InputError naming each bad option); ``swap``'s --out is
    checked too."""
    from .io.files import check_output_file
    from .pipelines.swap import SwapSettings

    problems = [p + " (leave --fps out to keep the source's frame rate)"
                for p in numeric_problems(str, ("--fps", args.fps, "float>?", 0, None))]
    problems += numeric_problems(str, ("--offload-blocks", args.offload_blocks, "int", 0, None))
    problems += numeric_problems(str, ("--start-frame", getattr(args, "start_frame", 0), "int", 0, None),
                                 ("--every-nth", getattr(args, "every_nth", 1), "int", 1, None))
    settings = SwapSettings(width=args.size[0], height=args.size[1], frame_num=args.frame_num, steps=args.steps,
                            shift=args.shift, guidance=args.guidance, seed=args.seed, sampler=args.sampler,
                            window=args.window, overlap=args.overlap, background_strength=args.background_strength,
                            step_cache=args.step_cache, batch_guidance=args.batch_guidance, vae_tile=args.vae_tile)
    try:
        settings.validate(label=_option_name)
    except InputError as exc:
        problems.append(str(exc).replace("invalid swap settings: ", ""))
    if problems:
        raise InputError("invalid options: " + "; ".join(problems))
    _device(args.device)
    if getattr(args, "out", None) is not None:  # swap-batch has --out-dir instead (checked by cmd_swap_batch)
        check_output_file(args.out, "--out")
    return settings


def resolve_swap_files(args):
    """Pick the DiT, VAE and text-context source from explicit paths or the models folder."""
    from .weights.model_files import FASTER_SWAP, SWAP, find_model_files, format_missing

    report = find_model_files(args.models_dir)
    purpose = FASTER_SWAP if args.faster else SWAP
    dit = args.dit or report.path("dit_faster" if args.faster else "dit")
    vae = args.vae or report.path("vae")
    enc_status = report["text_encoder"]
    encoder = args.text_encoder or (enc_status.found[0] if enc_status.found else None)
    tokenizer = args.tokenizer or (enc_status.found[1] if enc_status.found and len(enc_status.found) > 1 else None)
    missing = [name for name, value in (("DiT", dit), ("VAE", vae)) if value is None]
    if encoder is None and args.context is None:
        missing.append("text encoder")
    if missing:
        raise DreamIDVError(f"missing model files ({', '.join(missing)}).\n"
                            + format_missing(report, include_optional=False) + f"\n(purpose: {purpose})")
    return dit, vae, encoder, tokenizer


def cmd_swap(args) -> int:
    if parallel_swap_requested(args):  # under torchrun, or a parallel flag: one clip on a group of processes
        return cmd_swap_parallel(args)
    import torch

    from .weights.checkpoints import SWAP_VARIANTS, load_dit
    from .pipelines.swap import swap_face
    from .pipelines.text_context import get_text_context, load_precomputed_context
    from .models.vae import load_wan_vae
    from .io.video import VideoReader, VideoWriter, read_image

    settings = swap_settings(args)
    dit_path, vae_path, encoder, tokenizer = resolve_swap_files(args)
    device = _device(args.device)
    # the videos are read lazily and the output written as it is decoded: memory does not grow with the clip
    video = VideoReader(args.video)
    plan = range_plan(args, video)
    clip = plan.select(video)  # the frames of the range (--start-frame, --every-nth, --frame-num), lazily
    rate, audio = output_rate_and_sound(args, video, plan)
    reference = read_image(args.reference)
    present = None
    if args.mask:
        if args.target != "largest" or args.target_photo:
            raise DreamIDVError("--target / --target-photo choose the person when the mask is made here; with --mask "
                                "the mask already marks the person to swap")
        mask, pose = (None if path is None else _same_length(VideoReader(path), video) for path in (args.mask,
                                                                                                   args.pose))
        mask, pose = plan.select(mask), None if pose is None else plan.select(pose)
    else:
        mask, pose, present = extract_pose_and_mask(args, clip, reference)
    if args.face_crop:
        plan = face_crop_range_plan(args, plan, len(video), mask)
        print(plan.track.describe())
    if args.context:
        context = load_precomputed_context(args.context)
    else:
        print(f"text context from {encoder} (cached after the first run)")
        context = get_text_context(encoder, tokenizer, device=device)
    print(f"loading {dit_path} ({args.weight_dtype}) and {vae_path} on {device}")
    offload = args.offload_blocks and torch.device(device).type == "cuda"
    # with block offload the weights are read to the CPU and only the resident part moves to the GPU
    dit = load_dit(dit_path, weight_dtype=args.weight_dtype, device="cpu" if offload else device,
                   attention_backend=args.attention, variants=SWAP_VARIANTS)
    vae = load_wan_vae(vae_path, device=device)
    if offload:
        from .sampling.offload import enable_block_offload

        print(enable_block_offload(dit, args.offload_blocks, device).describe())
    start = time.time()

    def progress(stage, i, n):
        print(f"\r{stage} {i}/{n}  {time.time() - start:6.1f}s", end="\n" if i == n else "", flush=True)

    with VideoWriter(args.out, rate, audio=audio) as writer:
        sink = output_sink(writer, clip, plan, present)
        result = swap_face(dit, vae, clip, mask, reference, context.to(device), pose=pose, settings=settings,
                           progress=progress, sink=sink, plan=plan)
    size = "{}x{}".format(*plan.source_size) if plan.track is not None else f"{plan.size[1]}x{plan.size[0]}"
    print(f"wrote {args.out}: {result.frames_used} frames {size} at {float(rate):g} fps"
          + (", with the source's sound" if audio is not None else ", no sound"))
    return 0


def _same_length(reader, video):
    if len(reader) != len(video):
        raise DreamIDVError(f"{reader.name}: has {len(reader)} frames but the video {video.name} has {len(video)}; "
                            "they must have the same length")
    return reader


def output_rate_and_sound(args, video, plan):
    """The output's frame rate (the source's exactly, divided by --every-nth; or --fps) and the source's sound
    over the swapped frames (:func:`~dreamidv_core.io.audio.clip_rate_and_sound`)."""
    from .io.audio import clip_rate_and_sound

    rate, audio = clip_rate_and_sound(args.video, video.probe, plan.frames, plan.start, plan.stride, args.fps,
                                      not args.no_audio)
    if audio is None and args.fps and video.probe.has_audio and not args.no_audio:
        print(f"note: --fps {args.fps:g} plays the clip at another speed than the source's "
              f"{float(video.rate / plan.stride):g} fps; its sound is left out")
    return rate, audio


def range_plan(args, video):
    """The whole-frame plan of the frame range: --start-frame, every --every-nth frame, at most --frame-num."""
    from .pipelines.plan import ClipPlan

    return ClipPlan.build(video.probe.width, video.probe.height, len(video), args.frame_num, *args.size,
                          args.window, args.overlap, start=args.start_frame, stride=args.every_nth)


def face_crop_range_plan(args, plan, available: int, mask):
    """``--face-crop``: windows around the face of ``mask`` (the range's frames), pasted back per frame."""
    from .pipelines.plan import face_crop_plan

    return face_crop_plan(mask, *plan.source_size, available, args.frame_num, *args.size, args.window, args.overlap,
                          margin=args.crop_margin, start=plan.start, stride=plan.stride)


def output_sink(writer, clip, plan, present):
    """Where decoded frames go (``clip``: the range's source frames): in face-crop mode pasted back into the
    full-resolution source frames (the output has the source's size); whole frame: written at the model's
    size as released, except frames without the target (``present`` False), which are the source frame
    prepared the same way."""
    import torch

    from .pipelines.clip_stream import FrameSource
    from .io.video import to_uint8_frames

    source = FrameSource(clip, plan, "video") if plan.track is None else None

    def sink(frames, start):
        if start != writer.frames_written:
            raise RuntimeError(f"decoded frames arrive out of order ({start} after {writer.frames_written})")
        if plan.track is not None:
            src = torch.from_numpy(to_uint8_frames(clip[start:start + frames.shape[0]], "video")).float().div_(255)
            frames = plan.paste_back(src, frames, start)
        elif present is not None:
            frames = frames.clone()
            for k in range(frames.shape[0]):
                if not present[start + k]:
                    frames[k] = source(start + k, start + k + 1)[:, 0].permute(1, 2, 0)
        writer.write(frames.numpy())

    return sink


def extract_pose_and_mask(args, video, reference):
    """Pose video and face mask of the target person from the driving video with MediaPipe, retargeted onto
    the reference -> (mask, pose, per-frame presence of the target); pose and mask are drawn on demand from
    the keypoints (a few frames in memory at a time, however long the clip)."""
    from .weights.model_files import find_model_files, format_missing
    from .preprocess.pose.extract import track_mediapipe
    from .preprocess.pose.mediapipe_face import FaceLandmarker

    report = find_model_files(args.models_dir)
    task = args.landmarker or report.path("face_landmarker")
    if task is None:
        raise DreamIDVError("no --mask given and no MediaPipe face landmarker to make one.\n" + format_missing(report))
    spec, embed_face = target_choice(args, report)
    print(f"pose and mask from the video with {task} (target: {args.target})")
    with FaceLandmarker(str(task), num_faces=MAX_REFERENCE_FACES) as finder:
        ref_face = choose_reference_face(finder.detect_all(reference), args.reference_face, reference.shape)
    with FaceLandmarker(str(task), num_faces=MAX_FACES, tile_levels=args.small_faces) as landmarker:
        track = track_mediapipe(video, landmarker, reference=ref_face, target=spec, embed_face=embed_face)
    print(track.info)
    return track.mask, track.pose, track.present


MAX_FACES = 6  # faces looked for per frame; all are tracked and the target is chosen among them


def target_choice(args, report):
    """--target, --target-index, --target-photo, --min-similarity -> (TargetSpec, ArcFace embedder or None).
    ArcFace (the insightface pack, --insightface or found in the models folder) is used when there is one."""
    from .io.video import read_image
    from .preprocess.tracking import TargetSpec, analyzer_embedder, analyzer_photo_embedding

    pack = args.insightface or report.path("insightface")
    analyzer = None
    if pack is not None:
        from .preprocess.identity import load_analyzer

        try:
            analyzer = load_analyzer(pack)
        except DreamIDVError as exc:
            if args.target == "similar" or args.insightface:
                raise
            print(f"ArcFace unavailable ({exc}); people are re-identified by position, size and motion")
    if args.target == "similar":
        if not args.target_photo:
            raise DreamIDVError("--target similar needs --target-photo (a photo of the person to swap)")
        if analyzer is None:
            raise DreamIDVError("--target similar compares faces with ArcFace: put an insightface pack (antelopev2 or "
                                f"buffalo_l) in {args.models_dir}/insightface/models/ or pass --insightface")
    embedding = None
    if args.target == "similar":
        embedding = analyzer_photo_embedding(analyzer, read_image(args.target_photo))
    spec = TargetSpec(args.target, args.target_index, embedding, args.min_similarity, args.bridge_frames)
    return spec, (analyzer_embedder(analyzer) if analyzer is not None else None)


MAX_REFERENCE_FACES = 8


def _reference_face_choice(text: str):
    if text == "largest":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--reference-face must be 'largest' or a face number (0 = leftmost), "
                                         f"got {text!r}") from None


def choose_reference_face(faces, choice, image_shape):
    """The reference photo's face whose shape the pose is retargeted onto: ``choice`` 'largest' or an index
    (0 = leftmost); says which face was used when the photo holds several."""
    from .preprocess.identity import choose_face, sort_left_to_right
    from .preprocess.identity_bundle import FaceBox

    if not faces:
        raise InputError("--reference: no face found by the MediaPipe face landmarker; use a photo with a clearly "
                         "visible face")
    h, w = image_shape[:2]
    found = [FaceBox(bbox=(float(f.landmarks[:, 0].min() * w), float(f.landmarks[:, 1].min() * h),
                           float(f.landmarks[:, 0].max() * w), float(f.landmarks[:, 1].max() * h)), score=1.0)
             for f in faces]
    boxes = sort_left_to_right(found)
    faces = [faces[next(i for i, b in enumerate(found) if b is box)] for box in boxes]
    mode, index = ("largest", 0) if choice == "largest" else ("index", int(choice))
    if mode == "index" and not 0 <= index < len(boxes):
        raise InputError(f"--reference-face {index}: the reference photo has {len(boxes)} face"
                         f"{'s' if len(boxes) > 1 else ''} (0 = leftmost, up to {len(boxes) - 1})")
    chosen = choose_face(boxes, mode, index, what="--reference photo").index
    if len(boxes) > 1:
        listed = "; ".join(f"face {i} at x {b.bbox[0]:.0f}-{b.bbox[2]:.0f}, y {b.bbox[1]:.0f}-{b.bbox[3]:.0f}"
                           for i, b in enumerate(boxes))
        how = "the largest; --reference-face N picks another" if mode == "largest" else "--reference-face"
        print(f"reference photo: {len(boxes)} faces found, left to right ({listed}); using face {chosen} ({how}) "
              "for the expression retargeting. The model sees the whole photo: crop it to that face for the "
              "cleanest identity")
    return faces[chosen]


def cmd_convert(args) -> int:
    from .weights.checkpoints import convert_to_safetensors

    summary = convert_to_safetensors(args.src, args.dst, dtype=args.dtype)
    print(", ".join(f"{k}: {v}" for k, v in summary.items()))
    return 0


def cmd_text_context(args) -> int:
    from .io.state_dict import save_safetensors
    from .pipelines.text_context import DEFAULT_PROMPT, get_text_context

    context = get_text_context(args.text_encoder, args.tokenizer, prompt=args.prompt or DEFAULT_PROMPT,
                               device=_device(args.device))
    if args.out:
        save_safetensors({"context": context.contiguous()}, args.out)
        print(f"wrote {args.out}: context {list(context.shape)}")
    else:
        print(f"context {list(context.shape)} cached")
    return 0


def cmd_check_models(args) -> int:
    from .weights.model_files import main as check_main

    return check_main(["--models-dir", args.models_dir] + (["--strict"] if args.strict else []))


# ------------------------------------------------------------------------------------------------ several processes
def parallel_swap_requested(args) -> bool:
    from .parallel.process import torchrun_world

    return torchrun_world() > 1 or args.ulysses > 1 or args.cfg_parallel or args.dit_fsdp


def _parallel_config(args):
    from .parallel.mesh import ParallelConfig

    return ParallelConfig(ulysses=args.ulysses, cfg_parallel=args.cfg_parallel, fsdp=args.dit_fsdp)


def _swap_models(args, mesh):
    """The swap's models on every rank of a torchrun job (pipelines.swap_batch.load_swap_models)."""
    from .pipelines.swap_batch import load_swap_models
    from .pipelines.text_context import get_text_context, load_precomputed_context

    dit_path, vae_path, encoder, tokenizer = resolve_swap_files(args)
    device = _device(args.device)
    if mesh.active and args.device != "auto" and mesh.is_main:
        print(f"--device {args.device} is ignored under torchrun: each process takes cuda:LOCAL_RANK (or the CPU)")

    def context():
        if args.context:
            return load_precomputed_context(args.context)
        print(f"text context from {encoder} (cached after the first run)")
        return get_text_context(encoder, tokenizer, device=device if not mesh.active else mesh.device)

    return load_swap_models(mesh, dit_path, vae_path, context, weight_dtype=args.weight_dtype, attention=args.attention,
                            device=device, offload_blocks=args.offload_blocks, settings=swap_settings(args))


def _refuse_face_crop(args) -> None:
    if getattr(args, "face_crop", False):
        raise DreamIDVError("--face-crop is not available with several processes or swap-batch yet: run the swap "
                            "in one process (without --ulysses / --cfg-parallel / torchrun)")
    if getattr(args, "start_frame", 0) or getattr(args, "every_nth", 1) != 1:
        raise DreamIDVError("--start-frame / --every-nth are not available with several processes or swap-batch yet "
                            "(--frame-num is): run the swap in one process (without --ulysses / --cfg-parallel / "
                            "torchrun)")


def _extractor(args):
    """(video, reference) -> (mask, pose) with MediaPipe (the tracked target), for clips given without mask and
    pose videos. Frames without the target get an empty mask (they are swapped, not copied, in these modes)."""
    return lambda video, reference: extract_pose_and_mask(args, video, reference)[:2]


def cmd_swap_parallel(args) -> int:
    """``swap`` on a group of processes: ``torchrun --nproc_per_node=N -m dreamidv_core swap ... --ulysses U
    [--cfg-parallel] [--dit-fsdp]`` with N = U (x 2 with --cfg-parallel)."""
    _refuse_face_crop(args)
    swap_settings(args)  # the options and --out checked before the processes load anything
    from .parallel.batch import Job
    from .parallel.mesh import init_mesh
    from .pipelines.swap_batch import swap_job

    files = {"video": args.video, "reference": args.reference}
    files.update({k: getattr(args, k) for k in ("mask", "pose") if getattr(args, k)})
    with init_mesh(_parallel_config(args), one_job=True) as mesh:
        models = _swap_models(args, mesh)
        start = time.time()

        def progress(stage, i, n):
            print(f"\r{stage} {i}/{n}  {time.time() - start:6.1f}s", end="\n" if i == n else "", flush=True)

        if mesh.is_main:
            print(f"swapping on {mesh.world} process{'es' if mesh.world > 1 else ''}: {mesh.config.describe()}")
        note = swap_job(mesh, models, Job("clip", files), args.out, swap_settings(args),
                        extract=None if args.mask else _extractor(args), fps=args.fps, progress=progress,
                        sound=not args.no_audio)
        if mesh.is_main:
            print(f"wrote {args.out}: {note.split(' -> ')[0]}")
    return 0


def cmd_swap_batch(args) -> int:
    """Many clips over the processes: a line per clip, a summary; rerun to continue an interrupted run."""
    _refuse_face_crop(args)
    from .io.files import ensure_folder
    from .parallel.mesh import init_mesh
    from .pipelines.swap_batch import run_swap_batch, swap_jobs

    swap_settings(args)  # the options and --out-dir checked before the processes load anything
    ensure_folder(args.out_dir, "--out-dir")

    with init_mesh(_parallel_config(args)) as mesh:
        jobs = mesh.run_on_main(lambda: swap_jobs(args.inputs, args.reference, args.frame_num, args.size),
                                f"reading the jobs of {args.inputs}")
        report = run_swap_batch(mesh, None, jobs, args.out_dir, swap_settings(args), extract=_extractor(args),
                                fps=args.fps, load=lambda: _swap_models(args, mesh), sound=not args.no_audio)
    return 1 if report is not None and report.failed else 0


def cmd_syncid_batch(args) -> int:
    """The SyncID-Pipe over a folder of real clips, one clip per process (data parallel)."""
    import torch

    from .io.files import ensure_folder
    from .parallel.mesh import init_mesh
    from .synthesis.batch import run_syncid_batch, syncid_jobs

    _check_syncid_options(args)  # the options and --out-dir checked before the processes load anything
    ensure_folder(args.out_dir, "--out-dir")
    with init_mesh() as mesh:
        jobs = mesh.run_on_main(lambda: syncid_jobs(args.clips, args.identities, args.frame_num, args.size),
                                f"reading the jobs of {args.clips}")
        with torch.no_grad():
            report = run_syncid_batch(mesh, None, jobs, args.out_dir, _syncid_settings(args),
                                      load=lambda: _syncid_models(args, mesh))
    return 1 if report is not None and report.failed else 0


def _check_syncid_options(args) -> None:
    """syncid-batch's numbers and device, each bad one named (an InputError) before any work."""
    from .models.frame_grid import MIN_FRAMES
    from .sampling.samplers import SAMPLERS

    problems = numeric_problems(
        str, ("--steps", args.steps, "int", 1, None), ("--shift", args.shift, "float>", 0, None),
        ("--guidance", args.guidance, "float", None, None), ("--ivs-guidance", args.ivs_guidance, "float", None, None),
        ("--seed", args.seed, "int", None, None), ("--size (width)", args.size[0], "int", 1, None),
        ("--size (height)", args.size[1], "int", 1, None), ("--frame-num", args.frame_num, "int?", MIN_FRAMES, None),
        ("--window", args.window, "int", MIN_FRAMES, None), ("--overlap", args.overlap, "int", 0, None),
        ("--similarity-stride", args.similarity_stride, "int", 1, None))
    if args.sampler not in SAMPLERS:
        problems.append(f"--sampler must be one of {', '.join(SAMPLERS)}, got {args.sampler!r}")
    if problems:
        raise InputError("invalid options: " + "; ".join(problems))
    _device(args.device)


def _syncid_settings(args):
    from .synthesis.pipeline import SyncIDSettings
    from .synthesis.writer import DIRECTIONS, QuadrupletSettings

    low, high = args.min_identity_target, args.max_identity_driving
    writer = QuadrupletSettings(directions=DIRECTIONS if args.directions == "both" else (args.directions,),
                                min_identity_target=None if low <= -1 else low,
                                max_identity_driving=None if high >= 1 else high,
                                similarity_stride=args.similarity_stride)
    return SyncIDSettings(width=args.size[0], height=args.size[1], frame_num=args.frame_num, steps=args.steps,
                          shift=args.shift, identity_guidance=args.guidance, ivs_guidance=args.ivs_guidance,
                          seed=args.seed, sampler=args.sampler, window=args.window, overlap=args.overlap,
                          background_mode=args.background_mode, writer=writer)


def _syncid_models(args, mesh):
    from .synthesis.batch import load_syncid_models

    return load_syncid_models(mesh, args.models_dir, dit=args.dit, ivs=args.ivs, vae=args.vae,
                              text_encoder=args.text_encoder, tokenizer=args.tokenizer, context=args.context,
                              landmarker=args.landmarker, insightface_dir=args.insightface_dir,
                              insightface_pack=args.insightface_pack, provider=args.provider, sam2=args.sam2,
                              weight_dtype=args.weight_dtype, device=_device(args.device))


def add_parallel_options(parser) -> None:
    parser.add_argument("--ulysses", "--ulysses-size", type=int, default=1, metavar="N",
                        help="sequence parallelism: each clip's tokens split over N processes (N divides the 12 heads: "
                             "2, 3, 4, 6, 12); under torchrun")
    parser.add_argument("--cfg-parallel", action="store_true",
                        help="the two identity-guidance passes on two processes (doubles the processes per clip)")
    parser.add_argument("--dit-fsdp", action="store_true",
                        help="shard the DiT blocks' weights over the processes of a clip (FSDP): less memory per GPU")


def options_of(parser, skip=(), only=None) -> argparse.ArgumentParser:
    """A parent parser with ``parser``'s options (``only`` those named, if given) except those in ``skip``."""
    parent = argparse.ArgumentParser(add_help=False)
    for action in parser._actions:
        names = set(action.option_strings)
        if names and not names & set(skip) and (only is None or names & set(only)) \
                and not isinstance(action, argparse._HelpAction):
            parent._add_action(action)
    return parent


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m dreamidv_core", description="DreamID-V video face swap")
    sub = ap.add_subparsers(dest="command", required=True)

    sw = sub.add_parser("swap", help="swap the face in a video for the face in a photo")
    sw.add_argument("--video", required=True, help="the driving video")
    sw.add_argument("--reference", required=True, help="a photo of the new face")
    sw.add_argument("--mask", help="face-mask video of the driving video (white face on black); "
                                   "default: made with MediaPipe, as is the pose video")
    sw.add_argument("--pose", help="pose video of the driving video (with --mask; required by the full model)")
    sw.add_argument("--landmarker", help="MediaPipe face_landmarker .task (default: found in <models-dir>/mediapipe)")
    sw.add_argument("--reference-face", type=_reference_face_choice, default="largest",
                    help="with several faces in the reference photo: 'largest' (default) or the face number, "
                         "0 = leftmost (the pose is retargeted onto that face; the choice is printed)")
    sw.add_argument("--out", required=True, help="output .mp4")
    sw.add_argument("--models-dir", default="models", help="a folder laid out like ComfyUI/models")
    sw.add_argument("--dit", help="DiT checkpoint (default: found in <models-dir>/diffusion_models)")
    sw.add_argument("--vae", help="Wan 2.1 VAE (default: found in <models-dir>/vae)")
    sw.add_argument("--text-encoder", help="umT5-XXL file (default: found in <models-dir>/text_encoders)")
    sw.add_argument("--tokenizer", help="umT5 tokenizer (folder or spiece.model), for the official .pth encoder")
    sw.add_argument("--context", help="precomputed text context (.safetensors or the official context.pth)")
    sw.add_argument("--faster", action="store_true", help="use dreamidv_faster (no pose branch)")
    sw.add_argument("--size", type=_size, default=(832, 480), help="maximum area as W*H, e.g. 832*480 or 1280*720")
    sw.add_argument("--frame-num", type=int, help="swap at most N frames (default: the whole clip, or range)")
    sw.add_argument("--start-frame", type=int, default=0, help="skip the first N frames of the video")
    sw.add_argument("--every-nth", type=int, default=1,
                    help="swap every n-th frame (the result plays at the source's rate / n, with its sound)")
    sw.add_argument("--steps", type=int, default=20)
    sw.add_argument("--shift", type=float, default=5.0)
    sw.add_argument("--guidance", type=float, default=4.0, help="identity guidance scale")
    sw.add_argument("--seed", type=int, default=0)
    sw.add_argument("--sampler", default="unipc", choices=("unipc", "euler"))
    sw.add_argument("--window", type=int, default=81, help="frames per window (4n+1); longer clips use overlapping windows")
    sw.add_argument("--overlap", type=int, default=16, help="frames shared by neighbouring windows (multiple of 4)")
    sw.add_argument("--background-strength", type=float, default=0.0,
                    help="0..1: keep the latent outside the face mask at the source's during sampling")
    sw.add_argument("--step-cache", type=float, default=0.0, help="skip barely-changing DiT evaluations (threshold; 0 = off)")
    sw.add_argument("--batch-guidance", action="store_true", help="both guidance passes in one batch (more memory)")
    sw.add_argument("--offload-blocks", type=int, default=0, help="keep N transformer blocks in CPU RAM (GPU only)")
    sw.add_argument("--vae-tile", type=int, help="decode in spatial tiles of N latent pixels (8 px each)")
    sw.add_argument("--weight-dtype", default="bf16", choices=("fp32", "bf16", "fp16", "fp8_e4m3fn"))
    sw.add_argument("--attention", default="sdpa", choices=("sdpa", "flash", "sage"))
    sw.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    sw.add_argument("--fps", type=float, help="output frame rate (default: the source's, exactly)")
    sw.add_argument("--no-audio", action="store_true", help="leave the source's sound out of the result")
    sw.add_argument("--target", default="largest", choices=("largest", "index", "similar"),
                    help="the person to swap, chosen once for the clip and tracked: the largest face over the clip, "
                         "--target-index, or the face most similar to --target-photo (ArcFace)")
    sw.add_argument("--target-index", type=int, default=0,
                    help="with --target index: 0 = the leftmost person at first appearance")
    sw.add_argument("--target-photo", help="with --target similar: a photo of the person to swap")
    sw.add_argument("--min-similarity", type=float, default=0.3,
                    help="with --target similar: the least ArcFace similarity accepted (else an error)")
    sw.add_argument("--bridge-frames", type=int, default=3,
                    help="target misses of at most N frames keep its nearest pose and mask; longer absences are "
                         "passed through unchanged")
    sw.add_argument("--insightface", help="insightface pack folder for ArcFace (default: found in "
                                          "<models-dir>/insightface/models/)")
    sw.add_argument("--small-faces", type=int, default=0, choices=(0, 1, 2, 3),
                    help="also search MediaPipe tiles for faces down to ~1/6, 1/12, 1/24 of the frame's short side "
                         "(wide shots, 4K; slower)")
    sw.add_argument("--face-crop", action="store_true",
                    help="swap a window around the face at the model's resolution and paste it back into the "
                         "full-resolution frames (the output keeps the source's size)")
    sw.add_argument("--crop-margin", type=float, default=1.0,
                    help="with --face-crop: context around the face in face sizes on each side")
    sw.set_defaults(func=cmd_swap)
    add_parallel_options(sw)

    per_clip = ("--video", "--reference", "--mask", "--pose", "--out")
    sb = sub.add_parser("swap-batch", parents=[options_of(sw, per_clip)],
                        help="swap many clips, spread over the processes of a torchrun job; resumable",
                        description="Swap every clip of a folder or list. Under torchrun the processes form groups of "
                                    "--ulysses (x 2 with --cfg-parallel) ranks, each group swapping its share of the "
                                    "clips. Outputs are written atomically; a rerun skips the finished ones.")
    sb.add_argument("--inputs", required=True, help="a folder of videos (each with a same-named reference image, or "
                                                    "--reference) or a .csv/.jsonl list: video, reference, "
                                                    "[mask, pose, name, seed]")
    sb.add_argument("--reference", help="one face photo for every clip without its own")
    sb.add_argument("--out-dir", required=True, help="where <name>.mp4 go (existing ones are skipped)")
    sb.set_defaults(func=cmd_swap_batch)

    shared = ("--models-dir", "--dit", "--vae", "--text-encoder", "--tokenizer", "--context", "--landmarker", "--size",
              "--frame-num", "--steps", "--shift", "--guidance", "--seed", "--sampler", "--window", "--overlap",
              "--weight-dtype", "--device")
    sy = sub.add_parser("syncid-batch", parents=[options_of(sw, only=shared)],
                        help="SyncID-Pipe training data from a folder of real clips; resumable",
                        description="For every real clip: expression adaptation onto a new face I_g, DreamID-V on the "
                                    "first/last frames (--guidance), the IVS (--window, --overlap), background "
                                    "recomposition, then the forward and backward samples (training/DATASET.md). One "
                                    "clip per process under torchrun.")
    sy.add_argument("--clips", required=True, help="a folder of real clips or a .csv/.jsonl list: clip, identity, "
                                                   "[real_identity, name, seed]")
    sy.add_argument("--identities", help="with a folder of clips: a folder of new face images I_g (clip k gets face "
                                         "k mod their number)")
    sy.add_argument("--out-dir", required=True, help="the dataset folder")
    sy.add_argument("--ivs", help="IVS DiT (default: found in <models-dir>/diffusion_models: dreamidv_ivs.safetensors)")
    sy.add_argument("--insightface-dir", help="folder holding models/<pack> (default <models-dir>/insightface)")
    sy.add_argument("--sam2", help="SAM 2 checkpoint: grow the masks to the tracked head")
    sy.add_argument("--insightface-pack", default="antelopev2", choices=("antelopev2", "buffalo_l"))
    sy.add_argument("--provider", default="CPU", help="onnxruntime provider for ArcFace (CPU, CUDA)")
    sy.add_argument("--ivs-guidance", type=float, default=1.0, help="IVS text guidance (1: one pass)")
    sy.add_argument("--background-mode", default="plate", choices=("plate", "inpaint"))
    sy.add_argument("--directions", default="both", choices=("both", "forward", "backward"))
    sy.add_argument("--min-identity-target", type=float, default=0.3, help="reject below (-1: off)")
    sy.add_argument("--max-identity-driving", type=float, default=0.5, help="reject above (1: off)")
    sy.add_argument("--similarity-stride", type=int, default=1)
    sy.set_defaults(func=cmd_syncid_batch)

    cv = sub.add_parser("convert", help="convert an official .pth (DiT or VAE) to safetensors")
    cv.add_argument("src")
    cv.add_argument("dst")
    cv.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), help="cast the weight matrices")
    cv.set_defaults(func=cmd_convert)

    tc = sub.add_parser("text-context", help="encode the prompt once with umT5 and cache it")
    tc.add_argument("--text-encoder", required=True)
    tc.add_argument("--tokenizer")
    tc.add_argument("--prompt")
    tc.add_argument("--out", help="also write the context here")
    tc.add_argument("--device", default="auto")
    tc.set_defaults(func=cmd_text_context)

    ck = sub.add_parser("check-models", help="list the model files that are missing and where they go")
    ck.add_argument("--models-dir", default="models", help="a folder laid out like ComfyUI/models")
    ck.add_argument("--strict", action="store_true", help="exit 1 when a file needed to swap is missing")
    ck.set_defaults(func=cmd_check_models)
    return ap


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["identity-report"]:  # its own parser: per-frame ArcFace similarity to a reference
        from .eval.identity_report import identity_report_main

        return identity_report_main(argv[1:])
    if argv[:1] == ["evaluate"]:  # its own parser: the IDBench-V-like evaluation of swapped videos
        from .eval.benchmark import evaluate_main

        return evaluate_main(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except DreamIDVError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
