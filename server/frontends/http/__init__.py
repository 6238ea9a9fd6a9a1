"""frontends/http: see docs/architecture.md."""
