"""Module proxies, lambdify's namespace and parse_expr as ways out of Python's layers (production
configuration: the default allow-list with sympy, the in-Python layers on). Each program below once
returned `ok` holding a real module or builtin:

* a module proxy re-initialised by the program (`math.__init__(M(), fake)`, allowed as a "super().__init__"
  attribute, with M().__name__ == 'sys' and a fake importer): `math.modules` was the real sys.modules. No
  sympy needed. Now `.__init__` is allowed only on `super()`, and a proxy keeps its module name and importer out
  of the instance (and refuses a second __init__).
* lambdify's namespace: the bare name `builtins` (the real module) and the submodules `from mpmath import *`
  binds (`Symbol('libmp.backend')`); and lambdify-printed code reading private attributes (`x._importer_`, the
  import function, re-initialised with `os` allowed). Library code may no longer name a module as a free name,
  read a private attribute or call `__init__`.
* sympy's parse_expr: a program's transformation is called with parse_expr's global namespace (the real
  getattr, eval, open, __import__), and eval puts the real builtins into a `global_dict` the program passed.
"""

from __future__ import annotations

import pytest

from reftkit.executor import ProgramExecutor
from reftkit.executor.policy import check_library_code, check_program
from test_executor import FORBIDDEN, OK, prog
from test_executor_library_escapes import PRODUCTION

ESCAPES = {
    "proxy_reinit_to_sys": """
        import math
        class M:
            __name__ = 'sys'
        class Fake:
            def exposes(self, module, name):
                return False
            def allows(self, name):
                return True
            def proxy(self, value):
                return value
        def solution():
            math.__init__(M(), Fake())
            return str(math.modules['os'].getcwd())
        """,
    "lambdify_bare_builtins": """
        import sympy
        def solution():
            x = sympy.Symbol('x')
            b = sympy.lambdify([x], sympy.Symbol('builtins'), 'math')(1)
            return str(b.getattr)
        """,
    "lambdify_mpmath_submodule": """
        import sympy
        def solution():
            x = sympy.Symbol('x')
            return sympy.lambdify([x], sympy.Symbol('libmp.backend'), 'mpmath')(1).os.getcwd()
        """,
    "lambdify_private_attribute_importer": """
        import sympy
        def solution():
            x = sympy.Symbol('x')
            imp = sympy.lambdify([x], sympy.Symbol('x._importer_'), modules=[{}, 'math'])(sympy)
            sympy.lambdify([x], sympy.Symbol("x.__init__(x.allowed.union(('os',)), print)"), 'math')(imp)
            return imp('os', None, None, (), 0).getcwd()
        """,
    "lambdify_reinit_proxy": """
        import sympy
        class M:
            __name__ = 'sys'
        def solution():
            x, y = sympy.symbols('x y')
            sympy.lambdify([x, y], sympy.Symbol('x.__init__(y, x)'), 'math')(sympy, M())
            return 'reinitialised'
        """,
    "parse_expr_transformation_gets_builtins": """
        from sympy.parsing.sympy_parser import parse_expr, standard_transformations
        leak = []
        def t(tokens, local_dict, global_dict):
            leak.append(global_dict)
            return tokens
        def solution():
            parse_expr('1', transformations=standard_transformations + (t,))
            return str(leak[0]['get' + 'attr'])
        """,
    "parse_expr_global_dict_gets_builtins": """
        import sympy
        def solution():
            g = {}
            try:
                sympy.parse_expr('1', global_dict=g)
            except NameError:
                pass
            return str(g['__buil' + 'tins__']['ev' + 'al'])
        """,
    "eval_expr_gadget": """
        from sympy.parsing.sympy_parser import eval_expr as ee
        def solution():
            g = {}
            ee('1', {}, g)
            return str(g['__buil' + 'tins__']['ev' + 'al'])
        """,
}
BENIGN_LIBRARY = {
    "super_init": ("class A:\n    def __init__(self):\n        self.v = 3\nclass B(A):\n    def __init__(self):\n"
                   "        super().__init__()\n        self.v += 4\ndef solution():\n    return B().v\n", "7"),
    "lambdify_math": ("import sympy\ndef solution():\n    x = sympy.Symbol('x')\n"
                      "    return sympy.lambdify(x, sympy.sqrt(x) + 1, 'math')(9)\n", "4.0"),
    "lambdify_mpmath_zeta": ("import sympy\ndef solution():\n    x = sympy.Symbol('x')\n"
                             "    return round(float(sympy.lambdify(x, sympy.zeta(x), 'mpmath')(2)), 6)\n", "1.644934"),
    "lambdify_theta_argument": ("import sympy\ndef solution():\n    t = sympy.Symbol('theta')\n"
                                "    return sympy.lambdify(t, 2 * t, 'math')(3)\n", "6"),
    "parse_expr_sympy_transformations": (
        "from sympy.parsing.sympy_parser import parse_expr, standard_transformations, "
        "implicit_multiplication_application\ndef solution():\n"
        "    e = parse_expr('2x + 1', transformations=standard_transformations + "
        "(implicit_multiplication_application,))\n    return e.subs('x', 3)\n", "7"),
    "parse_expr_local_dict": ("import sympy\ndef solution():\n    y = sympy.Symbol('y')\n"
                              "    return sympy.parse_expr('y * 2', local_dict={'y': y}).subs(y, 5)\n", "10"),
    "sympify": ("import sympy\ndef solution():\n    return sympy.sympify('3/4 + 1')\n", "7/4"),
    "module_proxy_attributes": ("import statistics, fractions\ndef solution():\n"
                                "    return statistics.mean([1, 2, 3]) + fractions.Fraction(1, 2)\n", "5/2"),
    "namedtuple": ("import collections\ndef solution():\n    P = collections.namedtuple('P', 'a b')\n"
                   "    return P(1, 2).b\n", "2"),
}


