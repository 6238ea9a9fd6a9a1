"""The one seam between the server and the scripting engine.

The Session and the login core raise every event through a :class:`Dispatcher`;
they never know whether scripts exist, how they are bound or where they run.
``scriptsftp.scripting.engine`` provides the real implementation; the
:class:`NullDispatcher` is what a server with no bindings uses, and costs one
method call per operation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol

from scriptsftp.server.contract.events import Event


@dataclass(frozen=True, slots=True)
class Decision:
    """What the pre-event scripts decided. ``reason`` is sent to the client on a veto."""

    allowed: bool
    reason: str = ""


ALLOW = Decision(True)

# Opens a fresh read-only OS file descriptor on the file an event is about (the
# staged upload for pre-publish, the file itself for pre-download/post-upload).
# The caller owns and closes the returned fd. Scripts read through it in their
# worker, so file bytes never pass through the server process.
FileOpener = Callable[[], int]


class Dispatcher(Protocol):
    def wants(self, event_name: str) -> bool:
        """True when at least one binding listens to this event name.

        Lets the Session skip building events nobody listens to."""
        ...

    def pre(self, event: Event, file: FileOpener | None = None, mode: str | None = None) -> Decision:
        """Run the vetoable handlers in order; the first veto wins. Blocks the caller.

        ``mode`` ("sync" or "async") runs only the bindings of that mode; None runs all
        (only ``pre-publish`` bindings can be async: they decide after the client was answered)."""
        ...

    def has_async(self, event: Event) -> bool:
        """True when an async binding matches this (pre-publish) event."""
        ...

    def post(self, event: Event, file: FileOpener | None = None) -> None:
        """Run (sync) or queue (async) the non-vetoable handlers; never raises."""
        ...


class NullDispatcher:
    """No scripts bound: every pre-event is allowed, post-events go nowhere."""

    def wants(self, event_name: str) -> bool:
        return False

    def pre(self, event: Event, file: FileOpener | None = None, mode: str | None = None) -> Decision:
        return ALLOW

    def has_async(self, event: Event) -> bool:
        return False

    def post(self, event: Event, file: FileOpener | None = None) -> None:
        return None


class SwappableDispatcher:
    """The one dispatcher the core, the publisher and every session hold for the daemon's life.

    A reload that adds the first binding (or changes what is behind the seam) swaps
    :attr:`target`; holders of this object see the new dispatcher on their next event,
    so a binding added by SIGHUP is enforced on sessions that were already open. An
    event already being dispatched finishes on the target it started with."""

    def __init__(self, target: Dispatcher) -> None:
        self.target = target

    def wants(self, event_name: str) -> bool:
        return self.target.wants(event_name)

    def pre(self, event: Event, file: FileOpener | None = None, mode: str | None = None) -> Decision:
        return self.target.pre(event, file, mode)

    def has_async(self, event: Event) -> bool:
        return self.target.has_async(event)

    def post(self, event: Event, file: FileOpener | None = None) -> None:
        self.target.post(event, file)
