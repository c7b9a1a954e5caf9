"""Whole jobs: the clip plan, a clip streamed through the VAE and PoseGuider, the swap, the IVS, the text
context, and adapters for host conventions."""
