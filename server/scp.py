"""Legacy SCP (``scp -O``) over the Session. Placeholder until the real implementation lands."""

from __future__ import annotations

import paramiko

from .session import Session


def run_scp(channel: paramiko.Channel, session: Session, argv: list[str]) -> None:
    try:
        channel.sendall(b"\x02scp: legacy SCP is not available yet\n")
        channel.send_exit_status(1)
    finally:
        session.close()
        channel.close()
