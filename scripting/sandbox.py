"""The RestrictedPython policy for scriptsftp scripts.

This module is imported by the script worker processes (``worker_main``); the
server process only reads its constants. Nothing here is a security boundary
on its own: RestrictedPython rewrites the script's AST so that attribute,
item, iteration, unpacking, in-place and ``print`` operations go through the
guards below, and the worker process (rlimits, wall-clock kill, no pickling,
no server objects) is the wall behind it. docs/sandbox.md describes the whole
model.

The policy, in short:

* Compile: RestrictedPython's transformer plus our additions: ``class``
  statements are refused (see "Class policy"), keyword argument names starting
  with ``_`` are refused, ``import`` of anything outside :data:`ALLOWED_MODULES`
  and relative imports are refused at compile time (and again at run time by
  the import hook). Errors come back as ``NAME:LINE: message``.
* Builtins: a small allow-list. No ``type``, ``id``, ``object``, ``globals``,
  ``vars``, ``locals``, ``dir``, ``eval``, ``exec``, ``compile``, ``open``,
  ``input``, ``setattr``/``delattr``, ``super``, ``property``... The builtins
  that iterate (``sorted``, ``zip``, ``list``, ``dict``, ``sum``...) are
  re-implemented to take their iterator from the ``_getiter_`` guard, as
  Zope's AccessControl does; ``isinstance(x, list)`` still works.
* ``getattr`` (the ``_getattr_`` hook and the ``getattr``/``hasattr``
  builtins): no name starting with ``_``; no frame, traceback, generator,
  coroutine or code internals; no ``str.format``/``format_map``; no
  ``type.mro``; no ``AttributeError.obj``; objects of the script API only
  expose their registered attributes.
* Writes: only to ``dict``, ``list`` and the ``collections`` containers the
  script builds itself; everything else (the event, the api, module façades,
  functions, types) refuses attribute and item assignment.
* Imports: each allowed module is a façade built from an explicit allow-list
  of names (never the module object: ``json.codecs.open`` or
  ``fnmatch.os.system`` would otherwise be one attribute away), created fresh
  for each handler call and immutable.

Class policy: ``class`` statements are refused at compile time. Handlers are
short functions over an event; dicts and lists cover their data needs. Under
the write guard a script class could not even set attributes on its own
instances, and allowing classes would bring ``__init__``/``__eq__`` & co.,
metaclass plumbing (``__build_class__``) and class-level state into the
attack surface for no real gain.
"""

from __future__ import annotations

import ast
import builtins
import collections
import csv
import datetime
import fnmatch
import functools
import hashlib
import itertools
import json
import math
import operator
import re
import string
import time
import types
from types import MappingProxyType
from typing import Any, Callable, Iterable

from RestrictedPython.Guards import guarded_iter_unpack_sequence, guarded_unpack_sequence
from RestrictedPython.transformer import (
    INSPECT_ATTRIBUTES,
    IOPERATOR_TO_STR,
    RestrictingNodeTransformer,
    copy_locations,
)

__all__ = [
    "ALLOWED_MODULES",
    "MAX_SOURCE_BYTES",
    "CompiledScript",
    "compile_script",
    "make_globals",
    "guarded_getattr",
    "guarded_iter",
    "register_attrs",
    "script_filename",
]

#: Largest script source accepted, in UTF-8 bytes (compile-time DoS guard).
MAX_SOURCE_BYTES = 256 * 1024

#: Modules a script may import (as façades).
ALLOWED_MODULES: tuple[str, ...] = (
    "collections", "csv", "datetime", "fnmatch", "functools", "hashlib",
    "itertools", "json", "math", "re", "string", "time",
)

#: ``range()`` refuses more elements than this (a handler iterating over more
#: than a million numbers is almost surely a bug; the CPU limit would stop it
#: anyway, this gives a clear message instead).
RANGE_LIMIT = 1_000_000

#: Hash algorithms offered by the ``hashlib`` façade and ``api.file.hash``.
HASH_ALGORITHMS: frozenset[str] = frozenset({
    "md5", "sha1", "sha224", "sha256", "sha384", "sha512",
    "sha3_224", "sha3_256", "sha3_384", "sha3_512", "blake2b", "blake2s",
    "shake_128", "shake_256",
})

_ALLOWED_LIST_TEXT = ", ".join(ALLOWED_MODULES)


def script_filename(name: str) -> str:
    """The code-object filename of a script; tracebacks are matched on it."""
    return f"<script {name}>"


def not_allowed_module_message(module: str) -> str:
    return f"module {module!r} is not allowed in scripts (allowed: {_ALLOWED_LIST_TEXT})"


# ---------------------------------------------------------------------------
# Compile
# ---------------------------------------------------------------------------


