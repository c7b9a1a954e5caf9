"""Weights: DiT checkpoint detection, loading and conversion, LoRA and ID-projection files, and the
catalogue of model files the pack uses."""
