"""The networks of DreamID-V: the DiT (Wan2.1 with reference tokens and pose attention), its layers,
attention kernels, PoseGuider, ArcFace ID projection, configs, the frame grid, umT5, the Wan 2.1 VAE and the
IVS model."""
