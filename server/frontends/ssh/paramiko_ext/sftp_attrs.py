"""SFTP file attributes through paramiko's ``SFTPAttributes``, whose wire format is private.

``SFTPAttributes`` keeps which fields a client sent in ``_flags`` and writes itself
into a message with ``_pack``; neither is public (paramiko 5.1). The request
handler (sftp.py) parses attributes itself, with bounds (``read_attrs``), and
goes through these three functions for the rest.
"""

from __future__ import annotations

from paramiko.message import Message
from paramiko.sftp_attr import SFTPAttributes


def attrs_with_flags(flags: int) -> SFTPAttributes:
    """Empty attributes that say which fields a request carries (``flags``, as sent)."""
    attr = SFTPAttributes()
    attr._flags = flags  # type: ignore[attr-defined]
    return attr


def flags_of(attr: SFTPAttributes) -> int:
    """The SSH_FILEXFER_ATTR_* flags of attributes read from a request."""
    return attr._flags  # type: ignore[attr-defined]


def pack_attrs(msg: Message, attr: SFTPAttributes) -> None:
    """Append ``attr`` to a reply in SFTP v3's ATTRS encoding (the fields that are set)."""
    attr._pack(msg)  # type: ignore[attr-defined]
