"""Frame preparation rules and the full tiny swap (deterministic, cancellable, clear errors)."""
import numpy as np
import pytest
import torch

from dreamidv_core.errors import Cancelled, InputError
from dreamidv_core.pipelines.swap import SwapSettings, swap_face
from dreamidv_core.preprocess.video_ops import (letterbox_reference, output_size, prepare_frames, prepare_reference,
                                                resized_size)
from dreamidv_core.models.frame_grid import padded_frame_count
from dreamidv_core.pipelines.plan import clip_frame_count


@pytest.mark.parametrize("available,frame_num,expected,padded", [
    (100, None, 100, 101), (80, 81, 80, 81), (5, None, 5, 5), (9, 8, 8, 9), (23, 81, 23, 25), (200, 81, 81, 81)])
def test_frame_count_keeps_every_frame_and_pads_to_4n_plus_1(available, frame_num, expected, padded):
    # the whole clip (or its first frame_num frames) is swapped; the model sees it padded to 4n+1
    assert clip_frame_count(available, frame_num) == expected
    assert padded_frame_count(expected) == padded


def test_too_few_frames_is_a_clear_error():
    with pytest.raises(InputError, match="at least 5"):
        clip_frame_count(4)


@pytest.mark.parametrize("h,w,expected_resize,expected_out", [
    (1080, 1920, (474, 843), (464, 832)),  # 0.4389 scale: round(473.96), round(842.60), then crop to 16
    (480, 832, (480, 832), (480, 832)),    # already at the area: untouched
    (200, 300, (200, 300), (192, 288)),    # smaller than the area: never upscaled, only cropped
    (1920, 1080, (843, 474), (832, 464)),  # portrait follows the video's aspect
])
def test_area_resize_and_crop_sizes(h, w, expected_resize, expected_out):
    assert resized_size(h, w, 832, 480) == expected_resize
    assert output_size(h, w, 832, 480) == expected_out


def test_centre_crop_takes_the_middle():
    # 40x24 frame: no resize at 832*480, crop to 32x16: offsets round(8/2)=4 (x), round(8/2)=4 (y)
    frame = np.zeros((1, 24, 40, 3), np.uint8)
    frame[0, 4:20, 4:36] = 200
    out = prepare_frames(frame, 1, 832, 480, "video")
    assert out.shape == (3, 1, 16, 32)
    assert torch.all(out == 200 / 255)


def test_letterbox_pads_white_onto_the_original_frame():
    ref = np.full((100, 50, 3), 10, np.uint8)  # tall photo into a wide 64x32 frame
    boxed = np.asarray(letterbox_reference(ref, 64, 32))
    assert boxed.shape == (32, 64, 3)
    # fitted to height 32 -> width int(32 * 0.5) = 16, padded (64 - 16) // 2 = 24 on the left
    assert (boxed[:, :24] == 255).all() and (boxed[:, 40:] == 255).all()
    assert (np.abs(boxed[:, 26:38].astype(int) - 10) <= 2).all()


def test_alpha_and_greyscale_inputs_are_handled():
    rgba = np.full((1, 16, 16, 4), 100, np.uint8)
    grey = np.full((1, 16, 16), 100, np.uint8)
    a = prepare_frames(rgba, 1, 832, 480, "video")
    b = prepare_frames(grey, 1, 832, 480, "video")
    assert torch.equal(a, b) and a.shape == (3, 1, 16, 16)
    ref = prepare_reference(np.full((20, 20, 4), 50, np.uint8), 16, 16, 832, 480)
    assert ref.shape == (3, 1, 16, 16)


# --------------------------------------------------------------------------- full tiny swap

@pytest.fixture(scope="module")
def models(tiny_swap_models):
    return tiny_swap_models


def clip(frames=11, h=40, w=56, seed=0):
    rng = np.random.default_rng(seed)
    video = rng.integers(0, 256, (frames, h, w, 3), dtype=np.uint8)
    mask = np.zeros((frames, h, w), np.uint8)
    mask[:, 8:32, 16:40] = 255
    pose = np.zeros((frames, h, w, 3), np.uint8)
    pose[:, 10:14, 20:24] = 255
    ref = rng.integers(0, 256, (30, 20, 3), dtype=np.uint8)
    return video, mask, pose, ref


def do_swap(models, seed=0, steps=3, **kw):
    dit, vae = models
    video, mask, pose, ref = clip(**kw)
    context = torch.randn(4, 48, generator=torch.Generator().manual_seed(1))
    settings = SwapSettings(width=48, height=32, steps=steps, seed=seed)
    return swap_face(dit, vae, video, mask, ref, context, pose=pose, settings=settings)


