"""The escape / DoS corpus (research/python-stack.md §4.7) against real workers.

Every row of the corpus is one parametrized case (some rows have variants).
Each case is compiled and run through a real WorkerPool; the expectation is
that it is blocked (compile error, or a runtime error reported as verdict
"error" with a sensible message) or contained (error_kind cpu / memory /
timeout), or, for the few rows that are about functionality the policy must
keep (guarded sorted/zip, print capture, state reset), that it works as
documented. Escape attempts try to create a marker file; it must never
appear.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from scriptsftp.server.stores import StateStores
from scriptsftp.scripting import sandbox
from scriptsftp.scripting.workers import CallRequest, CallResult, CompileResult, ScriptSource, WorkerPool
from scriptsftp.server.contract.events import PreUpload


def make_source(text: str, name: str = "corpus.py") -> ScriptSource:
    return ScriptSource(name, text, hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest())


@pytest.fixture(scope="module")
def pool(tmp_path_factory: pytest.TempPathFactory):
    state_dir = tmp_path_factory.mktemp("state")
    p = WorkerPool(2, memory_mb=128, state_dir=state_dir, stores=StateStores(state_dir))
    p.start()
    yield p
    p.close()


EVENT = PreUpload(path="/inbox/report.csv", size=10, user="alice", protocol="sftp",
                  remote_ip="127.0.0.1", session_id="s1").to_dict()


def run(pool: WorkerPool, text: str, *, caps: frozenset[str] = frozenset({"store"}),
        cpu_time: float = 2.0, timeout: float = 30.0) -> CompileResult | CallResult:
    script = make_source(text)
    compiled = pool.compile(script)
    if not compiled.ok:
        return compiled
    return pool.call(CallRequest(script, "on_pre_upload", EVENT, caps, timeout, cpu_time))


@dataclass
class Case:
    id: str
    code: str
    expect: str                 # "compile" | "error" | "cpu" | "memory" | "limit" | "ok"
    match: str = ""             # regex on the compile errors / the error reason
    cpu_time: float = 2.0
    check: object = None        # for "ok": callable(result) -> None
    extra: dict = field(default_factory=dict)


def _h(body: str) -> str:
    """Wrap statements in the handler."""
    lines = body.strip("\n").splitlines()
    return "def on_pre_upload(event, api):\n" + "\n".join("    " + ln for ln in lines) + "\n"


def _log_messages(result: CallResult) -> list[str]:
    return [line.message for line in result.logs]


CASES: list[Case] = [
    # 1-2: class hierarchy walking
    Case("01-subclasses", _h("""
for c in ().__class__.__bases__[0].__subclasses__():
    if c.__name__ == '_wrap_close':
        c.__init__.__globals__['system']('touch {marker}')
"""), "compile", r'"__class__" is an invalid attribute name'),
    Case("02-object-subclasses", _h("object.__subclasses__()"), "compile",
         r'"__subclasses__" is an invalid attribute name'),
    # 3: getattr with a dunder name
    Case("03-getattr-dunder", _h("""
cls = getattr((), '__class__')
for c in getattr(getattr(cls, '__base__'), '__subclasses__')():
    pass
