"""Measuring swaps: the identity report."""
