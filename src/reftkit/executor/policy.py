"""The in-interpreter layers: static AST check, restricted builtins, import allow-list, audit-hook policy.

None of these is a security boundary on its own (CPython was not designed to confine code running inside
it); they make escapes hard and classify attempts as `forbidden`. The kernel layers in sandbox.py are what
holds if they are bypassed.
"""

from __future__ import annotations

import ast
import builtins
import os
import re
import sys
import types
import weakref
from collections.abc import Callable, Iterator

# Names a program may not mention at all, whether as a builtin or as its own variable.
FORBIDDEN_NAMES = frozenset(
    {
        "eval", "exec", "compile", "open", "input", "breakpoint", "globals", "locals", "vars", "getattr",
        "setattr", "delattr", "help", "exit", "quit", "memoryview", "copyright", "credits", "license",
        "import_module", "attrgetter", "methodcaller", "get_field", "get_class", "eval_expr", "stringify_expr",
    }
)
# Library functions that hand out any attribute of any loaded module by a string ("os.getcwd", "sys"): sympy's
# external.import_module and utilities.source.get_class (red team, third pass: get_class('sys._getframe') led
# to the audit policy's frame). Refused as names, as attributes, as imported names (`from m import x as y`),
# and never handed out by a module proxy.
# sympy.parsing.sympy_parser's eval_expr and stringify_expr (fourth pass) run code or call the program's
# transformations with a namespace dict: eval puts the real builtins into a dict the program passed, and
# parse_expr's own global namespace holds the real builtin functions (getattr, eval, open, __import__).
GADGET_NAMES = frozenset({"import_module", "get_class", "attrgetter", "methodcaller", "get_field", "eval_expr",
                          "stringify_expr"})
# Frame, code and generator internals: the usual first step from any object to a module's globals.
INTROSPECTION_ATTRS = frozenset(
    {
        "gi_frame", "gi_code", "gi_yieldfrom", "cr_frame", "cr_code", "cr_await", "ag_frame", "ag_code",
        "ag_await", "tb_frame", "tb_next", "f_back", "f_globals", "f_locals", "f_builtins", "f_code", "f_trace",
        "co_code", "co_consts", "co_names", *GADGET_NAMES,
    }
)
SAFE_DUNDER_ATTRS = frozenset({"__init__"})  # super().__init__(...) in a program's own classes
# For code libraries compile at run time (dataclass and namedtuple methods use __class__, __setattr__...),
# only the dunders that lead from an object to other objects' internals are refused.
ESCAPE_DUNDERS = frozenset(
    {
        "__subclasses__", "__globals__", "__builtins__", "__code__", "__closure__", "__mro__", "__bases__",
        "__base__", "__dict__", "__self__", "__func__", "__getattribute__", "__reduce__", "__reduce_ex__",
        "__loader__", "__spec__", "__import__", "__traceback__", "__frame__", "__objclass__", "__wrapped__",
    }
)
SAFE_DUNDER_NAMES = frozenset({"__name__"})  # `if __name__ == "__main__":` (set to "__sandbox__")
# `case int(x)` matches the subject itself for these builtins; any other class's positional patterns read
# attributes named by the class's __match_args__, which a class built with type(...) sets from strings.
SELF_MATCHING_CLASSES = frozenset(
    {"bool", "bytearray", "bytes", "dict", "float", "frozenset", "int", "list", "set", "str", "tuple"}
)
_DUNDER_TEXT = re.compile(r"\s*__\w+__\s*")  # a string naming a dunder: type(..., {'__match_args__': ...})
_FORMAT_FIELD_PRIVATE = re.compile(r"\{[^{}]*\.\s*_")  # "{0.__class__}".format(x) walks attributes
# Code compiled by a library on the program's behalf (non-strict check) may not name these as attributes or
# import them: lambdify prints a symbol's name verbatim into the code it compiles, so Symbol('builtins.getattr')
# or Symbol('libmp.backend.os') reached the real builtins and os (red team, third pass).
LIBRARY_FORBIDDEN_MODULES = frozenset(
    {
        "os", "posix", "nt", "sys", "builtins", "importlib", "io", "_io", "pathlib", "shutil", "subprocess",
        "_posixsubprocess", "socket", "_socket", "ctypes", "_ctypes", "cffi", "multiprocessing", "threading",
        "_thread", "signal", "_signal", "resource", "fcntl", "mmap", "gc", "inspect", "types", "marshal", "pickle",
        "_pickle", "code", "codeop", "runpy", "pkgutil", "zipimport", "site", "sysconfig", "linecache", "traceback",
        "warnings", "tempfile", "glob", "select", "selectors", "asyncio", "pty", "codecs", "reftkit", "operator",
        "_operator", "string", "copyreg", "weakref", "_weakref", "faulthandler", "pdb", "bdb", "_imp",
        "_frozen_importlib", "_frozen_importlib_external",
    }
)
# Attributes library code may not read either (fourth pass: a symbol's name printed by lambdify read a module
# proxy's private state and re-initialised the import function with a larger allow-list).
LIBRARY_FORBIDDEN_DUNDERS = frozenset({"__init__"})
_TRY_NODES = tuple(getattr(ast, name) for name in ("Try", "TryStar") if hasattr(ast, name))  # may have a finally

