"""loom_webhook: the webhook service of DESIGN §6 (being built: issue 6)."""
