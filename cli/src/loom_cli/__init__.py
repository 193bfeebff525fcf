"""Loom CLI."""
