"""Sampling: flow-matching samplers over ``model(x, sigma)``, guidance, windows for long clips, the step
cache and block offload."""
