"""Tamper detection from the syntax tree of learner-written code (answer cells, own cells, helper files).

The hidden tests share the kernel with learner code, so code that reaches into the machinery the tests rely
on is flagged ``suspicious_code`` for a human to review. The scanner reads the code, it never runs it:

* each cell is turned into Python as IPython would (``%magic``, ``!shell``) and parsed with ``ast``;
* names are followed through aliases across all learner cells (``g = get_ipython``, ``import sys as s``,
  ``m = s.modules``, ``from types import FunctionType as F``, ``getattr(x, "name")``), so a renamed handle is
  the same handle;
* every hit says what and where: ``cell 7, line 3: assigns builtin 'abs'``.

What counts (the classes of issue 14; honest course code uses none of them):

========================  ============================================================================
builtins                  binding a builtin name at the top of a cell (``abs = ...``, ``def type``,
                          ``for len in ...``, ``import x as str``) or as ``global``; any use of
                          ``builtins`` / ``__builtins__``
imported modules          attribute assignment, ``del`` or ``setattr``/``delattr`` on an imported name
                          (``course_lib.train.fit = f``, ``setattr(np, "allclose", f)``), writes to their
                          ``__dict__`` or ``vars()``
kernel                    ``get_ipython`` under any name or path, the input history (``In``, ``_ih``,
                          ``_i3``), ``sys.settrace``/``meta_path``/``excepthook``..., magics other than
                          a few display ones
namespaces                writes through ``globals()``, ``vars()``, ``locals()``, ``sys.modules``
code objects              ``types.FunctionType``/``CodeType``, ``__code__``, ``__globals__``, frames
                          (``sys._getframe``, ``f_back``, ``f_globals``), ``exec``/``eval``/``compile``
low level                 ``ctypes``, ``gc``, ``inspect``, ``importlib``, ``marshal``, ``unittest.mock``,
                          threads
answer keys               ``course_lib.scenarios.diagnosis.planted`` / ``identify`` under any name (they
                          return 04's graded labels)
comparisons               a class defining ``__eq__``/``__hash__``/``__bool__``/``__instancecheck__``...
========================  ============================================================================

Helper files of a submission are scanned the same way, and any file or folder whose name would shadow a
module the kernel can import (``course_lib/``, ``torch.py``, ``numpy/``, a stdlib name, ``*.pth``,
``sitecustomize.py``) is flagged and left out of the job folder.
"""
from __future__ import annotations

import ast
import builtins
import functools
import re
import sys
from dataclasses import dataclass

BUILTIN_NAMES = frozenset(n for n in dir(builtins) if not n.startswith("__")) | {"__import__", "__build_class__"}
HISTORY = re.compile(r"^(In|Out|_ih|_oh|_dh|_i+|_i\d+|_\d+|_ii+|__)$")
DUNDER_DEFS = {"__eq__", "__ne__", "__hash__", "__bool__", "__contains__", "__instancecheck__", "__subclasscheck__",
               "__subclasshook__", "__getattribute__", "__class_getitem__", "__lt__", "__le__", "__gt__", "__ge__",
               "__index__", "__float__", "__int__", "__abs__", "__round__", "__array__", "__array_function__",
               "__array_ufunc__", "__torch_function__", "__torch_dispatch__"}
DUNDER_ATTRS = {"__builtins__", "__globals__", "__code__", "__closure__", "__subclasses__", "__dict__",
                "__class__", "__bases__", "__mro__", "__defaults__", "__kwdefaults__", "__loader__", "__spec__",
                "__setattr__", "__delattr__", "__getattribute__", "__reduce__", "__reduce_ex__",
                "f_back", "f_globals", "f_locals", "f_builtins", "f_code", "tb_frame", "gi_frame", "cr_frame",
                "co_code", "co_consts"}
