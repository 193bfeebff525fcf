"""Loom common."""
