"""The core's check of a public-key login an SSH worker reports (contract KeyProof).

Why: an SSH worker runs paramiko on raw client bytes and is treated as possibly
compromised. Without this, the core answered only "is this key one of the user's?"
and then believed the worker that the client had signed with it, so a worker taken
over could log in as anyone whose public key it knows (public keys are not secret).
Now the worker forwards what the client signed, and the core verifies the signature
over the request (RFC 4252 section 7) with the key on file.

The signature covers the connection's session id, which the core cannot compute
(the key exchange runs in the worker), so a worker could replay a signature it saw
on another connection. Each session id is therefore accepted on one link only: the
last ``SEEN`` session ids that carried a proof are remembered, and one seen on
another link is refused (logged as a warning: only a broken or compromised worker
sends one). A compromised worker can still act for the clients that log in through
it while it serves them; that much a process holding the connection always can.
"""

from __future__ import annotations

import base64
import hashlib
import itertools
import logging
import threading
from collections import OrderedDict

import paramiko
from paramiko.common import cMSG_USERAUTH_REQUEST
from paramiko.message import Message

from scriptsftp.server.contract.ports import KeyProof

log = logging.getLogger("scriptsftp.ssh")

SEEN = 50_000  # session ids remembered (a 16-byte digest each: about 5 MB at most)


def from_wire(value: object) -> KeyProof | None:
    """A proof as RemoteCore sends it ([session id, service, algorithm, signature], base64
    for the bytes), or None if it is not one."""
    if not (isinstance(value, list) and len(value) == 4 and all(isinstance(v, str) for v in value)):
        return None
    try:
        session_id, signature = base64.b64decode(value[0], validate=True), base64.b64decode(value[3], validate=True)
    except ValueError:
        return None
    if not session_id or not signature or len(session_id) > 64 or len(signature) > 4096 \
            or len(value[1]) > 64 or len(value[2]) > 64:
        return None
    return KeyProof(session_id, value[1], value[2], signature)


def signature_holds(name: str, key: paramiko.PKey, proof: KeyProof) -> bool:
    """Whether ``proof`` is the key's valid signature of a login request for ``name``."""
    m = Message()
    m.add_string(proof.session_id)
    m.add_byte(cMSG_USERAUTH_REQUEST)
    m.add_string(name)
    m.add_string(proof.service)
    m.add_string("publickey")
    m.add_boolean(True)
    m.add_string(proof.algorithm)
    m.add_string(key.asbytes())
    try:
        return bool(key.verify_ssh_sig(m.asbytes(), Message(proof.signature)))
    except Exception:  # a malformed signature is a failed one
        return False


class SessionIds:
    """Which link each recently proven session id belongs to."""

    def __init__(self, size: int = SEEN) -> None:
        self._size = size
        self._owners: OrderedDict[bytes, int] = OrderedDict()
        self._lock = threading.Lock()

    def claim(self, session_id: bytes, link: int) -> bool:
        """True if ``session_id`` is new or already ``link``'s; it is ``link``'s from now on."""
        digest = hashlib.blake2b(session_id, digest_size=16).digest()
        with self._lock:
            owner = self._owners.get(digest)
            if owner is not None and owner != link:
                return False
            self._owners[digest] = link
            self._owners.move_to_end(digest)
            while len(self._owners) > self._size:
                self._owners.popitem(last=False)
            return True


#: one per daemon: every link of every worker claims its session ids here
SESSION_IDS = SessionIds()
LINK_IDS = itertools.count(1)
