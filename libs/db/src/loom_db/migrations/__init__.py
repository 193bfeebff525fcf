"""Loom's Alembic environment and history; run through `loom_db.migrate`, never imported
by the rest of loom_db."""
