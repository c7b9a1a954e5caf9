"""The frame preparation on the real clip and face photo in ../shared/assets (skipped without them)."""
import pytest
import torch

from dreamidv_core.video_io import read_image, read_video
from dreamidv_core.video_ops import output_size, prepare_frames, prepare_reference
from dreamidv_core.windows import clip_frame_count

pytestmark = pytest.mark.shared_assets


def test_real_clip_and_face_prepare_to_matching_model_inputs(shared_dir):
    frames, fps = read_video(shared_dir / "assets" / "a_girl.mp4", max_frames=11)
    face = read_image(shared_dir / "assets" / "an_1.jpg")
    n = clip_frame_count(len(frames), 9)
    h, w = frames.shape[1:3]
    video = prepare_frames(frames, n, 832, 480, "video")
    ref = prepare_reference(face, w, h, 832, 480)
    oh, ow = output_size(h, w, 832, 480)
    assert n == 9 and fps > 0
    assert video.shape == (3, 9, oh, ow) and oh % 16 == 0 and ow % 16 == 0
    assert oh * ow <= 832 * 480
    assert ref.shape == (3, 1, oh, ow)
    # the letterbox pads with white where the photo's aspect differs from the video's
    border = torch.cat([ref[:, 0, :, :2].flatten(), ref[:, 0, :, -2:].flatten(), ref[:, 0, :2].flatten(),
                        ref[:, 0, -2:].flatten()])
    assert (border > 0.95).float().mean() > 0.4