@pytest.fixture(scope="module")
def results():
    with ProgramExecutor(PRODUCTION) as ex:
        sources = [prog(ESCAPES[n]) for n in ESCAPES] + [src for src, _ in BENIGN_LIBRARY.values()]
        return dict(zip([*ESCAPES, *BENIGN_LIBRARY], ex.run(sources), strict=True))


@pytest.mark.parametrize("name", list(ESCAPES))
def test_fourth_pass_escapes_are_refused(results, name):
    result = results[name]
    assert result.status is FORBIDDEN, result
    assert result.value is None


@pytest.mark.parametrize("name", list(BENIGN_LIBRARY))
def test_library_paths_near_the_fourth_pass_fixes_still_answer(results, name):
    result = results[name]
    assert (result.status, result.value) == (OK, BENIGN_LIBRARY[name][1]), result


def test_static_and_library_checks():
    import ast

    allowed = frozenset({"math"})
    assert check_program(ast.parse("import math\nmath.__init__(1, 2)\n"), allowed) is not None
    assert check_program(ast.parse("class A:\n    def __init__(self):\n        super().__init__()\n"), allowed) is None
    assert check_library_code("def f(x):\n    return builtins\n") is not None
    assert check_library_code("def f(x):\n    return x._importer_\n") is not None
    assert check_library_code("def f(x):\n    return x.__init__(x)\n") is not None
    assert check_library_code("def f(builtins):\n    return builtins + 1\n") is None  # a parameter, not free
    assert check_library_code("lambda _cls, a, b: _tuple_new(_cls, (a, b))") is None  # namedtuple's


def test_a_module_proxy_cannot_be_re_pointed():
    import math
    import types

    from reftkit.executor.policy import Importer, ModuleProxy

    importer = Importer(frozenset({"math"}), lambda reason: None)
    proxy = importer.proxy(math)
    with pytest.raises(TypeError):
        proxy.__init__(types.ModuleType("sys"), importer)
    with pytest.raises(TypeError):
        importer.__init__(frozenset({"os"}), print)
    object.__setattr__(proxy, "__name__", "sys")  # what library code could still do
    with pytest.raises(AttributeError):
        proxy.modules  # noqa: B018 -- the name the proxy reads from is its own record, still math's
    assert proxy.copy().sqrt(4) == 2.0
    assert isinstance(proxy, ModuleProxy)