class _ScriptPolicy(RestrictingNodeTransformer):
    """RestrictedPython's transformer plus scriptsftp's own refusals."""

    def __init__(self, errors: list, warnings: list, used_names: dict) -> None:
        super().__init__(errors, warnings, used_names)
        self.located: list[tuple[int, str]] = []

    def error(self, node: ast.AST, info: str) -> None:
        self.located.append((getattr(node, "lineno", None) or 1, info))
        super().error(node, info)

    def visit_ClassDef(self, node: ast.ClassDef) -> ast.AST:
        self.error(node, "class definitions are not allowed in scripts "
                         "(use functions, dicts and lists)")
        return node

    def visit_keyword(self, node: ast.keyword) -> Any:  # RestrictedPython's visitors: a node, a list or None
        # f(_getattr_=x) / f(_secret=1): hidden parameters are not reachable.
        if node.arg is not None and node.arg.startswith("_"):
            self.error(node, f'keyword argument "{node.arg}" is not allowed '
                             'because it starts with "_"')
        return super().visit_keyword(node)

    def visit_AugAssign(self, node: ast.AugAssign) -> Any:
        """``d[k] += v`` (refused by RestrictedPython) becomes, with guards:

            _tmpA = d ; _tmpB = k
            _write_(_tmpA)[_tmpB] = _inplacevar_('+=', _getitem_(_tmpA, _tmpB), v)

        Same evaluation order as Python. Slices and attributes stay refused."""
        target = node.target
        if not isinstance(target, ast.Subscript) or isinstance(target.slice, ast.Slice):
            return super().visit_AugAssign(node)
        obj = self.visit(target.value)
        key = self.visit(target.slice)
        value = self.visit(node.value)
        o, k = self.gen_tmp_name(), self.gen_tmp_name()

        def load(name: str) -> ast.Name:
            return ast.Name(name, ast.Load())

        stmts: list[ast.stmt] = [
            ast.Assign(targets=[ast.Name(o, ast.Store())], value=obj),
            ast.Assign(targets=[ast.Name(k, ast.Store())], value=key),
            ast.Assign(
                targets=[ast.Subscript(
                    value=ast.Call(func=load("_write_"), args=[load(o)], keywords=[]),
                    slice=load(k), ctx=ast.Store())],
                value=ast.Call(func=load("_inplacevar_"), args=[
                    ast.Constant(IOPERATOR_TO_STR[type(node.op)]),
                    ast.Call(func=load("_getitem_"), args=[load(o), load(k)], keywords=[]),
                    value], keywords=[])),
        ]
        for stmt in stmts:
            copy_locations(stmt, node)
            ast.fix_missing_locations(stmt)
        return stmts

    def _check_module(self, node: ast.AST, module: str | None) -> None:
        if module not in ALLOWED_MODULES:
            self.error(node, "ImportError: " + not_allowed_module_message(module or ""))

    def visit_Import(self, node: ast.Import) -> Any:  # RestrictedPython's visitors: a node, a list or None
        for alias in node.names:
            self._check_module(node, alias.name)
        return super().visit_Import(node)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> Any:  # RestrictedPython's visitors: a node, a list or None
        if node.level:
            self.error(node, "relative imports are not allowed in scripts")
        else:
            self._check_module(node, node.module)
        return super().visit_ImportFrom(node)


class CompiledScript:
    """A compiled script: the restricted code object and its top-level functions."""

    __slots__ = ("name", "code", "functions")

    def __init__(self, name: str, code: types.CodeType, functions: tuple[str, ...]) -> None:
        self.name = name
        self.code = code
        self.functions = functions


def compile_script(name: str, source: str) -> tuple[CompiledScript | None, list[str]]:
    """Compile untrusted *source* with the restricted policy.

    Returns ``(compiled, [])`` or ``(None, errors)`` with errors formatted
    ``NAME:LINE: message``. Only ever call this in a worker process: parsing is
    a DoS vector (a large or deeply nested script costs seconds or a
    RecursionError).
    """
    if not isinstance(source, str):
        return None, [f"{name}:1: script source must be text"]
    size = len(source.encode("utf-8", "surrogatepass"))
    if size > MAX_SOURCE_BYTES:
        return None, [f"{name}:1: script is too large ({size} bytes; the limit is "
                      f"{MAX_SOURCE_BYTES} bytes)"]
    filename = script_filename(name)
    try:
        tree = ast.parse(source, filename, "exec")
    except SyntaxError as e:
        return None, [f"{name}:{e.lineno or 1}: {type(e).__name__}: {e.msg}"]
    except (RecursionError, MemoryError):
        return None, [f"{name}:1: script is too deeply nested to compile"]
    except ValueError as e:  # e.g. NUL bytes in the source
        return None, [f"{name}:1: {e}"]
    functions = tuple(n.name for n in tree.body if isinstance(n, ast.FunctionDef))
    policy = _ScriptPolicy([], [], {})
    try:
        policy.visit(tree)
        if policy.located:
            errors = []
            for line, info in policy.located:
                text = f"{name}:{line}: {info}"
                if text not in errors:
                    errors.append(text)
            return None, errors
        code = compile(tree, filename, "exec", dont_inherit=True)
    except (RecursionError, MemoryError):
        return None, [f"{name}:1: script is too deeply nested to compile"]
    except SyntaxError as e:
        return None, [f"{name}:{e.lineno or 1}: {type(e).__name__}: {e.msg}"]
    except ValueError as e:
        return None, [f"{name}:1: {e}"]
    return CompiledScript(name, code, functions), []