# Builtins a program keeps. Missing on purpose: open, eval, exec, compile, input, breakpoint, globals,
# locals, vars, getattr/setattr/delattr, help, exit/quit, memoryview; __import__ is replaced.
_SAFE_BUILTINS = (
    "abs", "aiter", "all", "anext", "any", "ascii", "bin", "bool", "bytearray", "bytes", "callable", "chr",
    "classmethod", "complex", "dict", "dir", "divmod", "enumerate", "filter", "float", "format", "frozenset",
    "hasattr", "hash", "hex", "id", "int", "isinstance", "issubclass", "iter", "len", "list", "map", "max", "min",
    "next", "object", "oct", "ord", "pow", "print", "property", "range", "repr", "reversed", "round", "set",
    "slice", "sorted", "staticmethod", "str", "sum", "super", "tuple", "type", "zip", "NotImplemented",
    "Ellipsis", "__build_class__",
)


class Forbidden(BaseException):
    """A policy violation. BaseException so that `except Exception` in the program does not swallow it
    (a bare `except:` can, which is why violations are also recorded where the program cannot reach)."""


class OutputLimitExceeded(BaseException):
    """The program printed more than max_output_bytes."""


# --------------------------------------------------------------------------------------- static check


def is_allowed_module(name: str, allowed: frozenset[str]) -> bool:
    """Whether `name` is an allowed module or a submodule of one."""
    parts = name.split(".")
    return any(".".join(parts[:i]) in allowed for i in range(1, len(parts) + 1))


def check_program(tree: ast.AST, allowed: frozenset[str]) -> str | None:
    """The first reason to refuse a program before running it, or None. Strict: no attribute starting with
    an underscore (bar `__init__`), no dunder name (bar `__name__`), no forbidden name, only allowed imports,
    and nothing the compiler would blow up in the worker (compile_violation: only a `finally` can, so the
    estimate is made only for a program that has one)."""
    finals: list[ast.AST] = []
    reason = next(_violations(tree, strict=True, allowed=allowed, finals=finals), None)
    return reason if reason is not None or not finals else compile_violation(tree)


# What the worker's compile of one program may cost, in AST nodes after the compiler's copies of `finally`
# bodies. A program of the 100,000-character cap without such copies is at most ~100,000 (a list of 33,000
# numbers: 33,000); 16 nested `try/finally` blocks (2 KB of text) are ~590,000 units, 0.9 s and 200 MB of
# the worker's CPU and memory (CPython 3.11), and each further level doubles that: 20 levels, 3 KB of text,
# took 16 s and 3 GB, and nothing bounds the worker's memory.
COMPILE_COST_LIMIT = 250_000


