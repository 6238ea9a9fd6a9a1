"""support: see docs/architecture.md."""