"""), "error", r"AttributeError: attribute '__class__' is not accessible"),
    # 4: type()
    Case("04-type", _h("t = type(())"), "error", r"NameError: name 'type' is not defined"),
    Case("04-type-3arg", _h("X = type('X', (), {})"), "error", r"NameError: name 'type'"),
    # 5: imports of dangerous modules
    *[Case(f"05-import-{mod}", f"import {mod}\n" + _h(f"{mod}.system('touch {{marker}}')"),
           "compile", rf"ImportError: module '{mod}' is not allowed in scripts \(allowed: ")
      for mod in ("os", "subprocess", "ctypes", "pickle", "sys", "importlib", "builtins",
                  "io", "shutil", "socket", "random")],
    Case("05-from-os-import", "from os import system\n" + _h("system('touch {marker}')"),
         "compile", r"module 'os' is not allowed"),
    Case("05-import-in-function", _h("import os.path\nos.path.exists('/')"), "compile",
         r"module 'os.path' is not allowed"),
    Case("05-relative-import", "from . import sandbox\n" + _h("pass"), "compile",
         r"relative imports are not allowed"),
    # 6: __import__
    Case("06-dunder-import", _h("__import__('os').system('touch {marker}')"), "compile",
         r'"__import__" is an invalid variable name'),
    # 7: open()
    Case("07-open", _h("open('{marker}', 'w').write('x')"), "error",
         r"NameError: name 'open' is not defined"),
    # 8: eval / exec / compile
    Case("08-eval", _h("eval('1+1')"), "compile", r"Eval calls are not allowed"),
    Case("08-exec", _h("exec('import os')"), "compile", r"Exec calls are not allowed"),
    Case("08-compile", _h("code = compile('1', 'f', 'eval')"), "error",
         r"NameError: name 'compile' is not defined"),
    # 9: namespace introspection
    *[Case(f"09-{fn}", _h(f"x = {fn}()"), "error", rf"NameError: name '{fn}' is not defined")
      for fn in ("globals", "vars", "locals", "dir")],
    # 10-12: str.format / format_map / string.Formatter (CVE-2023-41039, CVE-2026-76825)
    Case("10-str-format", _h("x = '{0.__class__}'.format(1)"), "error",
         r"AttributeError: attribute 'format' is not accessible"),
    Case("11-format-map", _h("x = str.format_map('{x.__class__}', {'x': 1})"), "error",
         r"attribute 'format_map' is not accessible"),
    Case("12-string-formatter", "import string\n" + _h("string.Formatter().format('{0.__class__}', 1)"),
         "error", r"AttributeError: module 'string' has no attribute 'Formatter'"),
    # 13: generator frames (CVE-2023-37271)
    Case("13-gi-frame", _h("g = (x for x in [1]).gi_frame.f_back.f_globals"), "compile",
         r'"gi_frame" is a restricted name'),
    Case("13-gi-frame-getattr", _h("f = getattr((x for x in [1]), 'gi_frame')"), "error",
         r"attribute 'gi_frame' is not accessible"),
    # 14: tracebacks
    Case("14-traceback", _h("""
try:
    1 / 0
except Exception as e:
    f = e.__traceback__.tb_frame
"""), "compile", r'"__traceback__" is an invalid attribute name'),
    Case("14-tb-frame-getattr", _h("""
try:
    1 / 0
except Exception as e:
    tb = getattr(e, '__traceback__')
"""), "error", r"attribute '__traceback__' is not accessible"),
    # 15: AttributeError.obj (CVE-2024-47532)
    Case("15-attributeerror-obj", _h("""
try:
    api.no_such_thing
except AttributeError as e:
    leaked = e.obj
"""), "error", r"AttributeError: attribute 'obj' is not accessible"),
    # 16: except* (CVE-2025-22153)
    Case("16-except-star", _h("""
try:
    pass
except* ValueError:
    pass