def compile_cost(tree: ast.AST) -> int:
    """An upper estimate of the size of what CPython compiles `tree` into, in AST nodes. Linear in the text
    except where the compiler copies code: the body of a `finally` is emitted once for the normal path, once
    for the exceptional path and once more at every `return`, `break` and `continue` that leaves its `try`
    (counted here wherever they are inside it), so nested `try/finally` blocks grow it exponentially.
    Iterative: the tree may be deeper than the recursion limit."""
    cost: dict[int, int] = {}
    exits: dict[int, int] = {}
    stack: list[tuple[ast.AST, bool]] = [(tree, False)]
    while stack:
        node, done = stack.pop()
        children = list(ast.iter_child_nodes(node))
        if not done:
            stack.append((node, True))
            stack.extend((child, False) for child in children)
            continue
        own_exit = int(isinstance(node, (ast.Return, ast.Break, ast.Continue)))
        exits[id(node)] = own_exit + sum(exits[id(c)] for c in children)
        finalbody = getattr(node, "finalbody", None) if isinstance(node, _TRY_NODES) else None
        if finalbody:
            final_ids = {id(c) for c in finalbody}
            guarded = [c for c in children if id(c) not in final_ids]
            copies = 2 + sum(exits[id(c)] for c in guarded)
            cost[id(node)] = 1 + sum(cost[id(c)] for c in guarded) + copies * sum(cost[id(c)] for c in finalbody)
        else:
            cost[id(node)] = 1 + sum(cost[id(c)] for c in children)
    return cost[id(tree)]


def compile_violation(tree: ast.AST) -> str | None:
    """Why compiling `tree` in the worker would cost too much (compile_cost over COMPILE_COST_LIMIT), or None."""
    cost = compile_cost(tree)
    if cost > COMPILE_COST_LIMIT:
        return (
            f"program too costly to compile (~{min(cost, 10**12):,} nodes once `finally` bodies are copied; limit "
            f"{COMPILE_COST_LIMIT:,})"
        )
    return None


def check_library_code(source: object) -> str | None:
    """Check for code that a library compiles at run time on the program's behalf (sympify, lambdify,
    namedtuple, dataclasses): no forbidden name (eval, getattr, open...), no escape dunder (ESCAPE_DUNDERS),
    no frame attribute. Imports and other dunders are the library's business."""
    try:
        tree = source if isinstance(source, ast.AST) else ast.parse(source)
    except (SyntaxError, ValueError, TypeError, MemoryError, RecursionError):
        return None  # compile() itself will fail on it
    reason = next(_violations(tree, strict=False, allowed=frozenset()), None)
    return reason if reason is not None else _library_name_violation(tree)


def _library_name_violation(tree: ast.AST) -> str | None:
    """A free name of library code that names a module: lambdify runs its code in a namespace holding the real
    `builtins` and whatever `from mpmath import *` binds (`libmp`, `ctx_mp`, ...: real modules), and prints a
    symbol's name verbatim (fourth pass: `Symbol('builtins')`, `Symbol('libmp.backend')`). Names the code binds
    itself (the lambdified function's parameters) are not free."""
    bound = {a.arg for a in ast.walk(tree) if isinstance(a, ast.arg)}
    bound |= {n.id for n in ast.walk(tree) if isinstance(n, ast.Name) and not isinstance(n.ctx, ast.Load)}
    modules = module_valued_names()
    for node in ast.walk(tree):
        if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Load) and node.id not in bound:
            if node.id in LIBRARY_FORBIDDEN_MODULES or node.id in modules:
                return f"forbidden name {node.id} (a module) (line {getattr(node, 'lineno', '?')})"
    return None


_module_names_cache: list = [0, frozenset()]


def module_valued_names() -> frozenset[str]:
    """Names that `from m import *` binds to a module, for any loaded module m, less names it binds to something
    else for another one (mpmath's `zeta` is a function, mpmath.functions' `zeta` a module). Cached while no
    module is loaded; the worker computes it once before forking."""
    if _module_names_cache[0] == len(sys.modules):
        return _module_names_cache[1]
    modules, others = set(), set()
    for module in list(sys.modules.values()):
        try:
            names = _public_names(module) if isinstance(module, types.ModuleType) else []
            namespace = vars(module)
        except Exception:  # noqa: BLE001 -- a module with an odd __all__ or namespace exports nothing here
            continue
        for name in names:
            value = namespace.get(name)
            (modules if isinstance(value, types.ModuleType) else others).add(name)
    result = frozenset(modules - others)
    _module_names_cache[:] = [len(sys.modules), result]
    return result