MODULES = {"ctypes", "_ctypes", "cffi", "gc", "inspect", "importlib", "builtins", "marshal", "IPython", "ipykernel",
           "traitlets", "unittest.mock", "mock", "nbformat", "nbclient", "jupyter_client", "zmq", "_thread",
           "threading", "multiprocessing", "atexit", "sysconfig", "site", "dis", "code", "codeop", "pickle",
           "dill", "cloudpickle", "signal", "faulthandler", "trace", "pdb", "bdb", "types", "weakref",
           "concurrent", "asyncio", "subprocess", "pty", "resource", "linecache", "traceback", "tokenize"}
TYPES_OK = {"types.SimpleNamespace", "types.MappingProxyType", "types.GenericAlias", "types.NoneType"}
MODULES_OK = ("IPython.display",)  # display(), HTML(), Markdown(): what notebooks show results with
# sys.stdout/stderr stay allowed (printing to them is honest; assigning them is a module patch, caught anyway).
SYS_ATTRS = {"modules", "settrace", "setprofile", "meta_path", "path_hooks", "path_importer_cache", "excepthook",
             "displayhook", "breakpointhook", "_getframe", "addaudithook", "__stdout__", "__stderr__",
             "__excepthook__", "__displayhook__", "_current_frames", "setswitchinterval", "gettrace", "getprofile"}
CALLS = {"exec", "eval", "compile", "__import__", "breakpoint"}
# Module settings honest notebooks change (display options, the environment of subprocesses).
CONFIG_OK = ("os.environ", "pandas.options", "matplotlib.rcParams", "matplotlib.pyplot.rcParams", "torch.backends")
NAMESPACES = {"globals()", "vars()", "locals()", "sys.modules", "builtins", "__builtins__"}
MUTATORS = {"append", "extend", "insert", "remove", "pop", "clear", "sort", "reverse", "update", "setdefault",
            "popitem", "add", "discard", "__setitem__", "__delitem__", "fill_", "zero_", "copy_", "add_", "mul_",
            "sub_", "div_", "clamp_", "normal_", "uniform_", "requires_grad_", "load_state_dict", "apply"}
READ_METHODS = {"get", "keys", "items", "values", "copy", "__contains__", "__getitem__", "__len__", "__iter__"}
ANSWER_KEYS = {"course_lib.scenarios.diagnosis.planted", "course_lib.scenarios.diagnosis.identify"}
"""Functions that return a graded answer itself (04's planted labels): learner code has no reason to call them."""
MAGICS_OK = {"matplotlib", "time", "timeit", "config_inline", "precision", "pprint"}
SHADOW_FILES = re.compile(r"(^|/)(sitecustomize|usercustomize)\.py$|\.pth$|(^|/)__init__\.py$")


@dataclass(frozen=True)
class Hit:
    """One finding: where (cell number in the graded notebook, or a file) and what."""

    where: str
    line: int
    what: str

    def __str__(self) -> str:
        return f"{self.where}, line {self.line}: {self.what}" if self.line else f"{self.where}: {self.what}"


def to_python(source: str) -> str | None:
    """A cell as the Python IPython would run (magics become get_ipython() calls); None if it cannot parse.
    Plain Python is kept as written, so that line numbers are the cell's."""
    try:
        ast.parse(source)
        return source
    except (SyntaxError, ValueError):
        pass
    try:
        from IPython.core.inputtransformer2 import TransformerManager

        code = TransformerManager().transform_cell(source)
    except Exception:  # noqa: BLE001 - IPython refuses it: it would not run either
        code = source
    try:
        ast.parse(code)
    except (SyntaxError, ValueError):
        return None
    return code


@functools.cache
def importable_names() -> frozenset[str]:
    """Top-level module names the kernel could import: stdlib, installed distributions, the interpreter's path."""
    import importlib.metadata
    import pkgutil

    names = set(sys.stdlib_module_names) | set(sys.builtin_module_names)
    names |= set(importlib.metadata.packages_distributions())
    names |= {m.name for m in pkgutil.iter_modules() if not m.name.startswith("_")}
    return frozenset(n.lower() for n in names)


