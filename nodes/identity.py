"""DreamID-V nodes: identity (being written)."""
NODES = []
