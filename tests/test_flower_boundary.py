"""The package uses Flower only through its public API and never patches it.

"Public" is what Flower's API reference documents (flower.ai/docs/framework/ref-api/flwr.html): the
packages below and, in each, the names it exports in ``__all__``. Everything else is Flower's
internals, free to change in any release: ``flwr.proto``, ``flwr.supercore``, ``flwr.supernode``,
``flwr.superlink``, ``flwr.compat``, ``flwr.cli`` (the ``flwr`` *command* is public, its Python
modules are not) and every submodule of a public package that the reference does not list
(``flwr.common.constant``, ``flwr.serverapp.grid``, ...). A name with a leading underscore is private
wherever it lives. Flower's public command-line tools (``flower-superlink``, ``flower-supernode``,
``flwr run``) are not Python imports and are not restricted here.

Patching is an assignment, augmented assignment or ``del`` whose target is an attribute or item
reached from a name bound to something imported from ``flwr`` (``loop.time = ...``,
``fn.__kwdefaults__["x"] = ...``), or ``setattr``/``delattr`` on one. Speed-ups for tests that need
Flower's internals live in ``tests/flower_support/``, outside the package.
"""
from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "lightning_unlearn"

#: Flower's documented Python packages (its API reference), flwr 1.41-1.42.
PUBLIC_MODULES = frozenset({
    "flwr", "flwr.app", "flwr.clientapp", "flwr.clientapp.mod", "flwr.serverapp", "flwr.serverapp.strategy",
    "flwr.simulation", "flwr.common", "flwr.client", "flwr.client.mod", "flwr.server", "flwr.server.strategy",
    "flwr.server.workflow", "flwr.agentapp",
})


def _is_flwr(module: str) -> bool:
    return module == "flwr" or module.startswith("flwr.")


def _private_module(module: str) -> bool:
    return module not in PUBLIC_MODULES or any(part.startswith("_") for part in module.split("."))


def _root(node: ast.AST) -> str | None:
    """The name an attribute/item chain starts from (``a`` in ``a.b[c].d``)."""
    while isinstance(node, (ast.Attribute, ast.Subscript)):
        node = node.value
    return node.id if isinstance(node, ast.Name) else None


def violations(source: str, where: str = "<source>", exported=None) -> list[str]:
    """Every private Flower import and every patch of Flower in ``source``, one line each.

    ``exported(module)``: the public names of a public module (default: its ``__all__`` in the
    installed flwr); a name imported from a public module must be one of them.
    """
    exported = exported or _exported
    tree = ast.parse(source)
    found: list[str] = []
    bound: set[str] = set()  # names bound to flwr modules or objects (any scope: the check is conservative)
    for node in ast.walk(tree):
        line = f"{where}:{getattr(node, 'lineno', '?')}"
        if isinstance(node, ast.Import):
            for alias in node.names:
                if _is_flwr(alias.name):
                    bound.add(alias.asname or alias.name.split(".")[0])
                    if _private_module(alias.name):
                        found.append(f"{line}: import of private Flower module {alias.name}")
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module and _is_flwr(node.module):
            private = _private_module(node.module)
            if private:
                found.append(f"{line}: import from private Flower module {node.module}")
            for alias in node.names:
                bound.add(alias.asname or alias.name)
                sub = f"{node.module}.{alias.name}"
                if not private and sub not in PUBLIC_MODULES and (
                        alias.name.startswith("_") or alias.name not in exported(node.module)):
                    found.append(f"{line}: {alias.name} is not in the public API of {node.module}")
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            fn = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", None)
            target = node.args[0].value
            if fn in ("import_module", "__import__") and isinstance(target, str) and _is_flwr(target) \
                    and _private_module(target):
                found.append(f"{line}: dynamic import of private Flower module {target}")
    _follow_aliases(tree, bound)
    for node in ast.walk(tree):
        line = f"{where}:{getattr(node, 'lineno', '?')}"
        targets: list[ast.AST] = []
        if isinstance(node, ast.Assign):
            targets = list(node.targets)
        elif isinstance(node, (ast.AugAssign, ast.AnnAssign)):
            targets = [node.target]
        elif isinstance(node, ast.Delete):
            targets = list(node.targets)
        elif isinstance(node, ast.Call) and getattr(node.func, "id", None) in ("setattr", "delattr") and node.args:
            if _root(node.args[0]) in bound:
                found.append(f"{line}: {node.func.id} on Flower object {ast.unparse(node.args[0])}")
        expanded = []
        for t in targets:
            expanded.extend(t.elts if isinstance(t, (ast.Tuple, ast.List)) else [t])
        for t in expanded:
            if isinstance(t, (ast.Attribute, ast.Subscript)) and _root(t) in bound:
                found.append(f"{line}: patches Flower: {ast.unparse(t)}")
    return found