def shadowing_files(files) -> list[str]:
    """Helper files or folders of a submission that would shadow an importable module (kernel cwd is on sys.path)."""
    out = []
    taken = importable_names()
    for name in sorted(files):
        top = name.split("/", 1)[0]
        stem = top.removesuffix(".py") if "/" not in name else top
        is_module = "/" in name or name.endswith((".py", ".pyc", ".so", ".pyd"))
        stem = re.sub(r"\.(cpython|abi3|pypy).*$", "", stem.split(".", 1)[0] if not name.endswith(".py") else stem)
        if SHADOW_FILES.search(name) or (is_module and stem.lower() in taken):
            out.append(name)
    return out


class _Scanner(ast.NodeVisitor):
    """Collects hits of one module; ``aliases`` (shared across a notebook's cells) maps names to dotted paths."""

    def __init__(self, where: str, aliases: dict[str, str], imported: set[str], protected=frozenset()):
        self.where, self.aliases, self.imported = where, aliases, imported  # imported: top-level module names
        self.protected = protected  # names the tests read from read-only/released cells
        self.hits: list[Hit] = []
        self.depth = 0  # > 0 inside a function or class body (bindings there are local)
        self.globals_declared: set[str] = set()

    # ---- names ----------------------------------------------------------------------------------------
    def path(self, node) -> str | None:
        """The dotted path an expression stands for (``np.linalg``, ``get_ipython()``, ``globals()``), if any."""
        if isinstance(node, ast.Name):
            if node.id in self.aliases:
                return self.aliases[node.id]
            if node.id in BUILTIN_NAMES or node.id in ("__builtins__", "get_ipython"):
                return node.id
            return None
        if isinstance(node, ast.Attribute):
            base = self.path(node.value)
            return f"{base}.{node.attr}" if base else None
        if isinstance(node, ast.Subscript):
            base = self.path(node.value)
            key = node.slice
            if base in ("sys.modules", "globals()", "vars()", "__builtins__") and isinstance(key, ast.Constant):
                return str(key.value)
            return None
        if isinstance(node, ast.Call):
            func = self.path(node.func)
            if func is None:
                return None
            if func in ("getattr", "builtins.getattr") and len(node.args) >= 2 and \
                    isinstance(node.args[1], ast.Constant) and isinstance(node.args[1].value, str):
                base = self.path(node.args[0])
                return f"{base}.{node.args[1].value}" if base else None
            if func in ("__import__", "importlib.import_module", "builtins.__import__") and node.args and \
                    isinstance(node.args[0], ast.Constant):
                return str(node.args[0].value)
            tail = func.rsplit(".", 1)[-1]
            if tail in ("get_ipython", "globals", "vars", "locals"):
                return f"{tail}()"
            return None
        return None

    def imported_root(self, path: str | None) -> bool:
        """``path`` lies in an imported module (and is not one of the display/environment settings)."""
        if not path or path.split(".", 1)[0] not in self.imported:
            return False
        return not any(path == c or path.startswith(c + ".") for c in CONFIG_OK)

    def hit(self, node, what: str) -> None:
        self.hits.append(Hit(self.where, getattr(node, "lineno", 0), what))

    def bind(self, name: str, node, value=None) -> None:
        """``name`` is bound at this scope (assignment, def, import, for target...)."""
        top = self.depth == 0 or name in self.globals_declared
        if top and (name in BUILTIN_NAMES or name in ("__builtins__", "get_ipython")):
            self.hit(node, f"assigns builtin {name!r}")
        if top and name in self.protected:
            self.hit(node, f"rebinds {name!r}, which the tests read from a released cell")
        if top and HISTORY.match(name):
            self.hit(node, f"assigns the input history name {name!r}")
        if value is not None:  # aliases are followed flow-insensitively, in every scope
            target = self.path(value)
            if target:
                self.aliases[name] = target
            elif name in self.aliases and name not in self.imported:
                del self.aliases[name]

    def _targets(self, target, node, value=None) -> None:
        if isinstance(target, ast.Name):
            self.bind(target.id, node, value)
        elif isinstance(target, (ast.Tuple, ast.List)):
            for t in target.elts:
                self._targets(t.value if isinstance(t, ast.Starred) else t, node)
        elif isinstance(target, (ast.Attribute, ast.Subscript)) and self._root_name(target) in self.protected:
            self.hit(node, f"changes {self._root_name(target)!r}, which the tests read from a released cell")
        elif isinstance(target, ast.Attribute):
            base = self.path(target.value)
            if self.imported_root(base) or base in NAMESPACES or (base or "").endswith("()"):
                self.hit(node, f"patches {base}.{target.attr}")
            elif target.attr in DUNDER_ATTRS or target.attr in DUNDER_DEFS:
                self.hit(node, f"assigns {target.attr}")
        elif isinstance(target, ast.Subscript):
            base = self.path(target.value)
            if base in NAMESPACES or (base or "").endswith(("__dict__", "()")) or self.imported_root(base):
                self.hit(node, f"writes into {base}[...]")

    # ---- statements -----------------------------------------------------------------------------------
    def visit_Import(self, node):
        for a in node.names:
            self._module(node, a.name)
            name = a.asname or a.name.split(".", 1)[0]
            self.imported.add(a.name.split(".", 1)[0])
            self.bind(name, node)
            self.aliases[name] = a.name if a.asname else name

    def visit_ImportFrom(self, node):
        mod = ("." * node.level) + (node.module or "")
        self._module(node, mod)
        for a in node.names:
            if a.name == "*":
                self.hit(node, f"imports * from {mod}")
                continue
            self._module(node, f"{mod}.{a.name}")
            name = a.asname or a.name
            self.imported.add(mod.lstrip(".").split(".", 1)[0] or ".")
            self.bind(name, node)
            self.aliases[name] = f"{mod}.{a.name}"

    def _module(self, node, mod: str) -> None:
        if mod.startswith(MODULES_OK):
            return
        parts = mod.lstrip(".").split(".")
        for k in range(1, len(parts) + 1):
            if ".".join(parts[:k]) in MODULES:
                if ".".join(parts[:k]) == "types" and mod in TYPES_OK | {"types"}:
                    return
                self.hit(node, f"imports {mod}")
                return
        if mod.startswith("."):
            self.hit(node, f"relative import {mod}")

    def visit_Assign(self, node):
        for t in node.targets:
            self._targets(t, node, node.value)
        self.generic_visit(node)

    def visit_AnnAssign(self, node):
        self._targets(node.target, node, node.value)
        self.generic_visit(node)

    def visit_AugAssign(self, node):
        self._targets(node.target, node)
        self.generic_visit(node)

    def visit_NamedExpr(self, node):
        self._targets(node.target, node, node.value)
        self.generic_visit(node)

    def visit_Delete(self, node):
        for t in node.targets:
            if isinstance(t, ast.Name) and self.depth == 0 and t.id in BUILTIN_NAMES:
                self.hit(node, f"deletes builtin {t.id!r}")
            else:
                self._targets(t, node)
        self.generic_visit(node)

    def visit_For(self, node):
        self._targets(node.target, node)
        self.generic_visit(node)

    visit_AsyncFor = visit_For

    def visit_With(self, node):
        for item in node.items:
            if item.optional_vars is not None:
                self._targets(item.optional_vars, node)
        self.generic_visit(node)

    visit_AsyncWith = visit_With

    def visit_Global(self, node):
        self.globals_declared |= set(node.names)
        for name in node.names:
            if name in BUILTIN_NAMES:
                self.hit(node, f"declares builtin {name!r} global")

    def visit_FunctionDef(self, node):
        self.bind(node.name, node)
        if self.depth and node.name in DUNDER_DEFS and self._in_class:
            self.hit(node, f"defines {node.name}")
        for d in node.decorator_list:
            self.visit(d)
        self.visit(node.args)
        outer_class, self._in_class = self._in_class, False
        self.depth += 1
        for stmt in node.body:
            self.visit(stmt)
        self.depth -= 1
        self._in_class = outer_class

    visit_AsyncFunctionDef = visit_FunctionDef
    _in_class = False

    def visit_ClassDef(self, node):
        self.bind(node.name, node)
        for b in node.bases:
            p = self.path(b)
            if p in BUILTIN_NAMES and p not in ("object", "Exception", "ValueError", "RuntimeError", "TypeError"):
                self.hit(node, f"subclasses builtin {p!r}")
        for d in [*node.decorator_list, *node.bases, *node.keywords]:
            self.visit(d)
        outer, self._in_class = self._in_class, True
        self.depth += 1
        for stmt in node.body:
            if isinstance(stmt, ast.Assign):
                for t in stmt.targets:
                    if isinstance(t, ast.Name) and t.id in DUNDER_DEFS:
                        self.hit(stmt, f"defines {t.id}")
            self.visit(stmt)
        self.depth -= 1
        self._in_class = outer

    def visit_Lambda(self, node):
        self.depth += 1
        self.generic_visit(node)
        self.depth -= 1

    # ---- expressions ----------------------------------------------------------------------------------
    def visit_Name(self, node):
        p = self.path(node)
        if node.id in ("__builtins__",) or p in ("builtins", "__builtins__"):
            self.hit(node, "uses the builtins namespace")
        elif p and (p == "get_ipython" or p.endswith(".get_ipython")):
            self.hit(node, f"uses get_ipython (as {node.id!r})" if node.id != "get_ipython" else "uses get_ipython")
        elif isinstance(node.ctx, ast.Load) and HISTORY.match(node.id) and node.id not in self.aliases:
            self.hit(node, f"reads the input history ({node.id})")
        elif isinstance(node.ctx, ast.Load) and node.id in CALLS and node.id not in self.aliases:
            self.hit(node, f"uses {node.id}")
        elif p and p != node.id and self._sensitive(p):
            self.hit(node, f"uses {p} (as {node.id!r})")
        elif p in ANSWER_KEYS:
            self.hit(node, f"uses {p}, which returns the graded answer (as {node.id!r})")

    def visit_Attribute(self, node):
        p = self.path(node)
        if node.attr in DUNDER_ATTRS:
            self.hit(node, f"uses {node.attr}")
        elif p and self._sensitive(p):
            self.hit(node, f"uses {p}")
        elif p in ANSWER_KEYS:
            self.hit(node, f"uses {p}, which returns the graded answer")
        else:
            self.visit(node.value)

    @staticmethod
    def _root_name(node) -> str | None:
        while isinstance(node, (ast.Attribute, ast.Subscript)):
            node = node.value
        return node.id if isinstance(node, ast.Name) else None

    def visit_Call(self, node):
        func = self.path(node.func)
        if isinstance(node.func, ast.Attribute) and node.func.attr in MUTATORS and \
                self._root_name(node.func.value) in self.protected:
            self.hit(node, f"changes {self._root_name(node.func.value)!r} ({node.func.attr}), which the tests read "
                           "from a released cell")
        if func in ("setattr", "delattr", "builtins.setattr", "object.__setattr__", "type.__setattr__") and node.args:
            base = self.path(node.args[0])
            if self.imported_root(base) or base in NAMESPACES or (base or "").endswith("()"):
                self.hit(node, f"{func.rsplit('.', 1)[-1]} on {base}")
        if isinstance(node.func, ast.Attribute):
            base = self.path(node.func.value)
            if (base in NAMESPACES or (base or "").endswith("__dict__")) and node.func.attr not in READ_METHODS:
                self.hit(node, f"writes through {base}.{node.func.attr}()")
        for arg in [*node.args, *(k.value for k in node.keywords)]:
            if self.path(arg) in ("globals()", "vars()", "locals()"):
                self.hit(node, f"passes {self.path(arg)} to {func or 'a call'}")
        if func == "type" and len(node.args) == 3:
            self.hit(node, "builds a class with type(name, bases, dict)")
        if func and func.startswith("get_ipython().run_line_magic") and node.args and \
                isinstance(node.args[0], ast.Constant) and node.args[0].value in MAGICS_OK:
            return  # %matplotlib inline and friends
        self.generic_visit(node)

    @staticmethod
    def _sensitive(p: str) -> bool:
        """A path into the kernel's or the interpreter's machinery (at any depth: ``os.sys.modules``)."""
        if p in TYPES_OK or p.startswith(MODULES_OK):
            return False
        if p.startswith(("get_ipython", "__builtins__")) or p.endswith(".get_ipython"):
            return True
        comps = p.split(".")
        for k, c in enumerate(comps):
            if c == "sys" and k + 1 < len(comps) and comps[k + 1] in SYS_ATTRS:
                return True
            if c == "types" and k + 1 < len(comps) and k == 0:
                return True
            if c in MODULES - {"types", "code", "signal", "resource", "site"} or ".".join(comps[k:k + 2]) in MODULES:
                return True
        return False


