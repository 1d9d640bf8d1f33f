"""The rule reference: what the rule ID in an error message means.

Every :class:`~guestmem.errors.KvmError` names the rule that decided it
(``EINVAL: [B-5] ...``).  ``rules.toml``, shipped with the package, describes each ID: the
group it belongs to, its condition, the errno it produces and the kernel function that
implements it.  :func:`lookup` finds one rule, :func:`render_markdown` writes
``docs/rules.md``, ``guestmem rules ID`` prints one on the command line, and
:func:`raised_rule_ids` finds the IDs a source tree raises, so tests can keep the
reference (and a backend's README, :func:`readme_rule_problems`) complete.
"""

from __future__ import annotations

import argparse
import ast
import difflib
import errno as _errno
import functools
import importlib.resources
import inspect
import json
import pathlib
import re
import shutil
import sys
import textwrap
import tomllib
from collections.abc import Iterable, Iterator
from typing import Any

import attrs

from guestmem.errors import HostSigbus, HostSigsegv, KvmError, MemoryFault

#: Errno names the ``errno`` module may lack on some platforms.
_EXTRA_ERRNOS = frozenset({"EHWPOISON", "EOPNOTSUPP"})


def is_errno_name(name: str) -> bool:
    """True iff *name* is a symbolic errno (``EINVAL``) the kernel can return."""
    return isinstance(getattr(_errno, name, None), int) or name in _EXTRA_ERRNOS


def _errno_names(_rule: Rule, attribute: attrs.Attribute[tuple[str, ...]], names: tuple[str, ...]) -> None:
    bad = [name for name in names if not is_errno_name(name)]
    if bad:
        raise ValueError(f"{attribute.name}: not errno names: {', '.join(bad)}")


def _text(value: Iterable[str]) -> tuple[str, ...]:
    return tuple(value)


@attrs.frozen
class Rule:
    """One rule of the reference.

    :param id: the ID as errors carry it (``"B-5"``).
    :param section: the group it belongs to, e.g. ``"KVM_CREATE_GUEST_MEMFD"``.
    :param condition: what the rule decides: inputs, order of the checks, outcome.
    :param errno: symbolic errno names it can produce; empty when it decides something
        other than an errno (a value, a state change, a protocol step).
    :param kernel: the kernel function(s) that implement it.
    :param versions: how kernels differ and which one the model follows ("" if they don't).
    """

    id: str = attrs.field(validator=attrs.validators.min_len(1))
    section: str = attrs.field(validator=attrs.validators.min_len(1))
    condition: str = attrs.field(validator=attrs.validators.min_len(1))
    errno: tuple[str, ...] = attrs.field(converter=_text, validator=_errno_names)
    kernel: tuple[str, ...] = attrs.field(converter=_text, validator=attrs.validators.min_len(1))
    versions: str = ""

    def to_json(self) -> dict[str, Any]:
        """The rule as a JSON object (lists for the tuples)."""
        return attrs.asdict(self)


@functools.cache
def _rules() -> dict[str, Rule]:
    """``rules.toml`` parsed once, in file order."""
    data = importlib.resources.files("guestmem").joinpath("rules.toml").read_bytes()
    table = tomllib.loads(data.decode("utf-8"))
    rules: dict[str, Rule] = {}
    for entry in table["rule"]:
        try:
            rule = Rule(**entry)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"rules.toml: rule {entry.get('id')!r}: {exc}") from None
        if rule.id in rules:
            raise ValueError(f"rules.toml: rule {rule.id!r} appears twice")
        rules[rule.id] = rule
    return rules


def all_rules() -> list[Rule]:
    """Every documented rule, grouped by section in the reference's order."""
    return list(_rules().values())


def lookup(rule_id: str) -> Rule | None:
    """The rule *rule_id* (``"B-5"``, also ``"b-5"`` or ``"[B-5]"``), or None."""
    rules = _rules()
    key = rule_id.strip().strip("[]")
    rule = rules.get(key)
    if rule is None:
        folded = {r.casefold(): r for r in rules}
        found = folded.get(key.casefold())
        rule = rules[found] if found is not None else None
    return rule


