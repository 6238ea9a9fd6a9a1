"""The seam between the server and the scripts: the dispatcher contract, binding matching, and
the engine's decision, all without a worker process.

The engine runs against a stand-in pool that answers each call from a table (script name ->
verdict), so the decision logic (which bindings match an event, in which order, the first veto
wins, ``on_error``, sync and async pre-publish) is exercised as it runs in the daemon.
"""

from __future__ import annotations

import threading
from dataclasses import FrozenInstanceError, dataclass, field
from pathlib import Path
from typing import Any, Iterator

import pytest

from scriptsftp.scripting.capabilities import CapabilityRegistry
from scriptsftp.scripting.engine import ERROR_DENIAL, ScriptEngine
from scriptsftp.scripting.registry import ActiveBinding, Registry, glob_regex
from scriptsftp.scripting.workers import CallRequest, CallResult, CompileResult, ScriptSource
from scriptsftp.server.contract import events as ev
from scriptsftp.server.contract.dispatch import ALLOW, Decision, NullDispatcher, SwappableDispatcher
from scriptsftp.server.support.config import Binding, load_config

from .conftest import RecordingDispatcher


# --- the contract ---------------------------------------------------------------------------------

def _upload_event(**fields: Any) -> ev.PrePublish:
    base: dict[str, Any] = {"session_id": "s1", "protocol": "sftp", "remote_ip": "10.0.0.1", "user": "alice",
                            "path": "/in/report.csv", "size": 1000}
    return ev.PrePublish(**{**base, **fields})


def test_a_decision_is_frozen_and_allow_has_no_reason() -> None:
    assert ALLOW.allowed and ALLOW.reason == ""
    with pytest.raises(FrozenInstanceError):
        ALLOW.allowed = False  # type: ignore[misc]
    assert Decision(False, "no") == Decision(False, "no")


def test_events_are_frozen_and_cross_as_plain_data() -> None:
    e = _upload_event()
    with pytest.raises(FrozenInstanceError):
        e.path = "/elsewhere"  # type: ignore[misc]
    data = e.to_dict()
    data["path"] = "/changed by a script"
    assert e.path == "/in/report.csv" and e.to_dict()["name"] == "pre-publish"


def test_the_null_dispatcher_wants_nothing_and_allows_everything() -> None:
    null = NullDispatcher()
    assert not any(null.wants(name) for name in ("pre-upload", "pre-publish", "connect", "post-upload"))
    assert null.pre(_upload_event()) is ALLOW
    assert not null.has_async(_upload_event())
    assert null.post(_upload_event()) is None


def test_a_session_asks_nothing_of_a_dispatcher_that_wants_nothing(core: Any) -> None:
    """wants() is asked first: no event is built and pre/post are never called."""

    class Unwanted(NullDispatcher):
        def pre(self, *args: object, **kwargs: object) -> Decision:
            raise AssertionError("pre called")

        def post(self, *args: object, **kwargs: object) -> None:
            raise AssertionError("post called")

    for holder in (core.session, core.session.publisher):
        holder.dispatcher = Unwanted()
    h = core.session.open_write("/new.bin")
    h.write(0, b"data")
    h.close()
    core.session.rename("/new.bin", "/moved.bin")
    core.session.remove("/moved.bin")
    core.session.mkdir("/d")
    core.session.rmdir("/d")
    core.session.open_read("/over.bin").close()


def test_a_swap_applies_to_the_next_event_and_an_event_in_flight_keeps_its_target() -> None:
    first, second = RecordingDispatcher(), RecordingDispatcher(pre_hook=lambda e: Decision(False, "second"))
    swappable = SwappableDispatcher(first)

    def swap_meanwhile(event: ev.Event) -> Decision:
        swappable.target = second  # a reload lands while this event is being decided
        return ALLOW

    first.pre_hook = swap_meanwhile
    assert swappable.pre(_upload_event()) is ALLOW
    assert swappable.pre(_upload_event()) == Decision(False, "second")
    swappable.post(_upload_event())
    assert (first.names(), second.names()) == (["pre-publish"], ["pre-publish", "pre-publish"])


# --- binding matching -----------------------------------------------------------------------------

