"""Layering: the protocol kernel imports no other part of the package, the runtime package never imports
the development tools, and the CLI imports a role only to run it."""

from __future__ import annotations

import argparse
import ast
import re
import subprocess
import sys
from pathlib import Path

import escrow_py
from escrow_py import cli

PACKAGE = Path(escrow_py.__file__).resolve().parent


def _devtools_imports(tree: ast.Module) -> list[tuple[int, bool]]:
    """(line, at module level) of every import of escrow_devtools in a module."""
    found = []
    top = {id(node) for node in tree.body}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            names = [node.module or ""]
        else:
            continue
        if any(name.split(".")[0] == "escrow_devtools" for name in names):
            found.append((node.lineno, id(node) in top))
    return found


def test_no_runtime_module_imports_the_devtools() -> None:
    offenders = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        imports = _devtools_imports(ast.parse(path.read_text()))
        # The CLI alone may, inside the function that runs `contracts build`, `demo` or `bench`.
        allowed = path.name == "cli.py" and path.parent == PACKAGE
        if imports and not (allowed and not any(top for _, top in imports)):
            offenders[str(path.relative_to(PACKAGE))] = imports
    assert offenders == {}


def _escrow_py_imports(tree: ast.Module, module: str) -> set[str]:
    """The escrow_py modules a module imports, relative imports resolved against its package."""
    package = module.rsplit(".", 1)[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{parent}.{base}" if base else parent
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return {name for name in found if name.split(".")[0] == "escrow_py"}


def test_the_protocol_kernel_imports_nothing_from_the_chain_the_storage_or_a_role() -> None:
    kernel = PACKAGE / "protocol"
    offenders = {}
    for path in sorted(kernel.rglob("*.py")):
        module = "escrow_py." + ".".join(path.relative_to(PACKAGE).with_suffix("").parts)
        outside = {m for m in _escrow_py_imports(ast.parse(path.read_text()), module) if not _in_kernel(m)}
        if outside:
            offenders[module] = sorted(outside)
    assert offenders == {}
    # And at run time: loading the whole kernel loads no other part of the package.
    code = (
        "import sys, pkgutil, importlib, escrow_py.protocol as p\n"
        "for m in pkgutil.iter_modules(p.__path__):\n    importlib.import_module('escrow_py.protocol.' + m.name)\n"
        "print(' '.join(sorted(m for m in sys.modules if m.split('.')[0] == 'escrow_py')))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    loaded = set(out.split())
    assert "escrow_py.protocol.wire" in loaded
    assert {m for m in loaded if not _in_kernel(m)} == set()


def _in_kernel(module: str) -> bool:
    return module in ("escrow_py", "escrow_py.protocol") or module.startswith("escrow_py.protocol.")


def test_the_roles_load_without_the_devtools() -> None:
    code = (
        "import sys\n"
        "import escrow_py, escrow_py.cli, escrow_py.seller, escrow_py.buyer, escrow_py.keeper\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'escrow_devtools'))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    assert out.strip() == "[]"


def _imported_by(*argv: str) -> set[str]:
    code = (
        "import sys\n"
        "from escrow_py import cli\n"
        f"try:\n    cli.main({list(argv)!r})\nexcept SystemExit:\n    pass\n"
        "print(' '.join(sorted(sys.modules)))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    return set(out.split())


def test_help_imports_no_role_and_no_tool() -> None:
    modules = _imported_by("--help")
    heavy = {"escrow_py.buyer", "escrow_py.keeper", "escrow_py.seller", "escrow_devtools", "web3", "x402"}
    assert modules & heavy == set()


def test_a_subcommand_imports_its_role_only() -> None:
    modules = _imported_by("buyer", "report", "--help")
    assert "escrow_py.buyer._cli" in modules
    assert {"escrow_py.keeper", "escrow_py.seller", "escrow_devtools"} & modules == set()


def test_every_subcommand_is_listed_with_the_help_its_registrar_gives() -> None:
    for command, (help_text, _) in cli.COMMANDS.items():
        parser = argparse.ArgumentParser()
        sub = parser.add_subparsers()
        cli.registrar(command)(sub)
        [action] = [a for a in sub._choices_actions if a.dest == command]
        assert action.help == help_text, command
    [listed] = [a for a in cli.build_parser(["--help"])._actions if isinstance(a, argparse._SubParsersAction)]
    assert set(listed.choices) == set(cli.COMMANDS)


def test_the_readme_links_only_to_files_in_the_repository() -> None:
    repo = PACKAGE.parent
    readme = (repo / "README.md").read_text()
    targets = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", readme)
    local = [t for t in targets if "://" not in t]
    assert "docs/design.md" in local
    assert [t for t in local if not (repo / t).exists()] == []
    assert "DESIGN.md" not in readme  # the design document is docs/design.md, in the repository