def scan_sources(sources: list[tuple[str, str | None]], context: list[str] = (), protected=frozenset()) -> list[Hit]:
    """Hits in ``[(where, source), ...]``, scanned in order with one alias table (cells share a namespace).

    ``where=None`` marks a released cell the learner left alone: it is read for its imports and aliases
    (``import numpy as np`` there, ``np.allclose = ...`` in an answer), its own uses are not reported.
    ``context``: the released notebook's code; a finding it has too (the course's own use) is not reported.
    """
    aliases: dict[str, str] = {}
    imported: set[str] = set()
    hits: list[Hit] = []
    for where, source in sources:
        code = to_python(source)
        if code is None:
            continue
        scanner = _Scanner(where or "", aliases, imported, protected if where else frozenset())
        scanner.visit(ast.parse(code))
        hits += scanner.hits if where else []
    if context:
        ours = {h.what for h in scan_sources([("released", src) for src in context])}
        hits = [h for h in hits if h.what not in ours]
    return list(dict.fromkeys(hits))


def scan_submission(cells: list[tuple[int | None, str]], files: dict[str, bytes], released: list[str] = (),
                    protected=frozenset()) -> list[Hit]:
    """Hits in the graded notebook's non-test cells ``[(cell number, or None if as released, source)]`` and in
    the submission's helper files; ``released``: the released notebook's code cells (see ``scan_sources``);
    ``protected``: names that released cells define and the tests read (see ``protected_names``)."""
    hits = scan_sources([(None if n is None else f"cell {n}", src) for n, src in cells], released, protected)
    for name in shadowing_files(files):
        hits.append(Hit(name, 0, "shadows an importable module: left out of the job folder"))
    helpers = []
    for name, data in sorted(files.items()):
        if name.endswith(".py"):
            try:
                helpers.append((name, data.decode("utf-8")))
            except UnicodeDecodeError:
                hits.append(Hit(name, 0, "a .py file that is not UTF-8"))
    hits += scan_sources(helpers)
    return hits


