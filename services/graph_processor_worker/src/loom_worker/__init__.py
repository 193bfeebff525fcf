"""Loom worker."""
