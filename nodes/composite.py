"""DreamID-V nodes: composite (being written)."""
NODES = []
