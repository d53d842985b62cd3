"""Code fingerprints: which source computes a cell, hashed so that comments and docstrings do not count.

A cell's code is the modules bdcore names for it (bdcore.cells.cell_modules: the method's module,
the model's, the dataset loader's and the cell runner) and every module they import, transitively,
read statically from their source (imports inside functions included, since lazy imports are how
bdcore reaches most of its code). Only modules of bdcore and of the roots' own top-level packages
(a plugin's) are followed: torch or numpy upgrades are not code of this project.

Each module's digest is sha256 of its AST with docstrings removed (comments never reach the AST),
so reformatting, comments and docstrings leave it unchanged while any change of behaviour does not.
A cell's fingerprint is the digest of the sorted (module, digest) pairs of its closure. Everything
is computed once per module and once per set of roots per CodeIndex, i.e. once per plan.
"""
from __future__ import annotations

import ast
import hashlib
import importlib.util
import json
import sys
from dataclasses import dataclass
from pathlib import Path

# Always followed; a root outside these adds its own top-level package (a plugin's modules).
CORE_PACKAGES = frozenset({"bdcore"})


@dataclass(frozen=True)
class ModuleCode:
    name: str
    path: str
    digest: str
    imports: tuple[str, ...]  # candidate module names its import statements may load


def _statements(body: list[ast.stmt]):
    """Every statement of `body`, nested ones included (expressions are not visited: imports and
    docstrings are statements, and skipping the expression trees keeps a plan fast)."""
    for node in body:
        yield node
        for name in ("body", "orelse", "finalbody"):
            inner = getattr(node, name, None)
            if isinstance(inner, list):
                yield from _statements(inner)
        for handler in getattr(node, "handlers", ()):
            yield from _statements(handler.body)
        for case in getattr(node, "cases", ()):
            yield from _statements(case.body)


def _strip_docstrings(tree: ast.Module) -> None:
    for node in [tree, *_statements(tree.body)]:
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
                    and isinstance(body[0].value.value, str):
                node.body = body[1:] or [ast.Pass()]


def normalised_digest(source: str, filename: str = "<source>") -> str:
    """sha256 of the source's AST without docstrings: comments, docstrings and layout do not count."""
    return _digest_tree(ast.parse(source, filename=filename))


def _digest_tree(tree: ast.Module) -> str:
    _strip_docstrings(tree)
    return hashlib.sha256(ast.dump(tree, annotate_fields=False).encode()).hexdigest()


def _imported_names(tree: ast.Module, module: str, is_package: bool) -> set[str]:
    """Every module name an import statement of `tree` may load: the named module, its parent
    packages (importing a.b.c runs a/__init__ and a/b/__init__) and `from a import b` submodules."""
    package = module if is_package else module.rpartition(".")[0]
    names: set[str] = set()
    for node in _statements(tree.body):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolved against this module's package
                parts = package.split(".")
                anchor = ".".join(parts[: len(parts) - node.level + 1])
                base = f"{anchor}.{base}" if base else anchor
            targets = [base] + [f"{base}.{alias.name}" for alias in node.names if alias.name != "*"]
        else:
            continue
        for target in targets:
            parts = target.split(".")
            names.update(".".join(parts[:i]) for i in range(1, len(parts) + 1))
    return names


class CodeIndex:
    """Module digests and import closures, each computed once (one index per plan)."""

    def __init__(self) -> None:
        self._modules: dict[str, ModuleCode | None] = {}
        self._closures: dict[str, frozenset[str]] = {}
        self._prints: dict[tuple[str, ...], str] = {}

    def module(self, name: str) -> ModuleCode | None:
        """The module `name` as source, or None when it is no module with a .py file."""
        if name not in self._modules:
            self._modules[name] = self._read(name)
        return self._modules[name]

    @staticmethod
    def _locate(name: str) -> tuple[Path, bool] | None:
        loaded = sys.modules.get(name)
        origin = getattr(loaded, "__file__", None) if loaded is not None else None
        if origin is None:
            try:
                spec = importlib.util.find_spec(name)
            except (ImportError, ValueError, AttributeError):  # not a module (a function imported by name)
                return None
            if spec is None or not spec.origin or not spec.has_location:
                return None
            origin = spec.origin
        path = Path(origin)
        return (path, path.name == "__init__.py") if path.suffix == ".py" else None

    def _read(self, name: str) -> ModuleCode | None:
        located = self._locate(name)
        if located is None:
            return None
        path, is_package = located
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        imports = tuple(sorted(_imported_names(tree, name, is_package)))  # before the docstrings go
        return ModuleCode(name, str(path), _digest_tree(tree), imports)

    def closure(self, root: str) -> frozenset[str]:
        """`root` and every module of the followed packages it imports, transitively."""
        if root in self._closures:
            return self._closures[root]
        packages = CORE_PACKAGES | {root.partition(".")[0]}
        seen: set[str] = set()
        parts = root.split(".")
        stack = [".".join(parts[:i]) for i in range(1, len(parts) + 1)]  # importing it runs its packages too
        while stack:
            name = stack.pop()
            if name in seen:
                continue
            seen.add(name)
            code = self.module(name)
            if code is None:
                continue
            stack += [n for n in code.imports if n.partition(".")[0] in packages and n not in seen]
        closure = frozenset(n for n in seen if self.module(n) is not None)
        self._closures[root] = closure
        return closure

    def modules_of(self, roots: tuple[str, ...]) -> dict[str, str]:
        """module -> digest over the closures of `roots`."""
        names = set().union(*(self.closure(r) for r in roots)) if roots else set()
        return {n: self.module(n).digest for n in sorted(names)}  # type: ignore[union-attr]

    def fingerprint(self, roots: tuple[str, ...]) -> str:
        """The code fingerprint of a cell computed by `roots` (16 hex digits)."""
        if roots not in self._prints:
            payload = json.dumps(sorted(self.modules_of(roots).items()))
            self._prints[roots] = hashlib.sha256(payload.encode()).hexdigest()[:16]
        return self._prints[roots]

    def record(self, roots: tuple[str, ...]) -> dict:
        """What DIR/code/<fingerprint>.json keeps of a fingerprint: its modules, digests and files."""
        modules = self.modules_of(roots)
        return {"fingerprint": self.fingerprint(roots), "roots": list(roots),
                "modules": {n: {"digest": d, "path": self.module(n).path} for n, d in modules.items()}}  # type: ignore[union-attr]


def changed_modules(old: dict, new: dict) -> list[str]:
    """Module names whose code differs between two records (added, removed or edited), by file path
    where known."""
    before, after = old.get("modules", {}), new.get("modules", {})
    changed = []
    for name in sorted(set(before) | set(after)):
        a, b = before.get(name), after.get(name)
        if a is None or b is None or a["digest"] != b["digest"]:
            changed.append((b or a)["path"])
    return changed