def _registry(*specs: dict[str, Any], groups: dict[str, frozenset[str]] | None = None) -> Registry:
    bindings = [ActiveBinding(i, Binding(**{"event": "pre-publish", "script": f"s{i}.py", **s}))
                for i, s in enumerate(specs)]
    return Registry(bindings, {}, groups or {"alice": frozenset({"partners"}), "bob": frozenset()})


def _matched(reg: Registry, **fields: Any) -> list[str]:
    return [b.script for b in reg.matching(_upload_event(**fields).to_dict())]


@pytest.mark.parametrize("spec,fields,matches", [
    ({}, {}, True),
    ({"users": ["al*"]}, {}, True),
    ({"users": ["bob"]}, {}, False),
    ({"users": ["bob", "a?ice"]}, {}, True),
    ({"groups": ["partners"]}, {}, True),
    ({"groups": ["partners"]}, {"user": "bob"}, False),
    ({"groups": ["staff"]}, {}, False),
    ({"protocols": ["sftp", "ftp"]}, {}, True),
    ({"protocols": ["http"]}, {}, False),
    ({"paths": ["/in/*.csv"]}, {}, True),
    ({"paths": ["/in/*.CSV"]}, {}, False),  # globs are case-sensitive
    ({"paths": ["/*.csv"]}, {}, False),  # * stays within one directory
    ({"paths": ["/**.csv"]}, {}, True),
    ({"paths": ["/**/report.csv"]}, {}, True),
    ({"paths": ["/in/**/report.csv"]}, {}, True),  # /**/ also matches one /
    ({"paths": ["/in/re?ort.[ct]sv"]}, {}, True),
    ({"paths": ["/in/[!r]*"]}, {}, False),
    ({"paths": ["/out/*", "/in/*"]}, {}, True),
    ({"min_size": 1000}, {}, True),
    ({"min_size": 1001}, {}, False),
    ({"max_size": 1000}, {}, True),
    ({"max_size": 999}, {}, False),
    ({"min_size": 1}, {"size": None}, False),  # a range needs a known size
    ({"max_size": 0}, {"size": None}, True),  # 0 = no bound: no range at all
])
def test_a_binding_matches_on_every_condition(spec: dict[str, Any], fields: dict[str, Any], matches: bool) -> None:
    assert _matched(_registry(spec), **fields) == (["s0.py"] if matches else [])


def test_a_rename_matches_on_its_source_or_its_target() -> None:
    reg = Registry([ActiveBinding(0, Binding(event="pre-rename", script="r.py", paths=["/archive/**"]))], {}, {})
    event = ev.PreRename(user="alice", path="/in/a.csv", target="/archive/a.csv").to_dict()
    assert [b.script for b in reg.matching(event)] == ["r.py"]
    event = ev.PreRename(user="alice", path="/in/a.csv", target="/in/b.csv").to_dict()
    assert reg.matching(event) == []


def test_bindings_run_by_order_then_by_position_and_only_for_their_event() -> None:
    reg = _registry({"order": 50}, {}, {"order": 10}, {"order": 50}, {"event": "post-upload"})
    assert _matched(reg) == ["s2.py", "s0.py", "s3.py", "s1.py"]
    assert reg.wants("pre-publish") and reg.wants("post-upload") and not reg.wants("pre-delete")


@pytest.mark.parametrize("pattern,path,matches", [
    ("/in/*", "/in/a/b", False), ("/in/**", "/in/a/b", True), ("/in/**", "/in", False),
    ("**", "/anything/at/all", True), ("/a/**/b", "/a/b", True), ("/a/**/b", "/a/x/y/b", True),
    ("/a.b", "/aXb", False), ("/[a", "/[a", True), ("/x?", "/x/", False),
])
def test_path_globs(pattern: str, path: str, matches: bool) -> None:
    assert bool(glob_regex(pattern).match(path)) == matches


# --- the engine's decision, with a stand-in pool ------------------------------------------------

