"""DreamID-V nodes: loaders (being written)."""
NODES = []
