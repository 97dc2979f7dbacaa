"""The layout's rules, checked on the source: which part may import which, and no reference
a maintainer cannot follow.

:data:`MAY_IMPORT`, :data:`MAY_NOT_IMPORT` and :data:`EXTRA_IMPORTS` are the table that
``docs/architecture.md`` ("Import rules") mirrors, and a test checks that the two agree.
Every import counts: at module level, inside functions, and under ``if TYPE_CHECKING:``.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

#: Source folder -> the name it is installed (and imported) under.
PACKAGES = {"xentmem": "xentmem", "selfballoon": "xentmem_selfballoon", "cli": "xentmem_cli"}

#: Each part of the design, as the module prefixes it owns (the longest match wins).
PARTS: dict[str, tuple[str, ...]] = {
    "foundation": ("xentmem", "xentmem.errors", "xentmem.clock", "xentmem.roots",
                   "xentmem.files", "xentmem.params", "xentmem.notify", "xentmem.console"),
    "tmem": ("xentmem.tmem",),
    "xenbus": ("xentmem.xenbus",),
    "control": ("xentmem.control",),
    "guest": ("xentmem.guest",),
    "guestd": ("xentmem.guestd",),
    "hostd": ("xentmem.hostd",),
    "mock_xenstored": ("xentmem.mock_xenstored",),
    "selfballoon": ("xentmem_selfballoon",),
    "cli": ("xentmem_cli",),
}

#: Part -> the other parts its modules may import (a part may always import itself).  An entry
#: with a dot is one module (and its submodules), not a whole part.
MAY_IMPORT: dict[str, frozenset[str]] = {
    "foundation": frozenset(),
    "tmem": frozenset({"foundation"}),
    "xenbus": frozenset({"foundation", "tmem"}),
    "control": frozenset({"foundation", "tmem"}),
    "guest": frozenset({"foundation", "tmem", "xenbus"}),
    "selfballoon": frozenset({"foundation", "tmem"}),
    "guestd": frozenset({"foundation", "tmem", "xenbus", "control", "guest", "selfballoon"}),
    "hostd": frozenset({"foundation", "tmem", "xenbus", "control"}),
    "mock_xenstored": frozenset({"foundation"}),
    # The CLI talks to the daemon over the control protocol; it reads the backend registry
    # only to complete backend names and their params.
    "cli": frozenset({"foundation", "control", "xentmem.guest.registry"}),
}

#: Part -> modules (and their submodules) it may not import although its part is granted.
#: Backends are plugins: the daemon reaches one by name through ``xentmem.guest.registry``.
MAY_NOT_IMPORT: dict[str, tuple[str, ...]] = {
    "guestd": ("xentmem.guest.backends",),
}

#: Single modules allowed more than their part: module -> extra parts.  ``xentmem-hostd demo``
#: starts our stand-in xenstored next to the service, so only the demo module may import it.
EXTRA_IMPORTS: dict[str, frozenset[str]] = {
    "xentmem.hostd.demo": frozenset({"mock_xenstored"}),
    # ``xentmem balloon plot --simulate`` runs the real loop against the simulator, in process.
    "xentmem_cli.balloon_sim": frozenset({"selfballoon"}),
    # xenstore's permission rule is written once, for the host service and the stand-in.
    "xentmem.mock_xenstored.perms": frozenset({"xentmem.xenbus.perms"}),
}

#: What a maintainer cannot follow: files outside the repository and issue numbers.
FORBIDDEN_REFERENCES = {
    "reference/*.md (not in this repository; cite docs/)": re.compile(
        r"reference/\w+\.md|\b(?:tmem|xenstored|style|xen-qemu)\.md\s*§"),
    "../shared (not in this repository)": re.compile(r"\.\./shared\b"),
    '"issue N" (the tracker is not in this repository)': re.compile(r"\bissues? \d+", re.I),
    "a local interpreter path such as /tmp/v1/bin/python": re.compile(
        r"/tmp/\w+/bin/python"),
}
#: The folders scanned for them, and the file types read.
REFERENCE_SCAN = ("xentmem", "selfballoon", "cli", "bench", "docs", "README.md")
REFERENCE_SUFFIXES = {".py", ".md", ".toml", ".txt", ".service"}


@dataclass(frozen=True)
class Import:
    path: Path
    line: int
    module: str  # the importing module
    target: str  # the imported module (or ``package.name`` of ``from package import name``)
    statement: str  # as written, for the message


def module_name(path: Path, root: Path = ROOT) -> str:
    rel = path.relative_to(root).with_suffix("")
    parts = [PACKAGES[rel.parts[0]], *rel.parts[1:]]
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def source_files() -> list[Path]:
    return sorted(p for folder in PACKAGES for p in (ROOT / folder).rglob("*.py"))


def part_of(module: str) -> str | None:
    best: tuple[int, str] | None = None
    for part, prefixes in PARTS.items():
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and (
                    best is None or len(prefix) > best[0]):
                best = (len(prefix), part)
    return None if best is None else best[1]


def imports_of(path: Path, root: Path = ROOT) -> Iterator[Import]:
    """Every import in ``path``, wherever it sits, with relative ones resolved."""
    module = module_name(path, root)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield Import(path, node.lineno, module, alias.name, f"import {alias.name}")
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[:len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, *([base] if base else [])])
            names = ", ".join(alias.name for alias in node.names)
            statement = f"from {'.' * node.level}{node.module or ''} import {names}"
            for alias in node.names:
                # ``from xentmem import errors`` imports the module xentmem.errors.
                yield Import(path, node.lineno, module, f"{base}.{alias.name}", statement)


def allowed(importer: str, target: str) -> bool:
    own = part_of(importer)
    theirs = part_of(target)
    if theirs is None or own is None or own == theirs:
        return True
    if any(target == m or target.startswith(m + ".") for m in MAY_NOT_IMPORT.get(own, ())):
        return False
    grants = MAY_IMPORT[own] | EXTRA_IMPORTS.get(importer, frozenset())
    return any(target == g or target.startswith(g + ".") if "." in g else theirs == g
               for g in grants)


def rule_text(part: str) -> str:
    grants = sorted(MAY_IMPORT[part])
    text = f"{part} may import only " + (", ".join(grants) if grants else "no other part")
    if MAY_NOT_IMPORT.get(part):
        text += ", and never " + ", ".join(MAY_NOT_IMPORT[part])
    for module, extra in EXTRA_IMPORTS.items():
        if part_of(module) == part:
            text += f" ({module} also {', '.join(sorted(extra))})"
    return text


def violations() -> list[str]:
    found: dict[str, None] = {}  # ordered and without repeats (one per statement)
    for path in source_files():
        for imp in imports_of(path):
            if not allowed(imp.module, imp.target):
                own = part_of(imp.module)
                assert own is not None
                found[f"{imp.path.relative_to(ROOT)}:{imp.line}: `{imp.statement}` "
                      f"({part_of(imp.target)}); rule: {rule_text(own)}"] = None
    return list(found)


def test_every_source_module_belongs_to_a_part() -> None:
    orphans = [str(p.relative_to(ROOT)) for p in source_files()
               if part_of(module_name(p)) is None]
    assert not orphans, f"modules outside every part of PARTS: {orphans}"


def test_the_rule_table_names_only_known_parts() -> None:
    assert set(MAY_IMPORT) == set(PARTS)
    for grants in [*MAY_IMPORT.values(), *EXTRA_IMPORTS.values()]:
        for grant in grants:
            assert grant in PARTS or part_of(grant) is not None, grant


def test_imports_follow_the_layout_rules() -> None:
    found = violations()
    assert not found, "imports across the layout's rules (docs/architecture.md):\n" + \
        "\n".join(found)


@pytest.mark.parametrize(("importer", "target", "ok"), [
    ("xentmem.guest.backends.xen", "xentmem.xenbus.xs", True),
    ("xentmem.guest.backends.xen", "xentmem.hostd.store", False),
    ("xentmem.xenbus.xs", "xentmem.mock_xenstored.wire", False),
    ("xentmem.hostd.service", "xentmem.mock_xenstored.server", False),
    ("xentmem.hostd.demo", "xentmem.mock_xenstored.server", True),
    ("xentmem.guestd.core", "xentmem_selfballoon.service", True),
    ("xentmem.guestd.core", "xentmem.hostd.store", False),
    ("xentmem.guestd.core", "xentmem.guest.registry", True),
    ("xentmem.guestd.publish", "xentmem.guest.backends.xen", False),
    ("xentmem_cli.backend", "xentmem.guest.registry", True),
    ("xentmem_cli.backend", "xentmem.guest.shim", False),
    ("xentmem_cli.balloon_sim", "xentmem_selfballoon.simulate", True),
    ("xentmem_cli.balloon", "xentmem_selfballoon.simulate", False),
    ("xentmem.errors", "xentmem.params", True),  # foundation modules among themselves
    ("xentmem.errors", "xentmem.tmem.abi", False),
    ("xentmem.tmem.abi", "os", True),  # outside the project: not this test's business
])
def test_the_rules_themselves(importer: str, target: str, ok: bool) -> None:
    assert allowed(importer, target) is ok


def test_imports_inside_functions_and_type_checking_count(tmp_path: Path) -> None:
    (tmp_path / "xentmem" / "tmem").mkdir(parents=True)
    path = tmp_path / "xentmem" / "tmem" / "mod.py"
    path.write_text("from typing import TYPE_CHECKING\n"
                    "if TYPE_CHECKING:\n    from xentmem.guest import shim\n"
                    "def f():\n    from ..hostd import store\n    import xentmem.errors\n")
    found = [(i.line, i.target) for i in imports_of(path, tmp_path)]
    assert (3, "xentmem.guest.shim") in found
    assert (5, "xentmem.hostd.store") in found
    assert (6, "xentmem.errors") in found


def reference_files() -> list[Path]:
    files: list[Path] = []
    for entry in REFERENCE_SCAN:
        path = ROOT / entry
        files += [path] if path.is_file() else sorted(
            p for p in path.rglob("*") if p.suffix in REFERENCE_SUFFIXES)
    return files


def test_no_reference_a_maintainer_cannot_follow() -> None:
    found = []
    for path in reference_files():
        for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            for why, pattern in FORBIDDEN_REFERENCES.items():
                if pattern.search(line):
                    found.append(f"{path.relative_to(ROOT)}:{number}: {why}: {line.strip()}")
    assert not found, "references outside the repository:\n" + "\n".join(found)


#: A path into the repository, as the docs write it (``xentmem/guest/shim.py``, ``tests/xen/``,
#: ``docs/protocol.md``; a deeper ``docs/...`` is Xen's or Linux's, not ours).
_REPO_PATH = re.compile(
    r"(?<![\w./-])((?:xentmem|selfballoon|cli|tests|bench|systemd)/[\w./{},*-]*[\w/}*]"
    r"|docs/[\w-]+\.md)")


def _expand(path: str) -> list[str]:
    """``a/{b,c}.py`` -> ``a/b.py``, ``a/c.py`` (the docs' shorthand for sibling files)."""
    match = re.search(r"\{([^{}]*)\}", path)
    if not match:
        return [path]
    return [expanded for choice in match.group(1).split(",")
            for expanded in _expand(path[:match.start()] + choice + path[match.end():])]


def test_paths_the_docs_and_docstrings_name_exist() -> None:
    missing = []
    for doc in reference_files():
        for number, line in enumerate(doc.read_text().splitlines(), 1):
            for written in _REPO_PATH.findall(line):
                for path in _expand(written.rstrip(".")):
                    found = list(ROOT.glob(path)) if "*" in path else [ROOT / path]
                    if not found or not all(p.exists() for p in found):
                        missing.append(f"{doc.relative_to(ROOT)}:{number}: {path}")
    assert not missing, "files named that do not exist:\n" + "\n".join(missing)


def _rule_tokens(cell: str) -> set[str]:
    """The parts and modules a cell of the doc's rule table names (parentheses are prose)."""
    cell = re.sub(r"\([^()]*\)", "", cell)
    modules = set(re.findall(r"`((?:xentmem|xentmem_\w+)\.[\w.]+)`", cell))
    cell = re.sub(r"`[^`]*`", "", cell)
    return modules | {word for word in re.findall(r"[\w]+", cell) if word in PARTS}


def test_the_architecture_doc_mirrors_the_rule_table() -> None:
    text = (ROOT / "docs" / "architecture.md").read_text()
    section = text.split("## Import rules", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| ")][1:]  # no header
    documented = {}
    for row in rows:
        part_cell, may_cell, never_cell = (c.strip() for c in row.strip("|").split("|"))
        part = part_cell.split()[0]
        documented[part] = (_rule_tokens(may_cell), _rule_tokens(never_cell))
    expected = {}
    for part, grants in MAY_IMPORT.items():
        extra = {m for m in EXTRA_IMPORTS if part_of(m) == part}
        extra |= {p for m in extra for p in EXTRA_IMPORTS[m]}
        expected[part] = (set(grants) | extra, set(MAY_NOT_IMPORT.get(part, ())))
    assert documented == expected


def test_every_package_is_installed() -> None:
    """pyproject lists the packages one by one (the folders are renamed when installed): a
    package missing there is missing from every non-editable install (the real-Xen bed's
    images, a wheel), though an editable install and this suite would never notice."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11 on
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    installed = set(config["packages"])
    found = {
        ".".join([PACKAGES[init.relative_to(ROOT).parts[0]],
                  *init.relative_to(ROOT).parts[1:-1]])
        for folder in PACKAGES for init in (ROOT / folder).rglob("__init__.py")
    }
    assert found - installed == set(), "packages missing from pyproject's [tool.setuptools]"
    assert installed - found == set(), "pyproject names packages that do not exist"
