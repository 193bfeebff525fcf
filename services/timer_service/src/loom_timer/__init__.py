"""loom_timer: the timer service of DESIGN §7 (being built: issue 6)."""
