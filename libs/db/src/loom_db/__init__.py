"""loom_db."""
