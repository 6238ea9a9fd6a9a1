"""frontends/ftp: see docs/architecture.md."""
