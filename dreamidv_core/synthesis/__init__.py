"""SyncID-Pipe stages (the paper's data-synthesis pipeline) as a pure library.

* :mod:`.frames` — first and last frames of a clip (the IVS conditioning frames);
* :mod:`.image_swap` — one image's face swapped to the identity I_g with DreamID-V itself;
* :mod:`.expression` — the pose video with I_g's face shape and the real clip's expression and head pose;
* :mod:`.background` — the source person removed from the real clip (inpainting, temporally smoothed) and
  the generated person recomposed over that background;
* :mod:`.similarity` — ArcFace similarities of an identity image to a clip, per frame;
* :mod:`.writer` — forward / backward samples in the training dataset format (training/DATASET.md),
  atomic and resumable.
"""
from .background import clean_background, recompose
from .expression import adapt_expression
from .frames import first_last_frames
from .image_swap import swap_image
from .similarity import analyzer_encoder, identity_similarity
from .writer import QuadrupletSettings, SampleReport, write_quadruplet

__all__ = ["adapt_expression", "analyzer_encoder", "clean_background", "first_last_frames", "identity_similarity",
           "QuadrupletSettings", "recompose", "SampleReport", "swap_image", "write_quadruplet"]
