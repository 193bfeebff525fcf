"""loom_auth."""
