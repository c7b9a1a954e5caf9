"""DreamID-V nodes: pose (being written)."""
NODES = []