# ---------------------------------------------------------------------------
# Attribute access
# ---------------------------------------------------------------------------

# Names that are never readable, on any object. INSPECT_ATTRIBUTES covers
# frames, tracebacks, generators, coroutines and code objects.
_BLOCKED_ATTRS = frozenset(INSPECT_ATTRIBUTES) | {
    "format", "format_map",   # str.format field traversal (CVE-2023-41039 family)
    "mro",                    # type.mro() -> object -> ...
    "obj",                    # AttributeError.obj (CVE-2024-47532)
}
_BLOCKED_PREFIXES = ("_", "gi_", "cr_", "ag_", "f_", "tb_", "co_")

# Per-type attribute allow-lists for the script API objects (see api.py).
_TYPE_ATTRS: dict[type, frozenset[str]] = {}

_MISSING = object()


def register_attrs(cls: type, names: Iterable[str]) -> None:
    """Declare the only attributes scripts may read on instances of *cls*."""
    _TYPE_ATTRS[cls] = frozenset(names)


def guarded_getattr(ob: Any, name: Any, default: Any = _MISSING) -> Any:
    """The ``_getattr_`` hook and the ``getattr`` builtin of scripts."""
    if type(name) is not str:
        raise TypeError("attribute name must be a string")
    if name.startswith(_BLOCKED_PREFIXES) or name in _BLOCKED_ATTRS:
        if default is not _MISSING:
            return default
        raise AttributeError(f"attribute {name!r} is not accessible from scripts")
    allowed = _TYPE_ATTRS.get(type(ob))
    if allowed is not None and name not in allowed:
        if default is not _MISSING:
            return default
        raise AttributeError(f"{_describe(ob)} has no attribute {name!r}")
    if default is _MISSING:
        return getattr(ob, name)
    return getattr(ob, name, default)


def guarded_hasattr(ob: Any, name: Any) -> bool:
    try:
        guarded_getattr(ob, name)
    except AttributeError:
        return False
    return True


def _describe(ob: Any) -> str:
    label = getattr(type(ob), "_script_label", None)
    return label if isinstance(label, str) else f"{type(ob).__name__!r} object"


# ---------------------------------------------------------------------------
# Iteration, items, writes, in-place operators, calls
# ---------------------------------------------------------------------------

# Values a script must never hold. Nothing reachable from a script yields
# them (that is the design); the checks are defence in depth.
_FORBIDDEN_VALUE_TYPES = frozenset({
    types.FrameType, types.TracebackType, types.CodeType, types.ModuleType,
    types.CellType,
})

# Builtin containers iterated without a per-item check: their items are data
# the script or the worker put there.
_PLAIN_ITER_TYPES = frozenset({
    list, tuple, str, bytes, bytearray, dict, set, frozenset, range,
    type({}.keys()), type({}.values()), type({}.items()),
    collections.OrderedDict, collections.Counter, collections.defaultdict,
    collections.deque, MappingProxyType,
    # iterators over the above, and the lazy builtins (their inputs came
    # through this guard already)
    type(iter([])), type(iter(())), type(iter("")), type(iter(b"")), type(iter(range(0))),
    type(iter(set())), type(iter({})), enumerate, zip, map, filter, reversed,
})


def _checked_items(it: Iterable[Any]) -> Iterable[Any]:
    for item in it:
        if type(item) in _FORBIDDEN_VALUE_TYPES:
            raise TypeError(f"scripts cannot use {type(item).__name__} objects")
        yield item


def guarded_iter(ob: Any) -> Any:
    """The ``_getiter_`` hook: every loop, comprehension and guarded builtin."""
    t = type(ob)
    if t in _PLAIN_ITER_TYPES:
        return iter(ob)
    if t in _FORBIDDEN_VALUE_TYPES or t is ModuleFacade:
        raise TypeError(f"cannot iterate over {_describe(ob)}")
    return _checked_items(iter(ob))


def guarded_getitem(ob: Any, index: Any) -> Any:
    """The ``_getitem_`` hook (``x[i]``, ``x[a:b]``)."""
    value = ob[index]
    if type(value) in _FORBIDDEN_VALUE_TYPES:
        raise TypeError(f"scripts cannot use {type(value).__name__} objects")
    return value