def close_ids(rule_id: str, n: int = 3) -> list[str]:
    """Documented IDs that look like *rule_id* (for an unknown one)."""
    ids = {r.casefold(): r for r in _rules()}
    return [ids[m] for m in difflib.get_close_matches(rule_id.strip("[] ").casefold(), ids, n=n, cutoff=0.5)]


def _sections(rules: Iterable[Rule]) -> dict[str, list[Rule]]:
    sections: dict[str, list[Rule]] = {}
    for rule in rules:
        sections.setdefault(rule.section, []).append(rule)
    return sections


# --- docs/rules.md -------------------------------------------------------------------------
_INTRO = """\
# Rule reference

Every error guestmem raises names the rule that decided it, in brackets after the errno:

```
EINVAL: [B-5] gmem pages [0x0, 0x1) overlap pages bound to slot 0:0 gpa [0x0, 0x40000000)
```

The exception carries the same ID as `err.rule` (`KvmError`, `MemoryFault`, `HostSigbus`).
The IDs are those of the guest_memfd uAPI specification the model follows (`CAP-`, `C-`,
`F-`, `FA-`, `M-`, `S-`, `B-`, `L-`, `A-`, `G-`, `H-`, `P-`, `PF-`, `E-` rules, and the
protocol sections `3.x`), plus a few of the model's own. Below, each rule says what it
checks or decides, in the order the kernel evaluates it, which errno it produces (— when
it decides something else), and which kernel function implements it. Unless a rule says
otherwise the model follows Linux 6.18 (see [profiles.md](profiles.md)).

`guestmem rules B-5` prints one rule, `guestmem rules` lists them all, and
`guestmem rules --json` gives them as JSON. Backends name their own rules in their READMEs
(for example `pKVM-3.5` in `plugins/pkvm/README.md`).

This file is generated from `core/guestmem/rules.toml` by `guestmem rules --markdown`;
edit that file, not this one.
"""


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def _anchor(title: str) -> str:
    """GitHub's anchor for a heading *title*."""
    kept = "".join(c for c in title.lower() if c.isalnum() or c in " -_")
    return kept.replace(" ", "-")


def render_markdown() -> str:
    """The whole text of ``docs/rules.md``."""
    sections = _sections(all_rules())
    out = [_INTRO, "## Groups", ""]
    for title, rules in sections.items():
        span = rules[0].id if len(rules) == 1 else f"{rules[0].id} .. {rules[-1].id}"
        out.append(f"- [{title}](#{_anchor(title)}): {span}")
    for title, rules in sections.items():
        out += ["", f"## {title}", "", "| ID | condition | errno | kernel |", "|---|---|---|---|"]
        for rule in rules:
            condition = _cell(rule.condition)
            if rule.versions:
                condition += f" *Versions:* {_cell(rule.versions)}"
            errnos = ", ".join(rule.errno) or "—"
            kernel = ", ".join(f"`{name}`" for name in rule.kernel)
            out.append(f"| {rule.id} | {condition} | {errnos} | {kernel} |")
    return "\n".join(out) + "\n"


# --- finding the IDs a source tree raises ---------------------------------------------------
def _rule_index(params: list[str]) -> int | None:
    return params.index("rule") if "rule" in params else None


#: The error classes that take a rule, and the position of their ``rule`` argument.
_ERROR_RULE_INDEX = {
    cls.__name__: _rule_index(list(inspect.signature(cls).parameters))
    for cls in (KvmError, MemoryFault, HostSigbus, HostSigsegv)
}


def _literals(expr: ast.expr | None) -> Iterator[str]:
    """The string constants *expr* can evaluate to (``"X"``, ``"X" if c else "Y"``)."""
    if isinstance(expr, ast.Constant) and isinstance(expr.value, str):
        yield expr.value
    elif isinstance(expr, ast.IfExp):
        yield from _literals(expr.body)
        yield from _literals(expr.orelse)
    elif isinstance(expr, ast.BoolOp):
        for value in expr.values:
            yield from _literals(value)


def _name(node: ast.expr) -> str:
    """The name *node* ends in (``f`` for ``f`` and ``x.f``), or ``""``."""
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return node.attr
    return ""


def _is_rule_name(target: ast.expr) -> bool:
    name = _name(target).lower().lstrip("_")
    return name == "rule" or name.endswith("_rule")