def _violations(tree: ast.AST, strict: bool, allowed: frozenset[str], finals: list | None = None) -> Iterator[str]:
    module_level = {id(n) for n in getattr(tree, "body", [])}
    for node in ast.walk(tree):
        if finals is not None and isinstance(node, _TRY_NODES) and node.finalbody:
            finals.append(node)
        yield from _node_violations(node, strict, allowed, id(node) in module_level)


def _node_violations(node: ast.AST, strict: bool, allowed: frozenset[str], top: bool) -> Iterator[str]:
    line = getattr(node, "lineno", "?")
    if isinstance(node, (ast.Import, ast.ImportFrom)):
        yield from _import_violations(node, allowed) if strict else _library_import_violations(node)
    yield from (f"forbidden attribute .{a} (line {line})" for a in _attributes(node) if _bad_attr(a, strict))
    yield from (f"forbidden name {n} (line {line})" for n in _names(node, top) if _bad_name(n, strict))
    if isinstance(node, ast.Constant) and isinstance(node.value, str) and _format_reaches_private(node.value):
        yield f"format string reaching a private attribute (line {line})"
    if strict and isinstance(node, ast.Constant) and isinstance(node.value, str) and _names_dunder(node.value):
        yield f"string naming a dunder attribute (line {line})"
    if strict and isinstance(node, ast.Attribute) and node.attr in SAFE_DUNDER_ATTRS and not _on_super(node.value):
        yield f"forbidden attribute .{node.attr} other than super().{node.attr} (line {line})"
    if strict and isinstance(node, ast.MatchClass) and node.patterns and not _self_matching(node):
        yield f"positional class pattern on a class other than a builtin type (line {line})"


def _on_super(node: ast.AST) -> bool:
    """`super()` or `super(C, self)`: re-running a library object's __init__ (a module proxy's, fourth pass)
    re-pointed it at another module and importer."""
    return isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "super"


def _names_dunder(text: str) -> bool:
    return _DUNDER_TEXT.fullmatch(text) is not None and text.strip() != "__main__"


def _self_matching(node: ast.MatchClass) -> bool:
    return isinstance(node.cls, ast.Name) and node.cls.id in SELF_MATCHING_CLASSES and len(node.patterns) == 1


def _format_reaches_private(text: str) -> bool:
    return "{" in text and _FORMAT_FIELD_PRIVATE.search(text) is not None


def _attributes(node: ast.AST) -> list[str]:
    """Attribute names a node reads or writes. `case int(__class__=c)` reads one too."""
    if isinstance(node, ast.Attribute):
        return [node.attr]
    if isinstance(node, ast.MatchClass):
        return list(node.kwd_attrs)
    return []


def _names(node: ast.AST, top: bool) -> list[str]:
    """Identifiers a node uses or binds. Module-level defs count: `def __builtins__` would swap builtins."""
    if isinstance(node, ast.Name):
        return [node.id]
    if isinstance(node, (ast.Global, ast.Nonlocal)):
        return list(node.names)
    if isinstance(node, ast.alias):
        return [node.asname] if node.asname else []
    if isinstance(node, (ast.ExceptHandler, ast.MatchAs, ast.MatchStar)):
        return [node.name] if node.name else []
    if isinstance(node, ast.MatchMapping):
        return [node.rest] if node.rest else []
    if top and isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        return [node.name]
    return []


