"""Before and around the model: frame preparation and geometry, pose and face mask, the reference identity,
SAM 2 segmentation and the background composite."""