# Containers a script builds itself and may modify (item assignment,
# in-place operators). Shared objects (façade members, the event, the api) are
# never of these types.
_WRITABLE_TYPES = frozenset({
    dict, list, collections.OrderedDict, collections.Counter,
    collections.defaultdict, collections.deque,
})
_INPLACE_TYPES = _WRITABLE_TYPES | {set}


class _ReadOnly:
    """What ``_write_`` returns for objects scripts may not modify."""

    __slots__ = ("_target",)
    _target: Any  # set once in __init__ (the class refuses assignment)

    def __init__(self, target: Any) -> None:
        object.__setattr__(self, "_target", target)

    def _refuse(self, *args: Any) -> None:
        raise TypeError(f"{_describe(self._target)} is read-only in scripts")

    __setattr__ = __delattr__ = __setitem__ = __delitem__ = _refuse


def guarded_write(ob: Any) -> Any:
    """The ``_write_`` hook (full_write_guard semantics, plus collections)."""
    if type(ob) in _WRITABLE_TYPES:
        return ob
    return _ReadOnly(ob)


_INPLACE_OPS = {
    "+=": (operator.iadd, operator.add), "-=": (operator.isub, operator.sub),
    "*=": (operator.imul, operator.mul), "/=": (operator.itruediv, operator.truediv),
    "//=": (operator.ifloordiv, operator.floordiv), "%=": (operator.imod, operator.mod),
    "**=": (operator.ipow, operator.pow), "<<=": (operator.ilshift, operator.lshift),
    ">>=": (operator.irshift, operator.rshift), "&=": (operator.iand, operator.and_),
    "|=": (operator.ior, operator.or_), "^=": (operator.ixor, operator.xor),
    "@=": (operator.imatmul, operator.matmul),
}


def guarded_inplacevar(op: str, x: Any, y: Any) -> Any:
    """The ``_inplacevar_`` hook: ``x += y`` on a name."""
    try:
        inplace, infix = _INPLACE_OPS[op]
    except KeyError:
        raise SyntaxError(f"operator {op} is not supported in scripts") from None
    if type(x) in _INPLACE_TYPES:
        if type(x) is list and op == "+=" and type(y) not in _PLAIN_ITER_TYPES:
            y = list(guarded_iter(y))
        return inplace(x, y)
    return infix(x, y)