def _bad_attr(attr: str, strict: bool) -> bool:
    if attr in INTROSPECTION_ATTRS:
        return True
    if not strict:  # library code: `re.compile` is fine, `builtins.getattr`, `x.os`, `x.sys` are not
        private = attr.startswith("_") and not (attr.startswith("__") and attr.endswith("__"))
        return (attr in ESCAPE_DUNDERS or (attr in FORBIDDEN_NAMES and attr != "compile") or private
                or attr in LIBRARY_FORBIDDEN_MODULES or attr in LIBRARY_FORBIDDEN_DUNDERS)
    return attr.startswith("_") and attr not in SAFE_DUNDER_ATTRS


def _bad_name(name: str, strict: bool = True) -> bool:
    if name in FORBIDDEN_NAMES:
        return True
    if not strict:
        return name in ESCAPE_DUNDERS
    return name.startswith("__") and name not in SAFE_DUNDER_NAMES


def _import_violations(node: ast.Import | ast.ImportFrom, allowed: frozenset[str]) -> Iterator[str]:
    if isinstance(node, ast.Import):
        modules = [a.name for a in node.names]
    elif node.level or not node.module:
        yield f"ImportError: relative import not allowed (line {node.lineno})"
        return
    else:
        modules = [node.module]
        # `from m import import_module as im` binds only `im`: the imported name itself is checked here
        refused = [a.name for a in node.names if a.name.startswith("_") or a.name in FORBIDDEN_NAMES or
                   a.name in INTROSPECTION_ATTRS]
        yield from (f"ImportError: {name} not allowed (line {node.lineno})" for name in refused)
    for module in modules:
        if not is_allowed_module(module, allowed):
            yield f"ImportError: {module} not allowed"


def _library_import_violations(node: ast.Import | ast.ImportFrom) -> Iterator[str]:
    """Imports in code a library compiles (lambdify's `from math import *`): not of the interpreter's internals."""
    if isinstance(node, ast.Import):
        refused = [a.name for a in node.names if a.name.partition(".")[0] in LIBRARY_FORBIDDEN_MODULES]
    elif node.level or not node.module:
        refused = ["relative import" if node.level else "a module"]
    else:
        refused = [node.module] if node.module.partition(".")[0] in LIBRARY_FORBIDDEN_MODULES else []
    if isinstance(node, ast.ImportFrom) and any(a.name in FORBIDDEN_NAMES or a.name in INTROSPECTION_ATTRS
                                                for a in node.names):
        refused.append("forbidden name")
    yield from (f"import of {what} in library code" for what in refused)


# ----------------------------------------------------------------------------------- imports, builtins


# Each proxy's module name and importer, kept here, not on the proxy: anything on the proxy instance can be
# rewritten by code that reaches object.__setattr__ or the proxy's __init__ (fourth pass: `math.__init__(M(),
# fake)` with M().__name__ == 'sys' made `math.modules` the real sys.modules).
_PROXIED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


class ModuleProxy(types.ModuleType):
    """What `import x` gives a program: the public, non-module attributes of x, plus submodules that are
    themselves allowed (also proxied). So `fractions.sys` or `statistics.random._os` lead nowhere."""

    def __init__(self, module: types.ModuleType, importer: Importer) -> None:
        if self in _PROXIED or not isinstance(module, types.ModuleType):
            raise TypeError("a module proxy is initialised once, with a module")
        name = types.ModuleType.__getattribute__(module, "__name__")
        if type(name) is not str or sys.modules.get(name) is not module:
            raise TypeError("a module proxy is initialised with a loaded module")
        super().__init__(name, getattr(module, "__doc__", None))
        _PROXIED[self] = (name, importer)
        self.__all__ = [n for n in _public_names(module) if importer.exposes(module, n)]

    def copy(self) -> ModuleProxy:
        """A pristine twin: attributes a program sets on it are not seen through this one."""
        twin = ModuleProxy.__new__(ModuleProxy)
        vars(twin).update(vars(self))
        _PROXIED[twin] = _PROXIED[self]
        return twin

    def __getattr__(self, name: str) -> object:
        if name.startswith("_") or name in GADGET_NAMES:
            raise AttributeError(name)
        module_name, importer = _PROXIED[self]  # KeyError: a proxy made without __init__
        value = getattr(sys.modules[module_name], name)
        if isinstance(value, types.ModuleType):
            if not importer.allows(value.__name__):
                raise AttributeError(f"module {module_name!r} has no attribute {name!r}")
            return importer.proxy(value)
        return _checked_library_function(value, importer)