def test_tiny_swap_respects_frame_count_and_size_and_is_deterministic(models):
    a = do_swap(models, seed=3)
    b = do_swap(models, seed=3)
    c = do_swap(models, seed=4)
    # 11 frames, padded to 13 (4n+1) for the model, cropped back to 11;
    # 40x56 at a 48*32 area -> scale sqrt(1536/2240): 33x46 -> crop 32x32
    assert a.frames_used == 11
    assert a.frames.shape == (11, 32, 32, 3)
    assert a.latent.shape == (16, 4, 4, 4)
    assert 0 <= a.frames.min() and a.frames.max() <= 1
    assert torch.equal(a.frames, b.frames)
    assert not torch.equal(a.frames, c.frames)


def test_batched_guidance_equals_two_passes(models):
    dit, vae = models
    video, mask, pose, ref = clip()
    context = torch.randn(4, 48, generator=torch.Generator().manual_seed(1))
    out = [swap_face(dit, vae, video, mask, ref, context, pose=pose,
                     settings=SwapSettings(width=48, height=32, steps=2, batch_guidance=b)).latent for b in (False, True)]
    torch.testing.assert_close(out[0], out[1], rtol=1e-4, atol=1e-4)


def test_progress_and_cancel(models):
    dit, vae = models
    video, mask, pose, ref = clip()
    context = torch.randn(4, 48)
    events = []
    calls = {"n": 0}

    def cancel():
        calls["n"] += 1
        return any(stage == "sample" and i >= 2 for stage, i, n in events)

    with pytest.raises(Cancelled):
        swap_face(dit, vae, video, mask, ref, context, pose=pose, settings=SwapSettings(width=48, height=32, steps=6),
                  progress=lambda *e: events.append(e), cancel=cancel)
    samples = [e for e in events if e[0] == "sample"]
    assert samples == [("sample", 1, 6), ("sample", 2, 6)]


def test_mismatched_mask_length_and_missing_pose_are_clear_errors(models):
    dit, vae = models
    video, mask, pose, ref = clip()
    context = torch.randn(4, 48)
    s = SwapSettings(width=48, height=32, steps=1)
    with pytest.raises(InputError, match="mask has 6 frames"):
        swap_face(dit, vae, video, mask[:6], ref, context, pose=pose, settings=s)
    with pytest.raises(InputError, match="pose video"):
        swap_face(dit, vae, video, mask, ref, context, pose=None, settings=s)
    with pytest.raises(InputError, match="same size"):
        swap_face(dit, vae, video, mask[:, :20], ref, context, pose=pose, settings=s)


def test_precomputed_pose_tokens_and_reference_latent_give_the_same_swap(models):
    from dreamidv_core.pipelines.swap import plan_for, pose_tokens_for
    from dreamidv_core.preprocess.identity_bundle import encode_reference

    dit, vae = models
    video, mask, pose, ref = clip()
    context = torch.randn(4, 48, generator=torch.Generator().manual_seed(1))
    s = SwapSettings(width=48, height=32, steps=2)
    direct = swap_face(dit, vae, video, mask, ref, context, pose=pose, settings=s)
    plan = plan_for(video, s)
    assert plan.frames == direct.frames_used
    tokens = pose_tokens_for(dit, pose, plan)
    latent = encode_reference(vae, ref, plan.source_size, plan.area)
    staged = swap_face(dit, vae, video, mask, None, context, settings=s, pose_tokens=tokens, ref_latent=latent)
    assert torch.equal(direct.latent, staged.latent)


def test_id_projection_in_the_sampler(models):
    """A no-op projection leaves the swap bit-identical; a trained one needs the embedding and uses it,
    in one window and in several."""
    from dreamidv_core.models.configs import tiny_config
    from dreamidv_core.models.dit import DreamIDVTransformer

    dit, vae = models
    withp = DreamIDVTransformer(tiny_config("full", text_dim=48, id_tokens=2, id_embed_dim=8))
    withp.load_state_dict(dit.state_dict(), strict=False)
    withp.eval().requires_grad_(False)
    video, mask, pose, ref = clip()
    context = torch.randn(4, 48, generator=torch.Generator().manual_seed(1))
    emb = torch.randn(8, generator=torch.Generator().manual_seed(2))

    def run(model, embedding, **kw):
        s = SwapSettings(width=48, height=32, steps=2, **kw)
        return swap_face(model, vae, video, mask, ref, context, pose=pose, settings=s, id_embedding=embedding).latent

    plain = run(dit, None)
    assert torch.equal(run(withp, emb), plain) and torch.equal(run(withp, None), plain)
    with torch.no_grad():
        for blk in withp.id_projection.blocks:
            blk.gate.fill_(0.5)
    with pytest.raises(InputError, match="ArcFace"):
        run(withp, None)
    with pytest.raises(InputError, match="takes 8"):
        run(withp, torch.zeros(5))
    used = run(withp, emb)
    assert (used - plain).abs().max() > 1e-4 and not torch.equal(used, run(withp, -emb))
    windowed = run(withp, emb, window=9, overlap=4)
    assert (windowed - run(dit, None, window=9, overlap=4)).abs().max() > 1e-4