"""), "compile", r"TryStar statements are not allowed"),
    # 17: guard shadowing through parameter names (CVE-2026-55830)
    Case("17-posonly-guard-name", "def f(_getattr_=None, /):\n    return api._ctx\n" + _h("f()"),
         "compile", r'"_getattr_" is an invalid variable name'),
    # 18: private attribute of the api
    Case("18-private-attr", _h("x = api._ctx.chan"), "compile", r'"_ctx" is an invalid attribute name'),
    Case("18-private-getattr", _h("x = getattr(api, '_ctx')"), "error",
         r"attribute '_ctx' is not accessible"),
    # 19: bound method -> self / builtins module
    Case("19-method-self", _h("x = api.log.__self__"), "compile", r'"__self__" is an invalid attribute'),
    Case("19-builtin-self", _h("b = getattr(len, '__self__')"), "error",
         r"attribute '__self__' is not accessible"),
    # 20: writing to the api
    Case("20-api-setattr", _h("api.veto = None"), "error", r"TypeError: api is read-only in scripts"),
    Case("20-setattr-builtin", _h("setattr(api, 'veto', None)"), "error",
         r"NameError: name 'setattr' is not defined"),
    # 21: mutating the event
    Case("21-event-setattr", _h("event.size = 1"), "error", r"TypeError: event is read-only in scripts"),
    Case("21-event-delattr", _h("del event.path"), "error", r"TypeError: event is read-only"),
    # 22: poisoning a shared module
    Case("22-math-pi", "import math\n" + _h("math.pi = 3"), "error",
         r"TypeError: module is read-only in scripts"),
    Case("22-json-dumps", "import json\n" + _h("json.dumps = None"), "error",
         r"TypeError: module is read-only"),
    # 23: shared mutable module state
    Case("23-random-refused", "import random\n" + _h("random.seed(0)"), "compile",
         r"module 'random' is not allowed"),
    Case("23-hashlib-shared-set", "import hashlib\n" + _h("hashlib.algorithms_available.add('x')"),
         "error", r"AttributeError: 'frozenset' object has no attribute 'add'"),
    Case("23-csv-dialect-registry", "import csv\n" + _h("csv.register_dialect('x', delimiter=';')"),
         "error", r"module 'csv' has no attribute 'register_dialect'"),
    # 24: BaseException subclasses raised by scripts
    Case("24-systemexit", _h("raise SystemExit(0)"), "error", r"^corpus\.py:2: SystemExit: 0$"),
    Case("24-keyboardinterrupt", _h("raise KeyboardInterrupt()"), "error",
         r"^corpus\.py:2: KeyboardInterrupt$"),
    # 25-26: CPU
    Case("25-busy-loop", _h("while True:\n    pass"), "cpu", r"CPU limit", cpu_time=0.5),
    Case("26-busy-loop-catching", _h("""
while True:
    try:
        while True:
            pass
    except BaseException:
        pass
"""), "cpu", r"CPU limit", cpu_time=0.5),
    # 27-29: memory
    Case("27-str-bomb", _h("x = 'a' * (10**10)"), "memory", r"MemoryError"),
    Case("28-list-bomb", _h("x = [0] * (10**9)"), "memory", r"MemoryError"),
    Case("29-format-padding-bomb", _h("x = f\"{'':>{10**10}}\""), "memory", r"MemoryError"),
    # 30: big-int CPU
    Case("30-bigint-power", _h("x = 9**9**9"), "limit", r"CPU limit|MemoryError", cpu_time=0.5),
    # 31: int -> str digit limit
    Case("31-int-str-limit", _h("s = str(10**5000)"), "error",
         r"ValueError: Exceeds the limit \(4300 digits\)"),
    # 32: recursion
    Case("32-recursion", "def f(n):\n    return f(n + 1)\n" + _h("f(0)"), "error",
         r"^corpus\.py:2: RecursionError: maximum recursion depth exceeded"),
    # 33: range limit
    Case("33-range-limit", _h("n = len(range(10**7))"), "error",
         r"ValueError: range\(\) is limited to 1000000 elements"),
    # 34: class policy
    Case("34-class", "class X:\n    pass\n" + _h("X()"), "compile",
         r"class definitions are not allowed in scripts"),
    # 35: builtins removed from RP 9.0's safe_builtins, re-provided as guarded versions
    Case("35-guarded-builtins", _h("""
api.log('sorted', v=sorted([3, 1, 2], reverse=True))
api.log('zip', v=list(zip([1, 2], 'ab')))
api.log('tuple', v=tuple(x * 2 for x in range(3)))
api.log('bytes', v=list(bytes([104, 105])))
api.log('misc', v=[sum([1, 2]), min(3, 1), max([4, 9]), any([0, 1]), all([]),
                   list(enumerate('ab', 1)), list(map(abs, [-1])), list(filter(None, [0, 5])),
                   list(reversed((1, 2))), sorted(dict(a=1, b=2).items()), sorted(set('aa'))])
api.log('isinstance', v=[isinstance([], list), isinstance({}, dict), isinstance((), (tuple, set)),
                         isinstance(b'', bytes), isinstance('x', list)])
