"""FTP reply lines for Session errors, shared by the command handler and the data channel.

Session errors are protocol-neutral (server/contract/errors.py); this is the one
place they become FTP reply codes, so a veto reads the same whether it ends a
command or a transfer.
"""

from __future__ import annotations

from scriptsftp.server.contract.errors import Failure, FsError, InvalidPath, LimitExceeded, NoSpace, QuotaExceeded


def reply_text(text: str) -> str:
    """One printable line: a reason must not end the reply early or forge another."""
    return "".join(c if c.isprintable() else " " for c in text).strip() or "refused"


def reply_of(exc: FsError) -> str:
    """The FTP reply line for a Session error (RFC 959 codes)."""
    if isinstance(exc, InvalidPath):
        code = 553  # file name not allowed
    elif isinstance(exc, QuotaExceeded):
        code = 552  # exceeded storage allocation
    elif isinstance(exc, NoSpace):
        code = 452
    elif isinstance(exc, LimitExceeded):
        code = 450
    elif isinstance(exc, Failure):
        code = 451
    else:  # not found, permission, veto, exists, (not) a directory
        code = 550
    return f"{code} {reply_text(exc.message)}"
