"""Training code for DreamID-V (coming: synthetic / real-augmentation training and Identity-Coherence RL,
as described in the DreamID-V paper; the upstream release has no training code)."""