"""), "ok", check=lambda r: _check_35(r)),
    # 36: address leak
    Case("36-id", _h("x = id(api)"), "error", r"NameError: name 'id' is not defined"),
    # 37: print flood
    Case("37-print-flood", _h("""
for i in range(100000):
    print('x' * 1000, i)
"""), "ok", check=lambda r: _check_37(r)),
    # 38: regex catastrophic backtracking: only the CPU limit stops it
    Case("38-regex-backtracking", "import re\n" + _h("re.match('(a+)+$', 'a' * 40 + 'b')"), "cpu",
         r"CPU limit", cpu_time=0.5),
    # 39: blocking calls
    Case("39-time-sleep", "import time\n" + _h("time.sleep(10)"), "error",
         r"RuntimeError: time.sleep\(\) is not available in scripts"),
    # 40: compile-time DoS
    Case("40-huge-source", "x = 1\n" * 3_500_000, "compile",
         r"^corpus\.py:1: script is too large \(\d+ bytes; the limit is 262144 bytes\)"),
    Case("40-deep-nesting", "x = " + "(" * 300 + "1" + ")" * 300 + "\n", "compile",
         r"^corpus\.py:1: SyntaxError: too many nested parentheses"),
    Case("40-deep-expression", "x = " + "-" * 120_000 + "1\n", "compile",
         r"^corpus\.py:1: script is too deeply nested to compile"),
    Case("40-long-sum", "x = " + "+".join(["a"] * 100_000) + "\n", "compile",
         r"^corpus\.py:1: script is too deeply nested to compile"),
    # 41: returning hostile objects: return values never leave the worker
    Case("41-hostile-return", _h("return (x for x in range(3))"), "ok",
         check=lambda r: _check_41(r)),
    # 42: walking api objects to server internals
    Case("42-api-walk", _h("""
found = []
for obj, names in ((api, ['ctx', 'chan', 'sock', 'rpc', 'server', 'session', 'transport',
                          'granted', 'logs']),
                   (api.store, ['ctx', 'rpc', 'store', 'db', 'conn']),
                   (event, ['fields', 'data', 'dict', 'items', 'get'])):
    for n in names:
        if hasattr(obj, n):
            found.append(n)
if found:
    open('{marker}', 'w')
api.log('found', names=found)
"""), "ok", check=lambda r: _check_42(r)),
    # 43: *args / **kwargs to reach hidden parameters
    Case("43-kwargs-underscore", _h("api.log('x', **{'_ctx': 1})"), "error",
         r"TypeError: keyword argument '_ctx' is not allowed"),
    Case("43-keyword-underscore", _h("api.log('x', _ctx=1)"), "compile",
         r'keyword argument "_ctx" is not allowed'),
    # 44: newer syntax: t-strings, lazy imports (3.14/3.15), match (unknown to RP)
    Case("44-tstring", _h("x = t'{event.path}'"), "compile", r"SyntaxError"),
    Case("44-lazy-import", "lazy import os\n" + _h("pass"), "compile", r"SyntaxError"),
    Case("44-match", _h("""
match event.path:
    case _:
        pass
"""), "compile", r"Match statements are not allowed"),
    # 45: state across events
    Case("45-state-reset", "seen = []\ncounter = 0\n" + _h("""
global counter
seen.append(event.path)
counter += 1
api.log('state', seen=len(seen), counter=counter)
"""), "ok", check=lambda r: _check_45(r)),

    # --- beyond the §4.7 table: façade and guard checks -------------------------------
    Case("46-json-codecs", "import json\n" + _h("json.codecs.open('{marker}', 'w')"), "error",
         r"module 'json' has no attribute 'codecs'"),
    Case("47-fnmatch-os", "import fnmatch\n" + _h("fnmatch.os.system('touch {marker}')"), "error",
         r"module 'fnmatch' has no attribute 'os'"),
    Case("48-type-mro", _h("base = str.mro()[-1]"), "error", r"attribute 'mro' is not accessible"),
    Case("49-update-wrapper", "import functools\n" + _h("functools.update_wrapper(api, len)"),
         "error", r"module 'functools' has no attribute 'update_wrapper'"),
    Case("50-re-debug", "import re\n" + _h("re.compile('a', 128)"), "error",
         r"ValueError: re.DEBUG and unknown flags are not available"),
    Case("51-hashlib-kdf", "import hashlib\n" + _h("hashlib.pbkdf2_hmac('sha256', b'', b'', 10**9)"),
         "error", r"module 'hashlib' has no attribute 'pbkdf2_hmac'"),
    Case("52-deferred-finalizer", _h("""
