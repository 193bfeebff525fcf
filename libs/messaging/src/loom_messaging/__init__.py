"""loom_messaging."""
