"""The revisions, oldest first by number (`0001_initial.py`, ...)."""
