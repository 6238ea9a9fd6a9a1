"""frontends/ssh/paramiko_ext: see docs/architecture.md."""
