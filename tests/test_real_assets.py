"""The frame preparation on the real clip and face photo in ../shared/assets (skipped without them)."""
import pytest
import torch

from dreamidv_core.io.video import read_image, read_video
from dreamidv_core.preprocess.video_ops import output_size, prepare_frames, prepare_reference
from dreamidv_core.pipelines.plan import clip_frame_count

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


def test_expression_adaptation_on_the_real_clip_moves_with_it_in_the_new_face_shape(shared_dir):
    """SyncID-Pipe's expression adaptation with the real MediaPipe model: the pose video keeps the clip's
    head position frame by frame but carries I_g's face shape (not the clip's own)."""
    import numpy as np

    from dreamidv_core.preprocess.pose.extract import extract_mediapipe
    from dreamidv_core.preprocess.pose.mediapipe_face import FaceLandmarker
    from dreamidv_core.synthesis.expression import adapt_expression

    frames, _ = read_video(shared_dir / "assets" / "a_girl.mp4", max_frames=9)
    ig = read_image(shared_dir / "assets" / "an_1.jpg")
    with FaceLandmarker(str(shared_dir / "assets" / "face_landmarker_v2_with_blendshapes.task")) as lm:
        adapted = adapt_expression(frames, lm, ig)
        own = extract_mediapipe(frames, lm)
    a, o = np.asarray(adapted.mask) > 0.5, np.asarray(own.mask) > 0.5
    assert a.shape == o.shape == frames.shape[:3] and adapted.filled == []

    def centre(m):
        ys, xs = np.nonzero(m)
        return np.array([xs.mean(), ys.mean()])

    w = frames.shape[2]
    drift = [np.linalg.norm(centre(a[i]) - centre(o[i])) for i in range(len(frames))]
    assert max(drift) < 0.03 * w, drift  # the adapted face sits where the clip's face is, in every frame
    iou = [(a[i] & o[i]).sum() / (a[i] | o[i]).sum() for i in range(len(frames))]
    print(f"[real] adapted vs own face: centre drift max {max(drift):.1f} px of {w}; mask IoU {min(iou):.3f}-{max(iou):.3f}")
    assert max(iou) < 0.97, iou  # but it is another face shape (I_g's), not the clip's own


def test_two_real_faces_are_told_apart_and_the_face_crop_holds_the_target(shared_dir):
    """Real MediaPipe on two people (the clip and its mirror image 6 frames later, side by side, each face
    too small for MediaPipe's whole-frame view: found in tiles): target index 0 / 1 is the left / right person
    in every frame, and the face-crop windows around it stay on that side."""
    import cv2
    import numpy as np

    from dreamidv_core.errors import InputError
    from dreamidv_core.pipelines.plan import face_crop_plan
    from dreamidv_core.preprocess.pose.extract import extract_mediapipe
    from dreamidv_core.preprocess.pose.mediapipe_face import FaceLandmarker
    from dreamidv_core.preprocess.tracking import TargetSpec

    frames, _ = read_video(shared_dir / "assets" / "a_girl.mp4", max_frames=14)
    small = np.stack([cv2.resize(f, (480, 310), interpolation=cv2.INTER_AREA) for f in frames])
    pair = np.concatenate([small[:8], small[6:14, :, ::-1]], axis=2)  # [8, 310, 960, 3]
    task = str(shared_dir / "assets" / "face_landmarker_v2_with_blendshapes.task")
    with FaceLandmarker(task, num_faces=4) as lm:
        with pytest.raises(InputError, match="no face found in any of the 8 frames"):
            extract_mediapipe(pair, lm)  # whole-frame view only: the faces are too small
    with FaceLandmarker(task, num_faces=4, tile_levels=1) as lm:
        for index, left in ((0, True), (1, False)):
            res = extract_mediapipe(pair, lm, target=TargetSpec("index", index))
            assert res.absent == [] and len(res.track.people) == 2
            xs = [np.nonzero(res.mask[i])[1].mean() for i in range(8)]
            assert all((x < 480) == left for x in xs), xs
            plan = face_crop_plan(torch.from_numpy(res.mask), 960, 310, 8, None, 256, 256)
            assert all((b[0] + b[2] / 2 < 480) == left for b in plan.track.boxes)
