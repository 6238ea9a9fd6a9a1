"""The SSH worker link serves exactly the core's ports (server/contract/ports.py).

The link's tables are derived from the Protocols; these tests pin what that
derivation must give, so that a method added to a port without a way over the
link (or a table that drifts from the port) fails here, in the fast tier.
"""

from __future__ import annotations

import inspect

from scriptsftp.server.contract.ports import CorePort, SessionPort, keyword_options, port_methods
from scriptsftp.server.frontends.ssh import core_link
from scriptsftp.server.frontends.ssh.core_link import (
    CORE_NOT_REQUESTS, CORE_REQUESTS, SESSION_CALLS, SESSION_OWN_REQUESTS, CoreLink,
)
from scriptsftp.server.frontends.ssh.remote_core import RemoteCore, RemoteSession

#: requests of the link that are no port method: a session call by name, a listing's next
#: batch, the end of a handle, a running transfer's byte count, a purchase of bandwidth
LINK_OWN = {"call", "readdir", "close_handle", "abort_handle", "progress", "bandwidth"}


def test_every_session_port_method_is_a_call_or_a_request_of_its_own():
    methods = set(port_methods(SessionPort))
    assert set(SESSION_CALLS) | set(SESSION_OWN_REQUESTS) == methods
    assert not set(SESSION_CALLS) & set(SESSION_OWN_REQUESTS)


def test_session_calls_take_the_port_methods_options_by_name():
    signatures = port_methods(SessionPort)
    for name, allowed in SESSION_CALLS.items():
        assert allowed == keyword_options(signatures[name]), name
    assert SESSION_CALLS["stat"] == {"follow"}
    assert SESSION_CALLS["rename"] == {"overwrite"}
    assert SESSION_CALLS["setstat"] == {"mode", "times", "size"}
    assert SESSION_CALLS["remove"] == frozenset()
    assert core_link.OPEN_WRITE_ARGS == {"truncate", "append", "exclusive", "create", "readable", "mode"}
    assert core_link.FSETSTAT_ARGS == {"mode", "times", "size"}


def test_every_core_port_method_is_a_request_or_carried_by_the_link():
    methods = set(port_methods(CorePort))
    assert set(CORE_REQUESTS) | set(CORE_NOT_REQUESTS) == methods
    assert set(CoreLink._OPS) == set(CORE_REQUESTS) | set(SESSION_OWN_REQUESTS.values()) | LINK_OWN


def test_port_methods_are_the_protocols_own_not_protocol_machinery():
    methods = port_methods(SessionPort)
    assert "realpath" in methods and "close" in methods
    assert not any(name.startswith("_") for name in methods)
    assert list(methods["rename"].parameters) == ["self", "src_vpath", "dst_vpath", "overwrite"]


def test_the_worker_side_has_every_port_method_with_the_same_parameters():
    """mypy checks the types (remote_core.py's last lines); this checks what a run needs."""
    for port, remote in ((SessionPort, RemoteSession), (CorePort, RemoteCore)):
        for name, signature in port_methods(port).items():
            assert list(inspect.signature(getattr(remote, name)).parameters) == list(signature.parameters), name
