"""DreamID-V nodes: sampler (being written)."""
NODES = []