def guarded_apply(func: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """The ``_apply_`` hook: calls written with ``*args`` or ``**kwargs``."""
    for key in kwargs:
        if key.startswith("_"):
            raise TypeError(f"keyword argument {key!r} is not allowed because it starts with '_'")
    return func(*args, **kwargs)


# ---------------------------------------------------------------------------
# Builtins that iterate: take the iterator from the guard
# ---------------------------------------------------------------------------


def guarded_list(iterable: Any = ()) -> list:
    return list(guarded_iter(iterable))


def guarded_tuple(iterable: Any = ()) -> tuple:
    return tuple(guarded_iter(iterable))


def guarded_set(iterable: Any = ()) -> set:
    return set(guarded_iter(iterable))


def guarded_frozenset(iterable: Any = ()) -> frozenset:
    return frozenset(guarded_iter(iterable))


_MAPPING_TYPES = frozenset({
    dict, collections.OrderedDict, collections.Counter, collections.defaultdict,
    collections.ChainMap, MappingProxyType,
})


def guarded_dict(*args: Any, **kwargs: Any) -> dict:
    if len(args) > 1:
        raise TypeError(f"dict expected at most 1 argument, got {len(args)}")
    if not args:
        return dict(**kwargs)
    source = args[0]
    result = dict(source) if type(source) in _MAPPING_TYPES else dict(guarded_iter(source))
    result.update(kwargs)
    return result


def guarded_bytes(source: Any = b"", encoding: str | None = None, errors: str | None = None) -> bytes:
    if encoding is not None or errors is not None:
        return bytes(source, encoding if encoding is not None else "utf-8",
                     errors if errors is not None else "strict")
    if isinstance(source, (int, bytes, bytearray, memoryview)):
        return bytes(source)
    if isinstance(source, str):
        raise TypeError("string argument without an encoding")
    return bytes(guarded_iter(source))


def guarded_sorted(iterable: Any, *, key: Any = None, reverse: bool = False) -> list:
    items = list(guarded_iter(iterable))
    items.sort(key=key, reverse=reverse)
    return items


_REVERSIBLE_TYPES = frozenset({list, tuple, str, bytes, range, dict, collections.deque,
                               collections.OrderedDict})


def guarded_reversed(seq: Any) -> Any:
    if type(seq) in _REVERSIBLE_TYPES:
        return reversed(seq)
    return reversed(list(guarded_iter(seq)))


def guarded_enumerate(iterable: Any, start: int = 0) -> enumerate:
    return enumerate(guarded_iter(iterable), start)


def guarded_zip(*iterables: Any, strict: bool = False) -> zip:
    return zip(*[guarded_iter(it) for it in iterables], strict=strict)


def guarded_map(func: Callable[..., Any], *iterables: Any) -> map:
    if not iterables:
        raise TypeError("map() must have at least two arguments.")
    return map(func, *[guarded_iter(it) for it in iterables])


def guarded_filter(func: Any, iterable: Any) -> filter:
    return filter(func, guarded_iter(iterable))


def guarded_min(*args: Any, **kwargs: Any) -> Any:
    if len(args) == 1:
        return min(guarded_iter(args[0]), **kwargs)
    return min(*args, **kwargs)


def guarded_max(*args: Any, **kwargs: Any) -> Any:
    if len(args) == 1:
        return max(guarded_iter(args[0]), **kwargs)
    return max(*args, **kwargs)


def guarded_sum(iterable: Any, start: Any = 0) -> Any:
    return sum(guarded_iter(iterable), start)


def guarded_any(iterable: Any) -> bool:
    return any(guarded_iter(iterable))


def guarded_all(iterable: Any) -> bool:
    return all(guarded_iter(iterable))


def guarded_range(*args: Any) -> range:
    r = range(*args)
    try:
        n = len(r)
    except OverflowError:
        n = RANGE_LIMIT + 1
    if n > RANGE_LIMIT:
        raise ValueError(f"range() is limited to {RANGE_LIMIT} elements in scripts")
    return r


# Guarded constructors stand for their types in isinstance()/issubclass().
_GUARDED_TYPES: dict[Any, type] = {
    guarded_list: list, guarded_tuple: tuple, guarded_set: set,
    guarded_frozenset: frozenset, guarded_dict: dict, guarded_bytes: bytes,
    guarded_range: range, guarded_reversed: reversed, guarded_enumerate: enumerate,
    guarded_zip: zip, guarded_map: map, guarded_filter: filter,
}


def _classinfo(ci: Any) -> Any:
    if type(ci) is tuple:
        return tuple(_classinfo(c) for c in ci)
    try:
        return _GUARDED_TYPES.get(ci, ci)
    except TypeError:  # unhashable: let isinstance() complain
        return ci


def guarded_isinstance(obj: Any, classinfo: Any) -> bool:
    return isinstance(obj, _classinfo(classinfo))


def guarded_issubclass(cls: Any, classinfo: Any) -> bool:
    return issubclass(_classinfo(cls), _classinfo(classinfo))


def guarded_iter_builtin(ob: Any) -> Any:
    """``iter(x)`` (the one-argument form only)."""
    return guarded_iter(ob)


_SAFE_BUILTIN_NAMES = (
    "abs", "ascii", "bin", "bool", "callable", "chr", "complex", "divmod", "float",
    "hash", "hex", "int", "len", "next", "oct", "ord", "pow", "repr", "round",
    "slice", "str",
)
_EXCEPTION_NAMES = (
    "ArithmeticError", "AssertionError", "AttributeError", "BaseException",
    "BufferError", "EOFError", "Exception", "FileExistsError", "FileNotFoundError",
    "FloatingPointError", "GeneratorExit", "ImportError", "IndexError",
    "IsADirectoryError", "KeyError", "KeyboardInterrupt", "LookupError",
    "MemoryError", "ModuleNotFoundError", "NameError", "NotADirectoryError",
    "NotImplementedError", "OSError", "OverflowError", "PermissionError",
    "RecursionError", "ReferenceError", "RuntimeError", "StopIteration",
    "SyntaxError", "SystemExit", "TimeoutError", "TypeError",
    "UnboundLocalError", "UnicodeDecodeError", "UnicodeEncodeError",
    "UnicodeError", "ValueError", "ZeroDivisionError",
    "Warning", "UserWarning", "DeprecationWarning", "RuntimeWarning",
)

_BASE_BUILTINS: dict[str, Any] = {name: getattr(builtins, name) for name in _SAFE_BUILTIN_NAMES}
_BASE_BUILTINS.update({name: getattr(builtins, name) for name in _EXCEPTION_NAMES})
_BASE_BUILTINS.update({
    "None": None, "True": True, "False": False, "Ellipsis": Ellipsis,
    "NotImplemented": NotImplemented,
    "getattr": guarded_getattr, "hasattr": guarded_hasattr,
    "isinstance": guarded_isinstance, "issubclass": guarded_issubclass,
    "iter": guarded_iter_builtin,
    "list": guarded_list, "tuple": guarded_tuple, "set": guarded_set,
    "frozenset": guarded_frozenset, "dict": guarded_dict, "bytes": guarded_bytes,
    "sorted": guarded_sorted, "reversed": guarded_reversed,
    "enumerate": guarded_enumerate, "zip": guarded_zip, "map": guarded_map,
    "filter": guarded_filter, "min": guarded_min, "max": guarded_max,
    "sum": guarded_sum, "any": guarded_any, "all": guarded_all,
    "range": guarded_range,
})

#: Builtin names scripts can use (for docs and tests).
BUILTIN_NAMES: frozenset[str] = frozenset(_BASE_BUILTINS)


# ---------------------------------------------------------------------------
# Module façades
# ---------------------------------------------------------------------------


class ModuleFacade:
    """What ``import json`` gives a script: the allow-listed names, read-only.

    A new façade is made for each handler call; its members are functions,
    types and immutable constants, so nothing a script does to a module can
    be seen by the next call.
    """

    __slots__ = ("_facade_name", "_facade_members")
    _script_label = "module"

    def __init__(self, name: str, members: MappingProxyType) -> None:
        object.__setattr__(self, "_facade_name", name)
        object.__setattr__(self, "_facade_members", members)

    def __getattr__(self, attr: str) -> Any:
        try:
            return self._facade_members[attr]
        except KeyError:
            raise AttributeError(
                f"module {self._facade_name!r} has no attribute {attr!r} in scripts") from None

    def __setattr__(self, attr: str, value: Any) -> None:
        raise TypeError(f"module {self._facade_name!r} is read-only in scripts")

    def __delattr__(self, attr: str) -> None:
        raise TypeError(f"module {self._facade_name!r} is read-only in scripts")

    def __repr__(self) -> str:
        return f"<module {self._facade_name!r} (script façade)>"


def _iter_args(fn: Callable[..., Any], positions: tuple[int, ...] | None) -> Callable[..., Any]:
    """Wrap *fn* so the iterables at *positions* (None: all positional
    arguments) come from the iteration guard."""

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        args_l = list(args)
        idx = range(len(args_l)) if positions is None else positions
        for i in idx:
            if i < len(args_l):
                args_l[i] = guarded_iter(args_l[i])
        return fn(*args_l, **kwargs)

    wrapper.__name__ = getattr(fn, "__name__", "wrapper")
    wrapper.__qualname__ = wrapper.__name__
    wrapper.__doc__ = getattr(fn, "__doc__", None)
    return wrapper


_RE_ALLOWED_FLAGS = int(re.ASCII | re.IGNORECASE | re.LOCALE | re.MULTILINE
                        | re.DOTALL | re.VERBOSE | re.UNICODE)


def _re_flags(flags: Any) -> int:
    if isinstance(flags, bool) or not isinstance(flags, int):
        raise TypeError("re flags must be an int (e.g. re.IGNORECASE | re.MULTILINE)")
    if int(flags) & ~_RE_ALLOWED_FLAGS:
        raise ValueError("re.DEBUG and unknown flags are not available in scripts")
    return int(flags)


def _re_module() -> dict[str, Any]:
    def compile(pattern, flags=0):  # noqa: A001
        return re.compile(pattern, _re_flags(flags))

    def search(pattern, string, flags=0):
        return re.search(pattern, string, _re_flags(flags))

    def match(pattern, string, flags=0):
        return re.match(pattern, string, _re_flags(flags))

    def fullmatch(pattern, string, flags=0):
        return re.fullmatch(pattern, string, _re_flags(flags))

    def split(pattern, string, maxsplit=0, flags=0):
        return re.split(pattern, string, maxsplit=maxsplit, flags=_re_flags(flags))

    def findall(pattern, string, flags=0):
        return re.findall(pattern, string, _re_flags(flags))

    def finditer(pattern, string, flags=0):
        return re.finditer(pattern, string, _re_flags(flags))

    def sub(pattern, repl, string, count=0, flags=0):
        return re.sub(pattern, repl, string, count=count, flags=_re_flags(flags))

    def subn(pattern, repl, string, count=0, flags=0):
        return re.subn(pattern, repl, string, count=count, flags=_re_flags(flags))

    members: dict[str, Any] = dict(
        compile=compile, search=search, match=match, fullmatch=fullmatch,
        split=split, findall=findall, finditer=finditer, sub=sub, subn=subn,
        escape=re.escape, error=re.error, Pattern=re.Pattern, Match=re.Match,
    )
    for flag in ("A", "ASCII", "I", "IGNORECASE", "L", "LOCALE", "M", "MULTILINE",
                 "S", "DOTALL", "X", "VERBOSE", "U", "UNICODE", "NOFLAG"):
        if hasattr(re, flag):
            members[flag] = getattr(re, flag)
    return members


def _json_module() -> dict[str, Any]:
    def dumps(obj, *, skipkeys=False, ensure_ascii=True, allow_nan=True, indent=None,
              separators=None, default=None, sort_keys=False):
        return json.dumps(obj, skipkeys=skipkeys, ensure_ascii=ensure_ascii,
                          allow_nan=allow_nan, indent=indent, separators=separators,
                          default=default, sort_keys=sort_keys)

    def loads(s, *, object_hook=None, parse_float=None, parse_int=None,
              parse_constant=None, object_pairs_hook=None):
        return json.loads(s, object_hook=object_hook, parse_float=parse_float,
                          parse_int=parse_int, parse_constant=parse_constant,
                          object_pairs_hook=object_pairs_hook)

    return dict(dumps=dumps, loads=loads, JSONDecodeError=json.JSONDecodeError)


def _hashlib_module() -> dict[str, Any]:
    def new(name, data=b"", **kwargs):
        if not isinstance(name, str) or name.lower() not in HASH_ALGORITHMS:
            raise ValueError(f"unsupported hash type {name!r} "
                             f"(available: {', '.join(sorted(HASH_ALGORITHMS))})")
        for key in kwargs:
            if key != "usedforsecurity":
                raise TypeError(f"hashlib.new() got an unexpected keyword argument {key!r}")
        return hashlib.new(name.lower(), data, **kwargs)

    members: dict[str, Any] = {alg: getattr(hashlib, alg) for alg in HASH_ALGORITHMS}
    members.update(new=new, algorithms_available=HASH_ALGORITHMS,
                   algorithms_guaranteed=HASH_ALGORITHMS)
    return members


_CSV_DIALECTS = frozenset({"excel", "excel-tab", "unix"})
_CSV_PARAMS = frozenset({"delimiter", "quotechar", "escapechar", "doublequote",
                         "skipinitialspace", "lineterminator", "quoting", "strict"})


def _csv_check(dialect: Any, fmtparams: dict) -> None:
    if dialect not in _CSV_DIALECTS:
        raise ValueError(f"csv dialect must be one of {', '.join(sorted(_CSV_DIALECTS))}")
    for key in fmtparams:
        if key not in _CSV_PARAMS:
            raise TypeError(f"unexpected csv format parameter {key!r}")


def _csv_module() -> dict[str, Any]:
    def reader(iterable, dialect="excel", **fmtparams):
        _csv_check(dialect, fmtparams)
        return csv.reader(guarded_iter(iterable), dialect, **fmtparams)

    def DictReader(iterable, fieldnames=None, restkey=None, restval=None,
                   dialect="excel", **fmtparams):
        _csv_check(dialect, fmtparams)
        if fieldnames is not None:
            fieldnames = guarded_list(fieldnames)
        return csv.DictReader(guarded_iter(iterable), fieldnames=fieldnames,
                              restkey=restkey, restval=restval, dialect=dialect,
                              **fmtparams)

    return dict(reader=reader, DictReader=DictReader, Error=csv.Error,
                QUOTE_ALL=csv.QUOTE_ALL, QUOTE_MINIMAL=csv.QUOTE_MINIMAL,
                QUOTE_NONE=csv.QUOTE_NONE, QUOTE_NONNUMERIC=csv.QUOTE_NONNUMERIC)


def _itertools_module() -> dict[str, Any]:
    it = itertools
    members: dict[str, Any] = dict(
        accumulate=_iter_args(it.accumulate, (0,)),
        chain=_iter_args(it.chain, None),
        compress=_iter_args(it.compress, (0, 1)),
        count=it.count,
        cycle=_iter_args(it.cycle, (0,)),
        dropwhile=_iter_args(it.dropwhile, (1,)),
        filterfalse=_iter_args(it.filterfalse, (1,)),
        groupby=_iter_args(it.groupby, (0,)),
        islice=_iter_args(it.islice, (0,)),
        pairwise=_iter_args(it.pairwise, (0,)),
        permutations=_iter_args(it.permutations, (0,)),
        product=_iter_args(it.product, None),
        combinations=_iter_args(it.combinations, (0,)),
        combinations_with_replacement=_iter_args(it.combinations_with_replacement, (0,)),
        repeat=it.repeat,
        starmap=_iter_args(it.starmap, (1,)),
        takewhile=_iter_args(it.takewhile, (1,)),
        tee=_iter_args(it.tee, (0,)),
        zip_longest=_iter_args(it.zip_longest, None),
    )

    def from_iterable(iterables):
        return it.chain.from_iterable(map(guarded_iter, guarded_iter(iterables)))

    members["chain"].from_iterable = from_iterable
    return members


def _functools_module() -> dict[str, Any]:
    return dict(
        reduce=_iter_args(functools.reduce, (1,)),
        partial=functools.partial,
        cmp_to_key=functools.cmp_to_key,
        lru_cache=functools.lru_cache,
        cache=functools.cache,
    )


def _math_module() -> dict[str, Any]:
    members = {n: getattr(math, n) for n in dir(math) if not n.startswith("_")}
    members["fsum"] = _iter_args(math.fsum, (0,))
    members["prod"] = _iter_args(math.prod, (0,))
    return members


def _fnmatch_module() -> dict[str, Any]:
    return dict(fnmatch=fnmatch.fnmatch, fnmatchcase=fnmatch.fnmatchcase,
                filter=_iter_args(fnmatch.filter, (0,)), translate=fnmatch.translate)


def _string_module() -> dict[str, Any]:
    members: dict[str, Any] = {
        n: getattr(string, n) for n in (
            "ascii_letters", "ascii_lowercase", "ascii_uppercase", "digits",
            "hexdigits", "octdigits", "punctuation", "printable", "whitespace")
    }
    members.update(capwords=string.capwords, Template=string.Template)
    return members   # no Formatter (CVE-2026-76825 family)


def _collections_module() -> dict[str, Any]:
    return dict(Counter=collections.Counter, OrderedDict=collections.OrderedDict,
                defaultdict=collections.defaultdict, deque=collections.deque,
                ChainMap=collections.ChainMap)   # no namedtuple: it builds classes


def _datetime_module() -> dict[str, Any]:
    members = dict(date=datetime.date, datetime=datetime.datetime, time=datetime.time,
                   timedelta=datetime.timedelta, timezone=datetime.timezone,
                   MINYEAR=datetime.MINYEAR, MAXYEAR=datetime.MAXYEAR)
    if hasattr(datetime, "UTC"):
        members["UTC"] = datetime.UTC
    return members


def _time_module() -> dict[str, Any]:
    def sleep(seconds):
        raise RuntimeError("time.sleep() is not available in scripts: a handler must "
                           "not block (its wall-clock timeout keeps running)")

    members: dict[str, Any] = {
        n: getattr(time, n) for n in (
            "time", "time_ns", "monotonic", "monotonic_ns", "perf_counter",
            "perf_counter_ns", "process_time", "process_time_ns", "gmtime",
            "localtime", "mktime", "strftime", "strptime", "asctime", "ctime",
            "struct_time", "timezone", "altzone", "daylight")
    }
    members["tzname"] = tuple(time.tzname)
    members["sleep"] = sleep
    return members


def _build_facades() -> dict[str, MappingProxyType]:
    builders = {
        "collections": _collections_module, "csv": _csv_module,
        "datetime": _datetime_module, "fnmatch": _fnmatch_module,
        "functools": _functools_module, "hashlib": _hashlib_module,
        "itertools": _itertools_module, "json": _json_module, "math": _math_module,
        "re": _re_module, "string": _string_module, "time": _time_module,
    }
    assert set(builders) == set(ALLOWED_MODULES)
    return {name: MappingProxyType(build()) for name, build in builders.items()}


FACADES: dict[str, MappingProxyType] = _build_facades()


def make_importer() -> Callable[..., ModuleFacade]:
    """A ``__import__`` for one handler call: allow-listed façades only."""
    cache: dict[str, ModuleFacade] = {}

    def guarded_import(name: str, globals: Any = None, locals: Any = None,
                       fromlist: Any = (), level: int = 0) -> ModuleFacade:
        if level != 0:
            raise ImportError("relative imports are not allowed in scripts")
        members = FACADES.get(name) if type(name) is str else None
        if members is None:
            raise ImportError(not_allowed_module_message(str(name)))
        module = cache.get(name)
        if module is None:
            module = cache[name] = ModuleFacade(name, members)
        return module

    return guarded_import


# ---------------------------------------------------------------------------
# Globals for one handler call
# ---------------------------------------------------------------------------


def make_globals(print_factory: Callable[..., Any], script_name: str = "script") -> dict[str, Any]:
    """Fresh globals (and a fresh builtins dict) for one execution of a script.

    *print_factory* is the ``_print_`` hook: called with ``_getattr_`` in
    every scope that uses ``print``, it returns an object with
    ``_call_print(*objects, **kw)`` and ``__call__()`` (for ``printed``).
    """
    b = dict(_BASE_BUILTINS)
    b["__import__"] = make_importer()
    return {
        "__builtins__": b,
        "__name__": script_name,
        "_getattr_": guarded_getattr,
        "_getitem_": guarded_getitem,
        "_getiter_": guarded_iter,
        "_iter_unpack_sequence_": guarded_iter_unpack_sequence,
        "_unpack_sequence_": guarded_unpack_sequence,
        "_write_": guarded_write,
        "_inplacevar_": guarded_inplacevar,
        "_apply_": guarded_apply,
        "_print_": print_factory,
    }
