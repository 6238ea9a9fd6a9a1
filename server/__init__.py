"""scriptsftp server: front ends, the Session core, users, config and the daemon."""

__version__ = "0.1.0"