def _is_super_init(call: ast.Call) -> bool:
    func = call.func
    return (
        isinstance(func, ast.Attribute)
        and func.attr == "__init__"
        and isinstance(func.value, ast.Call)
        and _name(func.value.func) == "super"
    )


def _rule_takers(trees: Iterable[ast.Module]) -> dict[str, int | None]:
    """Callables that take a ``rule`` argument: name -> its position (None: keyword only).

    The error classes, plus every function, method or class (by its ``__init__``) of the
    scanned source with a parameter named ``rule``, so helpers such as
    ``_memory_fault(fault, err, rule, why)`` count.
    """
    takers = dict(_ERROR_RULE_INDEX)
    for tree in trees:
        for node in ast.walk(tree):
            owners: list[tuple[str, ast.AST]] = []
            if isinstance(node, ast.ClassDef):
                owners = [(node.name, item) for item in node.body]
            elif isinstance(node, ast.Module):
                owners = [("", item) for item in node.body]
            for cls, item in owners:
                if not isinstance(item, ast.FunctionDef | ast.AsyncFunctionDef):
                    continue
                params = [a.arg for a in item.args.posonlyargs + item.args.args]
                if cls:
                    params = params[1:]  # self
                if "rule" not in params and "rule" not in {a.arg for a in item.args.kwonlyargs}:
                    continue
                name = cls if cls and item.name == "__init__" else item.name
                takers[name] = _rule_index(params)
    return takers


class _Scan(ast.NodeVisitor):
    """Collects the rule literals of one module (see :func:`raised_rule_ids`)."""

    def __init__(self, takers: dict[str, int | None], where: str) -> None:
        self.takers = takers
        self.where = where
        self.found: list[tuple[str, str]] = []
        self._bases: list[list[str]] = []

    def _note(self, expr: ast.expr | None, line: int) -> None:
        for value in _literals(expr):
            if value:
                self.found.append((value, f"{self.where}:{line}"))

    def visit_ClassDef(self, node: ast.ClassDef) -> None:
        self._bases.append([_name(b) for b in node.bases])
        self.generic_visit(node)
        self._bases.pop()

    def visit_Call(self, node: ast.Call) -> None:
        name = _name(node.func)
        if _is_super_init(node) and self._bases:
            name = next((b for b in self._bases[-1] if b in self.takers), "")
        if name in self.takers:
            index = self.takers[name]
            if index is not None and index < len(node.args):
                self._note(node.args[index], node.lineno)
        for keyword in node.keywords:
            if keyword.arg == "rule":
                self._note(keyword.value, node.lineno)
        self.generic_visit(node)

    def visit_Assign(self, node: ast.Assign) -> None:
        if any(_is_rule_name(t) for t in node.targets):
            self._note(node.value, node.lineno)
        self.generic_visit(node)

    def visit_AnnAssign(self, node: ast.AnnAssign) -> None:
        if _is_rule_name(node.target):
            self._note(node.value, node.lineno)
        self.generic_visit(node)


def raised_rule_ids(root: pathlib.Path) -> dict[str, list[str]]:
    """The rule IDs the Python source under *root* raises: ID -> ``["path:line", ...]``.

    Found with the AST: string literals passed as the ``rule`` of ``KvmError``,
    ``MemoryFault``, ``HostSigbus``, ``HostSigsegv``, their subclasses (also through ``super().__init__``)
    and any function of the tree with a ``rule`` parameter; ``rule=`` keywords; and
    literals assigned to a name ``rule``/``RULE``/``*_rule``.  ``""`` (no rule) is left out.
    """
    paths = sorted(root.rglob("*.py"))
    trees = {path: ast.parse(path.read_text(encoding="utf-8"), str(path)) for path in paths}
    takers = _rule_takers(trees.values())
    found: dict[str, list[str]] = {}
    for path, tree in trees.items():
        scan = _Scan(takers, path.relative_to(root).as_posix())
        scan.visit(tree)
        for rule_id, where in scan.found:
            found.setdefault(rule_id, []).append(where)
    return dict(sorted(found.items()))


def readme_rule_ids(readme: str) -> set[str]:
    """The rule IDs a backend's README lists: the first column of the table under ``## Rules``.

    A backend documents each ID it raises as a row ``| `pKVM-3.5` | what it means |``.
    """
    _, _, rest = readme.partition("\n## Rules\n")
    section = rest.split("\n## ", 1)[0]
    return set(re.findall(r"^\| `([^`]+)` \|", section, re.MULTILINE))


