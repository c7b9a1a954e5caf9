"""Command line: ``python -m dreamidv_core {swap,convert,text-context,check-models,identity-report}``.

The swap needs no ComfyUI: it reads the weights from a folder laid out like ``ComfyUI/models``.
"""
from __future__ import annotations

import argparse
import sys
import time
from typing import Optional, Sequence

from .errors import DreamIDVError


def _size(text: str):
    try:
        w, h = (int(v) for v in text.lower().replace("x", "*").split("*"))
        return w, h
    except ValueError:
        raise argparse.ArgumentTypeError(f"size must look like 832*480, got {text!r}") from None


def _device(name: str):
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


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
    import torch

    from .weights.checkpoints import load_dit
    from .pipelines.plan import ClipPlan
    from .pipelines.swap import SwapSettings, swap_face
    from .pipelines.text_context import get_text_context, load_precomputed_context
    from .models.vae import load_wan_vae
    from .io.video import VideoReader, VideoWriter, read_image

    dit_path, vae_path, encoder, tokenizer = resolve_swap_files(args)
    device = _device(args.device)
    # the videos are read lazily and the output written as it is decoded: memory does not grow with the clip
    video = VideoReader(args.video)
    settings = SwapSettings(width=args.size[0], height=args.size[1], frame_num=args.frame_num, steps=args.steps,
                            shift=args.shift, guidance=args.guidance, seed=args.seed, sampler=args.sampler,
                            window=args.window, overlap=args.overlap, background_strength=args.background_strength,
                            step_cache=args.step_cache, batch_guidance=args.batch_guidance, vae_tile=args.vae_tile)
    plan = ClipPlan.build(video.probe.width, video.probe.height, len(video), args.frame_num, *args.size,
                          args.window, args.overlap, start=args.start_frame, stride=args.every_nth)
    rate, audio = output_rate_and_sound(args, video, plan)
    reference = read_image(args.reference)
    if args.mask:
        mask, pose = (None if path is None else _same_length(VideoReader(path), video) for path in (args.mask,
                                                                                                   args.pose))
        mask, pose = plan.select(mask), None if pose is None else plan.select(pose)
    else:
        mask, pose = extract_pose_and_mask(args, plan.select(video), reference)
    if args.context:
        context = load_precomputed_context(args.context)
    else:
        print(f"text context from {encoder} (cached after the first run)")
        context = get_text_context(encoder, tokenizer, device=device)
    print(f"loading {dit_path} ({args.weight_dtype}) and {vae_path} on {device}")
    offload = args.offload_blocks and torch.device(device).type == "cuda"
    # with block offload the weights are read to the CPU and only the resident part moves to the GPU
    dit = load_dit(dit_path, weight_dtype=args.weight_dtype, device="cpu" if offload else device,
                   attention_backend=args.attention)
    vae = load_wan_vae(vae_path, device=device)
    if offload:
        from .sampling.offload import enable_block_offload

        print(enable_block_offload(dit, args.offload_blocks, device).describe())
    start = time.time()

    def progress(stage, i, n):
        print(f"\r{stage} {i}/{n}  {time.time() - start:6.1f}s", end="\n" if i == n else "", flush=True)

    with VideoWriter(args.out, rate, audio=audio) as writer:

        def sink(frames, start):
            if start != writer.frames_written:
                raise RuntimeError(f"decoded frames arrive out of order ({start} after {writer.frames_written})")
            writer.write(frames.numpy())

        result = swap_face(dit, vae, plan.select(video), mask, reference, context.to(device), pose=pose,
                           settings=settings, progress=progress, sink=sink, plan=plan)
    print(f"wrote {args.out}: {result.frames_used} frames at {float(rate):g} fps"
          + (", with the source's sound" if audio is not None else ", no sound"))
    return 0


def _same_length(reader, video):
    if len(reader) != len(video):
        raise DreamIDVError(f"{reader.name}: has {len(reader)} frames but the video {video.name} has {len(video)}; "
                            "they must have the same length")
    return reader


def output_rate_and_sound(args, video, plan):
    """The output's frame rate (the source's exactly, divided by --every-nth; or --fps) and the source's sound
    over the swapped frames' span of time (None without a sound track, with --no-audio, or when --fps changes
    the playing speed, which would put picture and sound out of step)."""
    from fractions import Fraction

    from .io.audio import AudioClip, FileAudio

    natural = video.rate / plan.stride
    rate = Fraction(args.fps).limit_denominator(1001) if args.fps else natural
    if args.no_audio or not video.probe.has_audio:
        return rate, None
    if rate != natural:
        print(f"note: --fps {args.fps:g} plays the clip at another speed than the source's "
              f"{float(natural):g} fps; its sound is left out")
        return rate, None
    sound = FileAudio(args.video)
    return rate, AudioClip(sound, video.probe.frame_time(plan.start), float(plan.frames * plan.stride / video.rate))


def extract_pose_and_mask(args, video, reference):
    """Pose video and face mask from the driving video with MediaPipe, retargeted onto the reference: drawn
    on demand from the keypoints (a few frames in memory at a time, however long the clip)."""
    from .weights.model_files import find_model_files, format_missing
    from .preprocess.pose.extract import track_mediapipe
    from .preprocess.pose.mediapipe_face import FaceLandmarker

    task = args.landmarker or find_model_files(args.models_dir).path("face_landmarker")
    if task is None:
        raise DreamIDVError("no --mask given and no MediaPipe face landmarker to make one.\n"
                            + format_missing(find_model_files(args.models_dir)))
    print(f"pose and mask from the video with {task}")
    with FaceLandmarker(str(task)) as landmarker:
        track = track_mediapipe(video, landmarker, reference=reference)
    if track.filled:
        print(track.info)
    return track.mask, track.pose


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
    sw.set_defaults(func=cmd_swap)

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
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except DreamIDVError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