def g():
    try:
        yield 1
    finally:
        while True:
            pass
it = g()
next(it)
keep = [it]
keep.append(keep)
"""), "cpu", r"CPU limit", cpu_time=0.5),
    Case("53-print-file", _h("print('x', file=api)"), "error", r"print\(file=...\) is not available"),
    Case("54-csv-field-size-limit", "import csv\n" + _h("csv.field_size_limit(10**9)"), "error",
         r"module 'csv' has no attribute 'field_size_limit'"),
    Case("55-function-globals", _h("g = getattr(on_pre_upload, '__globals__')"), "error",
         r"attribute '__globals__' is not accessible"),
    Case("56-write-guard-function", _h("on_pre_upload.x = 1"), "error", r"TypeError: .* is read-only"),
    Case("57-module-iteration", "import json\n" + _h("for x in json:\n    pass"), "error",
         r"TypeError: cannot iterate over module"),
    Case("58-getitem-module-members", "import json\n" + _h("x = json['loads']"), "error",
         r"TypeError: 'ModuleFacade' object is not subscriptable"),
    Case("59-exception-args-only", _h("""
try:
    api.store.get(1)
except TypeError as e:
    api.log('ok', args=list(e.args))
    x = e.__context__
"""), "compile", r'"__context__" is an invalid attribute name'),
    Case("60-allowed-modules", """
import re, json, datetime, math, fnmatch, hashlib, csv, collections, itertools, functools, string, time
def on_pre_upload(event, api):
    c = collections.Counter('abca')
    c['z'] += 1
    d = collections.defaultdict(list)
    d['k'].append(1)
    rows = list(csv.DictReader(['a,b', '1,2']))
    api.log('mods', v=[
        bool(re.match(r'\\w+', 'abc')), json.loads(json.dumps({'a': [1]})),
        datetime.datetime(2024, 1, 2).strftime('%Y-%m-%d'), math.floor(2.5),
        fnmatch.fnmatch('a.exe', '*.exe'), hashlib.sha256(b'x').hexdigest()[:8],
        rows[0]['b'], c.most_common(1)[0][0], d['k'],
        list(itertools.chain.from_iterable([[1], [2]])), functools.reduce(lambda a, b: a + b, [1, 2, 3]),
        string.Template('$x!').substitute(x='hi'), time.time() > 0,
        list(itertools.islice(itertools.count(), 3)), sorted(fnmatch.filter(['a.py', 'b.txt'], '*.py')),
    ])
