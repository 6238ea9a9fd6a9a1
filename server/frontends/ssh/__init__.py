"""frontends/ssh: see docs/architecture.md."""