def readme_rule_problems(package: pathlib.Path) -> list[str]:
    """What the README of a backend distribution gets wrong about the rules it raises.

    *package* is the backend's import package; its README is ``README.md`` in the
    distribution directory that holds it.  One line per rule ID the package raises
    (:func:`raised_rule_ids`) that the README's ``## Rules`` table lacks, and per ID the
    table lists that the package never raises; empty when the two agree.
    """
    raised = raised_rule_ids(package)
    listed = readme_rule_ids((package.parent / "README.md").read_text(encoding="utf-8"))
    problems = [
        f"{rule_id}: raised ({', '.join(where)}) but not in the README's Rules table"
        for rule_id, where in raised.items()
        if rule_id not in listed
    ]
    problems += [
        f"{rule_id}: in the README's Rules table but never raised" for rule_id in sorted(listed - set(raised))
    ]
    return problems


# --- guestmem rules ------------------------------------------------------------------------
def format_rule(rule: Rule, width: int = 88) -> str:
    """One rule as plain text for the terminal."""
    wrap = functools.partial(textwrap.fill, width=width, initial_indent="  ", subsequent_indent="  ")
    lines = [f"{rule.id}  ({rule.section})", wrap(" ".join(rule.condition.split()))]
    lines.append(f"  errno:    {', '.join(rule.errno) or '-'}")
    lines.append(f"  kernel:   {', '.join(rule.kernel)}")
    if rule.versions:
        versions = " ".join(rule.versions.split())
        lines.append(
            textwrap.fill(versions, width, initial_indent="  versions: ", subsequent_indent=" " * 12)
        )
    return "\n".join(lines)


def format_list(rules: Iterable[Rule], width: int = 100) -> str:
    """*rules* by section, one line each: ID, errno, as much of the condition as fits."""
    out: list[str] = []
    for title, group in _sections(rules).items():
        if out:
            out.append("")
        out.append(title)
        id_width = max(len(rule.id) for rule in group)
        errno_width = max(len("/".join(rule.errno)) for rule in group)
        for rule in group:
            head = f"  {rule.id:<{id_width}}  {'/'.join(rule.errno) or '-':<{errno_width}}  "
            text = " ".join(rule.condition.split())
            room = max(width - len(head), 20)
            out.append(head + (text if len(text) <= room else text[: room - 1] + "…"))
    return "\n".join(out)


def _cmd_rules(args: argparse.Namespace) -> int:
    if args.markdown:
        if args.ids:
            raise LookupError("rules --markdown prints the whole reference; give no rule ID")
        sys.stdout.write(render_markdown())
        return 0
    if not args.ids:
        rules = all_rules()
    else:
        found = [(rule_id, lookup(rule_id)) for rule_id in args.ids]
        unknown = [rule_id for rule_id, rule in found if rule is None]
        if unknown:
            rule_id = unknown[0]
            close = close_ids(rule_id)
            hint = f"; did you mean {', '.join(close)}?" if close else "; `guestmem rules` lists them all"
            raise LookupError(f"unknown rule ID {rule_id!r}{hint}")
        rules = [rule for _, rule in found if rule is not None]
    if args.json:
        print(json.dumps([rule.to_json() for rule in rules], indent=2, ensure_ascii=False))
    elif args.ids:
        width = min(shutil.get_terminal_size((88, 24)).columns, 100)
        print("\n\n".join(format_rule(rule, width) for rule in rules))
    else:
        print(format_list(rules, shutil.get_terminal_size((100, 24)).columns))
    return 0


def add_cli(subparsers: Any) -> None:
    """Add ``guestmem rules [ID ...] [--json] [--markdown]`` to the CLI's subparsers."""
    p = subparsers.add_parser(
        "rules", help="what a rule ID in an error message means (all rules without an ID)"
    )
    p.add_argument("ids", nargs="*", metavar="ID", help="rule IDs to print, e.g. B-5")
    form = p.add_mutually_exclusive_group()
    form.add_argument("--json", action="store_true", help="machine-readable output")
    form.add_argument("--markdown", action="store_true", help="the whole reference as docs/rules.md")
    p.set_defaults(func=_cmd_rules)