def defined_names(source: str) -> set[str]:
    """Names a cell binds at its top level."""
    code = to_python(source)
    if code is None:
        return set()
    out = set()
    for node in ast.parse(code).body:
        targets = node.targets if isinstance(node, ast.Assign) else [getattr(node, "target", None)]
        for t in targets:
            for n in ast.walk(t) if t is not None else ():
                if isinstance(n, ast.Name):
                    out.add(n.id)
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            out.add(node.name)
    return out


def protected_names(released_cells: list[dict]) -> frozenset[str]:
    """Names defined by released read-only or plain code cells that a test cell (hidden part included) reads:
    the notebook objects the tests recompute the truth from."""
    defined, used, answers = set(), set(), set()
    for r in released_cells:
        if r["cell_type"] != "code":
            continue
        if r["kind"] in ("solution", "manual"):  # what an answer stub binds is the learner's to bind
            answers |= defined_names(r["source"])
        if r["kind"] in ("locked", "code"):
            defined |= defined_names(r["source"])
        elif r["kind"] == "test":
            code = to_python(r["full"])
            if code:
                used |= {n.id for n in ast.walk(ast.parse(code)) if isinstance(n, ast.Name)}
    return frozenset((defined & used) - answers)


def summary(hits: list[Hit], limit: int = 12) -> str:
    """One line for the flag's detail: the first ``limit`` findings, then how many more."""
    text = "; ".join(map(str, hits[:limit]))
    return text + (f"; and {len(hits) - limit} more" if len(hits) > limit else "")