""", "ok", check=lambda r: _check_60(r)),
]


def _check_35(r: CallResult) -> None:
    values = {line.message: line.fields["v"] for line in r.logs}
    assert values["sorted"] == [3, 2, 1]
    assert values["zip"] == [[1, "a"], [2, "b"]]
    assert values["tuple"] == [0, 2, 4]
    assert values["bytes"] == [104, 105]
    assert values["misc"] == [3, 1, 9, True, True, [[1, "a"], [2, "b"]], [1], [5], [2, 1],
                              [["a", 1], ["b", 2]], ["a"]]
    assert values["isinstance"] == [True, True, True, True, False]


def _check_37(r: CallResult) -> None:
    assert len(r.logs) <= 101
    assert r.logs[-1].message.startswith("log truncated:")
    assert sum(len(line.message) for line in r.logs) <= 70 * 1024


def _check_41(r: CallResult) -> None:
    assert _log_messages(r) == ["handler returned a value; return values are ignored "
                                "(use api.veto(reason) to deny)"]


def _check_42(r: CallResult) -> None:
    assert r.logs[-1].fields == {"names": []}


def _check_45(r: CallResult) -> None:
    assert r.logs[-1].fields == {"seen": 1, "counter": 1}


def _check_60(r: CallResult) -> None:
    assert r.logs[0].fields["v"] == [
        True, {"a": [1]}, "2024-01-02", 2, True, "2d711642", "2", "a", [1], [1, 2], 6, "hi!",
        True, [0, 1, 2], ["a.py"]]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_corpus(pool: WorkerPool, tmp_path: Path, case: Case) -> None:
    marker = tmp_path / "escaped"
    code = case.code.replace("{marker}", str(marker))
    result = run(pool, code, cpu_time=case.cpu_time)
    try:
        if case.expect == "compile":
            assert isinstance(result, CompileResult), f"expected a compile error, got {result}"
            assert not result.ok
            assert any(re.search(case.match, e) for e in result.errors), result.errors
            assert all(re.match(r"^corpus\.py:\d+: ", e) for e in result.errors), result.errors
            return
        assert isinstance(result, CallResult), f"did not compile: {result}"
        if case.expect == "ok":
            assert result.verdict == "allow", result
            assert result.error_kind is None
            case.check(result)  # type: ignore[operator]
            if case.id == "45-state-reset":   # a second call sees fresh module state
                again = run(pool, code)
                assert isinstance(again, CallResult)
                case.check(again)  # type: ignore[operator]
            return
        assert result.verdict == "error", result
        assert re.search(case.match, result.reason), result.reason
        if case.expect == "error":
            assert result.error_kind == "exception", result
        elif case.expect == "limit":
            assert result.error_kind in ("cpu", "memory"), result
        else:
            assert result.error_kind == case.expect, result
    finally:
        assert not marker.exists(), "the script escaped the sandbox"
    # the pool keeps serving after every case
    after = run(pool, _h("api.log('alive')"))
    assert isinstance(after, CallResult) and after.verdict == "allow", after


def test_corpus_covers_every_row() -> None:
    rows = {int(c.id.split("-")[0]) for c in CASES}
    assert set(range(1, 46)) <= rows


def test_builtins_policy() -> None:
    forbidden = {"type", "id", "object", "globals", "vars", "locals", "dir", "eval", "exec",
                 "compile", "open", "input", "__import__", "setattr", "delattr", "super",
                 "property", "classmethod", "staticmethod", "memoryview", "breakpoint",
                 "help", "exit", "quit", "__build_class__", "format", "ExceptionGroup",
                 "BaseExceptionGroup"}
    assert not (forbidden & sandbox.BUILTIN_NAMES)
    g = sandbox.make_globals(lambda _getattr_=None: None)
    assert set(g["__builtins__"]) - sandbox.BUILTIN_NAMES == {"__import__"}
    assert g["__builtins__"]["__import__"] is not __import__


def test_facades_expose_only_allow_listed_modules() -> None:
    assert set(sandbox.FACADES) == set(sandbox.ALLOWED_MODULES)
    for name, members in sandbox.FACADES.items():
        for attr, value in members.items():
            assert not attr.startswith("_"), (name, attr)
            assert type(value).__name__ != "module", (name, attr)
            assert not isinstance(value, (list, dict, set, bytearray)), (name, attr)


def test_compile_error_format_and_functions(pool: WorkerPool) -> None:
    bad = make_source("def on_a(event, api):\n    pass\n\ndef on_b(event, api):\n    x = (\n",
                      name="broken.py")
    result = pool.compile(bad)
    assert not result.ok
    assert re.match(r"^broken\.py:5: SyntaxError: ", result.errors[0]), result.errors
    good = make_source("import json\nX = 1\ndef on_a(event, api):\n    pass\n"
                       "def helper():\n    pass\nlam = lambda: 0\n", name="good.py")
    result = pool.compile(good)
    assert result.ok and result.errors == []
    assert result.functions == ["on_a", "helper"]
    several = make_source("import os\n\ndef on_a(event, api):\n    x = api._ctx\n"
                          "    class Y:\n        pass\n", name="several.py")
    result = pool.compile(several)
    assert [e.split(":")[1] for e in result.errors] == ["1", "4", "5"], result.errors
