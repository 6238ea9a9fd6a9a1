"""frontends/ftp: FTP and FTPS over pyftpdlib (see docs/architecture.md).

listener.py (make_listener, the daemon's entry) -> commands.py (commands as Session calls)
-> data.py (the data channel) -> replies.py; pyftpdlib_ext.py is the one module that knows
pyftpdlib's internals, version-checked by its install().
"""