@dataclass
class TablePool:
    """Answers every call from ``verdicts`` (script -> "allow" | "veto" | "error"); records calls."""

    verdicts: dict[str, str] = field(default_factory=dict)
    capabilities: CapabilityRegistry = field(default_factory=CapabilityRegistry)
    calls: list[tuple[str, str]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def start(self) -> None:
        pass

    def close(self) -> None:
        pass

    def set_login_reserve(self, n: int) -> None:
        pass

    def set_nice(self, n: int) -> None:
        pass

    def compile(self, source: ScriptSource) -> CompileResult:
        return CompileResult(True, [], [f"on_{e}" for e in ("pre_upload", "pre_publish", "post_upload", "pre_delete")])

    def call(self, req: CallRequest) -> CallResult:
        with self.lock:
            self.calls.append((req.script.name, req.event["name"]))
        verdict = self.verdicts.get(req.script.name, "allow")
        reason = {"veto": f"vetoed by {req.script.name}",
                  "error": "ZeroDivisionError: division by zero"}.get(verdict, "")
        return CallResult(verdict, reason, [], "exception" if verdict == "error" else None, None, 0.0)


BINDINGS = """
[[bindings]]
event = "pre-publish"
script = "first.py"
order = 10

[[bindings]]
event = "pre-publish"
script = "careless.py"
order = 20
on_error = "allow"

[[bindings]]
event = "pre-publish"
script = "strict.py"
order = 30

[[bindings]]
event = "pre-publish"
script = "later.py"
order = 40
mode = "async"

[[bindings]]
event = "pre-delete"
script = "first.py"
users = ["bob"]
"""


@pytest.fixture(scope="module")
def engine_config(tmp_path_factory: pytest.TempPathFactory) -> Any:
    root = tmp_path_factory.mktemp("engine")
    (root / "scripts").mkdir()
    for name in ("first.py", "careless.py", "strict.py", "later.py"):
        (root / "scripts" / name).write_text("def on_pre_publish(event, api):\n    pass\n")
    (root / "scriptsftp.toml").write_text(f"""
[server]
state_dir = "state"

[scripts]
dir = "scripts"
reload = false
{BINDINGS}
""")
    return load_config(root / "scriptsftp.toml")


@pytest.fixture
def engine(engine_config: Any, tmp_path: Path) -> Iterator[tuple[ScriptEngine, TablePool]]:
    pool = TablePool()
    engine = ScriptEngine(engine_config, tmp_path, pool=pool)  # type: ignore[arg-type]
    # reload() loads every bound script through the pool, as start() does, without starting the
    # engine's services (outbox, scheduler): the decision logic is all this tier needs
    assert engine.reload(engine_config)
    yield engine, pool
    engine.close()


@pytest.mark.parametrize("verdicts,decision,ran", [
    ({}, ALLOW, ["first.py", "careless.py", "strict.py", "later.py"]),
    ({"first.py": "veto"}, Decision(False, "vetoed by first.py"), ["first.py"]),
    ({"strict.py": "veto", "later.py": "veto"}, Decision(False, "vetoed by strict.py"),
     ["first.py", "careless.py", "strict.py"]),
    ({"careless.py": "error"}, ALLOW, ["first.py", "careless.py", "strict.py", "later.py"]),
    ({"strict.py": "error"}, Decision(False, ERROR_DENIAL), ["first.py", "careless.py", "strict.py"]),
])
def test_the_first_veto_wins_and_on_error_decides_a_failed_script(
        engine: tuple[ScriptEngine, TablePool], verdicts: dict[str, str], decision: Decision, ran: list[str]) -> None:
    eng, pool = engine
    pool.verdicts = verdicts
    assert eng.pre(_upload_event()) == decision
    assert [name for name, _ in pool.calls] == ran


def test_sync_and_async_pre_publish_bindings_run_apart(engine: tuple[ScriptEngine, TablePool]) -> None:
    eng, pool = engine
    assert eng.has_async(_upload_event())
    assert eng.pre(_upload_event(), mode="sync") is not None
    assert [n for n, _ in pool.calls] == ["first.py", "careless.py", "strict.py"]
    pool.calls.clear()
    pool.verdicts = {"later.py": "veto"}
    assert eng.pre(_upload_event(), mode="async") == Decision(False, "vetoed by later.py")
    assert [n for n, _ in pool.calls] == ["later.py"]


def test_conditions_select_the_bindings_an_event_reaches(engine: tuple[ScriptEngine, TablePool]) -> None:
    eng, pool = engine
    assert eng.wants("pre-delete") and not eng.wants("pre-mkdir")
    assert eng.pre(ev.PreDelete(user="alice", path="/x")) is not None and pool.calls == []
    pool.verdicts = {"first.py": "veto"}
    assert eng.pre(ev.PreDelete(user="bob", path="/x")) == Decision(False, "vetoed by first.py")