def _checked_library_function(value: object, importer: Importer) -> object:
    """sympy's parse_expr (and so sympy.parse_expr) as handed to a program: without a global_dict of the
    program's (eval puts the real builtins into it) and with sympy's own transformations only (each is called with
    parse_expr's global namespace, which holds the real getattr, eval, open and __import__). Fourth pass."""
    parser = sys.modules.get("sympy.parsing.sympy_parser")
    if parser is None or value is not getattr(parser, "parse_expr", None):
        return value
    real, deny = value, importer._on_violation
    home = real.__globals__

    def parse_expr(s, local_dict=None, transformations=parser.standard_transformations, global_dict=None,
                   evaluate=True):
        if global_dict is not None:
            deny("blocked: parse_expr with a global_dict (eval puts the real builtins into it)")
        if not isinstance(transformations, str):
            for t in transformations:
                if type(t) is not types.FunctionType or t.__globals__ is not home:
                    deny("blocked: parse_expr with a transformation that is not sympy's")
        return real(s, local_dict, transformations, None, evaluate)

    parse_expr.__doc__ = real.__doc__
    return parse_expr


def _public_names(module: types.ModuleType) -> list[str]:
    names = getattr(module, "__all__", None)
    if names is None:
        names = [n for n in vars(module) if not n.startswith("_")]
    return [n for n in names if isinstance(n, str) and not n.startswith("_") and n not in GADGET_NAMES]


class Importer:
    """The program's __import__: allow-listed modules only, returned as ModuleProxy objects."""

    def __init__(self, allowed: frozenset[str], on_violation: Callable[[str], None]) -> None:
        if "allowed" in vars(self):  # never re-initialised (with a larger allow-list)
            raise TypeError("an importer is initialised once")
        self.allowed = allowed
        self._on_violation = on_violation
        self._proxies: dict[str, ModuleProxy] = {}
        self._templates = self._proxies  # the worker's proxies; after forget(), programs get copies of them

    def allows(self, name: str) -> bool:
        return is_allowed_module(name, self.allowed)

    def exposes(self, module: types.ModuleType, name: str) -> bool:
        value = getattr(module, name, None)
        return not isinstance(value, types.ModuleType) or self.allows(value.__name__)

    def proxy(self, module: types.ModuleType) -> ModuleProxy:
        cached = self._proxies.get(module.__name__)
        if cached is None:
            template = self._templates.get(module.__name__)
            cached = template.copy() if template is not None else ModuleProxy(module, self)
            self._proxies[module.__name__] = cached
        return cached

    def forget(self) -> None:
        """Before each program of a shared child: its imports get fresh copies of the proxies."""
        self._proxies = {}

    def __call__(self, name: str, globals=None, locals=None, fromlist=(), level: int = 0) -> object:
        if isinstance(fromlist, list) and level == 0 and type(name) is str:
            # PyImport_Import: C code (datetime.strptime needing _strptime, ...) importing for itself via the
            # calling frame's builtins, with fromlist ['__doc__']. It calls us only for the side effect and
            # then takes the module from sys.modules itself, so the real module is never handed back here:
            # a program that reaches this function (through a __globals__ it should not have) gets a proxy
            # of an allowed module, or nothing. Fresh imports still meet the audit hook.
            module = builtins.__import__(name, None, None, None, 0)
            return self.proxy(module) if self.allows(name) else None
        if level != 0 or not self.allows(name):
            self._on_violation(f"ImportError: {name if level == 0 else 'relative import'} not allowed")
        module = builtins.__import__(name, None, None, fromlist, 0)
        if fromlist:
            for item in fromlist:
                if item != "*" and (not isinstance(item, str) or item.startswith("_")):
                    self._on_violation(f"ImportError: {item} not allowed")
        return self.proxy(module)