def _follow_aliases(tree: ast.AST, bound: set[str]) -> None:
    """Add names that alias a Flower object: ``x = flwr_obj.attr[...]`` or ``for x in (flwr_obj.a, ...)``.

    Only plain attribute/item chains propagate; a call (``Message(...)``) makes an instance of ours to change.
    """
    def rooted(value: ast.AST) -> bool:
        if isinstance(value, (ast.Tuple, ast.List)):
            return bool(value.elts) and all(rooted(e) for e in value.elts)
        return isinstance(value, (ast.Name, ast.Attribute, ast.Subscript)) and _root(value) in bound

    changed = True
    while changed:
        changed = False
        for node in ast.walk(tree):
            pairs = []
            if isinstance(node, ast.Assign):
                pairs = [(t, node.value) for t in node.targets]
            elif isinstance(node, (ast.For, ast.comprehension)):
                pairs = [(node.target, node.iter)]
            for target, value in pairs:
                if isinstance(target, ast.Name) and target.id not in bound and rooted(value):
                    bound.add(target.id)
                    changed = True


def _exported(module: str) -> frozenset[str]:
    mod = importlib.import_module(module)
    return frozenset(getattr(mod, "__all__", ()))


def test_the_package_uses_only_public_flower_and_patches_nothing():
    pytest.importorskip("flwr", reason="the Flower extra is not installed: nothing to check the names against")
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        found += violations(path.read_text(), str(path.relative_to(PACKAGE.parent)))
    assert not found, "\n".join(found)


def test_the_rule_catches_what_it_names():
    """The checker flags each kind of breach (these lines were in the package once) and passes public use."""
    public = {"flwr.app": {"Context", "Message"}, "flwr.common": {"log"}, "flwr.serverapp": {"Grid"}}
    check = lambda src: violations(src, exported=lambda m: public.get(m, frozenset()))  # noqa: E731
    assert check("from flwr.proto.runtime_pb2 import AcquireTaskRequest")
    assert check("from flwr.supercore import log")
    assert check("from flwr.common.constant import ErrorCode")
    assert check("import flwr.supernode.cli")
    assert check("from flwr.app import _private")
    assert check("from flwr.app import NotExported")
    assert check("import importlib\nimportlib.import_module('flwr.superlink.cli')")
    assert check("def f():\n    from flwr.supernode import start_client_internal as loop\n    loop.time = 1")
    assert check("from flwr.app import Message\nMessage.__kwdefaults__['x'] = 1")
    assert check("from flwr.app import Message\nfor fn in (Message.a, Message.b):\n    d = fn.__kwdefaults__\n"
                 "    d['x'], d['y'] = 1, 2")
    assert check("import flwr\nflwr.app.Message.f = None")
    assert check("import flwr\nsetattr(flwr.app, 'Message', None)")
    assert check("from flwr.app import Context\ndel Context.state")
    assert not check("from flwr.app import Context, Message\nfrom flwr.common import log\nimport flwr\n"
                     "from flwr.serverapp import Grid\nimport flwr.serverapp.strategy\n"
                     "def f(m: Message):\n    m.content = None\n    x = Grid\n")