def safe_builtins(importer: Importer) -> dict[str, object]:
    """The builtins namespace programs run with."""
    namespace = {name: getattr(builtins, name) for name in _SAFE_BUILTINS if hasattr(builtins, name)}
    exceptions = {n: v for n, v in vars(builtins).items() if isinstance(v, type) and issubclass(v, BaseException)}
    namespace.update(exceptions)
    namespace["__import__"] = importer
    namespace["__name__"] = "builtins"
    return namespace


class CappedOutput:
    """sys.stdout/sys.stderr replacement: keeps up to `limit` characters, raises past it."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.parts: list[str] = []
        self.size = 0
        self.exceeded = False

    def write(self, text: object) -> int:
        text = str.__str__(text) if isinstance(text, str) else str(text)
        self.size += len(text)
        if self.size > self.limit:
            self.exceeded = True
            raise OutputLimitExceeded(f"output limit of {self.limit} bytes exceeded")
        self.parts.append(text)
        return len(text)

    def flush(self) -> None:
        pass

    def isatty(self) -> bool:
        return False

    def getvalue(self) -> str:
        return "".join(self.parts)


# ---------------------------------------------------------------------------------------- audit hook

# Modules whose fresh import from library code (e.g. sympy.external.import_module) is refused.
_DANGEROUS_MODULES = frozenset(
    {
        "ctypes", "_ctypes", "cffi", "subprocess", "_posixsubprocess", "socket", "_socket", "ssl", "_ssl",
        "asyncio", "multiprocessing", "_multiprocessing", "concurrent", "pty", "fcntl", "mmap", "resource",
        "shutil", "tempfile", "pickle", "_pickle", "shelve", "dbm", "code", "codeop", "pdb", "bdb", "webbrowser",
        "urllib", "http", "ftplib", "smtplib", "poplib", "imaplib", "telnetlib", "xmlrpc", "socketserver",
        "sqlite3", "_sqlite3", "faulthandler", "readline", "curses", "tkinter", "ensurepip", "venv", "pip",
    }
)
# Events that are harmless, or needed by allow-listed libraries at run time.
_ALLOWED_EVENTS = frozenset(
    {
        "exec",  # code objects only come from compile (checked), imports, or blocked constructors
        "builtins.id", "array.__new__", "sys._getframe",
        "sys._getframemodulename", "sys.excepthook", "sys.unraisablehook", "time.sleep",
        "os.putenv", "os.unsetenv",  # the child's own, already scrubbed, environment (numpy sets some)
    }
)
_FRAME_ATTRS = frozenset({"tb_frame", "gi_frame", "cr_frame", "ag_frame", "f_back"})
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
_READ_EVENTS = frozenset({"os.listdir", "os.scandir", "os.walk", "os.fwalk", "glob.glob", "glob.glob/2"})


class AuditPolicy:
    """sys.addaudithook callback, installed in the child just before the program runs.

    Default deny: an event not listed is refused. Allowed with checks: imports (not of dangerous modules),
    opening files read-only under the read roots, listing directories there, compiling source that passes
    check_library_code, unmarshalling from the import system. The first violation is recorded in
    `violation`, out of the program's reach, so catching the exception does not hide it.

    The checks never run program code: arguments are used only when they are exactly (or are converted
    with the base-class methods of) str or bytes; anything else (a path-like object, a str subclass with
    its own __str__ or __fspath__) is refused rather than converted.
    """

    def __init__(self, read_roots: tuple[str, ...]) -> None:
        self.read_roots = read_roots
        self.violation: str | None = None
        self.final: Callable[[str], None] | None = None  # the child's way out at the first violation
        self._checking = False

    def deny(self, reason: str) -> None:
        if self.violation is None:
            self.violation = reason
            if self.final is not None:
                self.final(reason)  # does not return: the program's result is written, the child leaves
        raise Forbidden(reason)

    def __call__(self, event: str, args: tuple) -> None:
        if event in _ALLOWED_EVENTS:
            return
        if self._checking:  # our own check at work: ast.parse compiles, the frame check reads frames
            if event in ("compile", "sys._getframe", "object.__getattr__"):
                return
            self.deny(f"blocked audit event: {event}")
        self._checking = True
        try:
            reason = self._judge(event, args)
        finally:
            self._checking = False
        if reason is not None:
            self.deny(reason)

    def _judge(self, event: str, args: tuple) -> str | None:
        if event == "import":
            name = _plain(args[0]) or ""
            top = name.partition(".")[0]
            return f"ImportError: {top} not allowed" if top in _DANGEROUS_MODULES or not top else None
        if event == "open":
            return self._judge_open(*args[:3])
        if event in _READ_EVENTS:
            return self._judge_path(args[0] if args else None, event)
        if event == "compile":
            return self._judge_compile(args[0])
        if event == "object.__getattr__":
            name = _plain(args[1]) or ""
            return f"blocked: access to .{name}" if name in _FRAME_ATTRS else None
        if event in ("object.__setattr__", "object.__delattr__"):
            return _judge_setattr(args)
        if event in ("marshal.loads", "marshal.load"):
            return None if _called_from_import_system() else f"blocked audit event: {event}"
        return f"blocked audit event: {event}"

    def _judge_open(self, path: object, mode: object, flags: object) -> str | None:
        mode = _plain(mode) or ""
        writing = any(c in mode for c in "wax+") or (type(flags) is int and flags & _WRITE_FLAGS)
        if writing:
            return f"blocked: open {_plain(path) or 'a file'!r} for writing"
        return self._judge_path(path, "open")

    def _judge_path(self, path: object, what: str) -> str | None:
        if path is None:
            path = "."
        if type(path) is int:
            return f"blocked: {what} of file descriptor {path}"
        text = _plain(path)
        if text is None:
            return f"blocked: {what} of a non-path object (only str or bytes paths)"
        try:
            full = os.path.realpath(text)
        except (OSError, ValueError):
            return f"blocked: {what} of an invalid path"
        if any(full == root or full.startswith(root.rstrip(os.sep) + os.sep) for root in self.read_roots):
            return None
        return f"blocked: {what} {text!r} (outside the sandbox)"

    def _judge_compile(self, source: object) -> str | None:
        if _called_from_import_system():  # a module imported from source (no .pyc)
            return None
        text = _plain(source)
        if text is None:
            return "blocked: compile of a non-text source"
        reason = check_library_code(text)
        return None if reason is None else f"eval/exec of code with {reason}"


def _judge_setattr(args: tuple) -> str | None:
    """Setting attributes on classes and functions is allowed (dataclasses, sympy), except what would
    switch the sandbox off from inside: any attribute of the executor's own classes, and a function's code
    or defaults (the audit hook's own code would be one of them)."""
    target, name = args[0], _plain(args[1]) or ""
    if name in ("__code__", "__defaults__", "__kwdefaults__"):
        return f"blocked: replacing a function's .{name}"
    module = type.__getattribute__(target, "__module__") if issubclass(type(target), type) else ""
    if isinstance(module, str) and module.startswith("reftkit."):
        return f"blocked: changing the executor's class {type.__getattribute__(target, '__name__')}"
    return None


def _plain(value: object) -> str | None:
    """`value` as an exact str, converted with base-class code only (a subclass's __str__ never runs);
    None unless it is a str or bytes (or a subclass)."""
    kind = type(value)  # type(), unlike isinstance(), cannot be fooled by a __class__ property
    if issubclass(kind, str):
        return str.__str__(value)
    if issubclass(kind, bytes):
        return bytes.__getitem__(value, slice(None)).decode("utf-8", "surrogateescape")
    return None


def _called_from_import_system() -> bool:
    try:
        caller = sys._getframe(2)  # 0: this function, 1: _judge, ... the hook is called straight from C
    except ValueError:
        return False
    while caller is not None and caller.f_code.co_filename.endswith("policy.py"):
        caller = caller.f_back
    return caller is not None and caller.f_code.co_filename.startswith("<frozen importlib")
