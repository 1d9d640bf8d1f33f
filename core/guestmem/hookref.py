"""The hook reference, read from :mod:`guestmem.hookspecs`: ``guestmem hooks`` and the
reference section of docs/backends.md.

Every hook is described from its spec alone: its signature, whether it is ``firstresult``
(answered by the backend's policy alone) or ``historic``, where the kernel calls the
function it stands for (the kernel names in its first line and its "Called ..."
sentence), its documentation, and which installed backends implement it.  The markdown
form is what docs/backends.md holds between its reference markers; a test keeps the two
equal, as docs/rules.md is kept equal to rules.toml.
"""

from __future__ import annotations

import argparse
import inspect
import json
import re
import sys
from typing import Any

import attrs

from guestmem import hookspecs
from guestmem.backend import PROJECT, Fault, GfnRange, Leaf
from guestmem.hooks import PLUGIN_HOOK_NAMES
from guestmem.registry import Registry, get_registry

#: The markers around the generated reference in docs/backends.md.
BEGIN = "<!-- hook reference: generated from core/guestmem/hookspecs.py by `guestmem hooks --markdown` -->"
END = "<!-- end of hook reference -->"

_ROLE = re.compile(r":(?:class|func|data|attr|meth|mod|exc):`~?([^`]+)`")
_KERNEL_NAME = re.compile(r"``([a-z_][a-z0-9_]*(?:\.[a-z_][a-z0-9_]*)?)``")
_PARAM = re.compile(r"^:param (\w+):\s*(.*)$")


@attrs.frozen
class HookSpec:
    """One hook of :mod:`guestmem.hookspecs`, as the reference shows it."""

    name: str
    signature: str
    firstresult: bool
    historic: bool
    #: The first line of the docstring.
    summary: str
    #: Kernel functions the hook stands for or is called from (named in the first line
    #: and the "Called ..." sentence).
    kernel: tuple[str, ...]
    #: The docstring's "Called ..." sentence, empty if it has none.
    called_from: str
    #: The docstring without its ``:param:`` lines.
    doc: str
    #: ``(name, description)`` per argument.
    params: tuple[tuple[str, str], ...]

    @property
    def nature(self) -> str:
        """``firstresult``, ``historic`` or ``every implementation``."""
        if self.firstresult:
            return "firstresult"
        return "historic" if self.historic else "every implementation"

    @property
    def plugin_level(self) -> bool:
        """Implemented by the plugin that registers backends, not by a policy."""
        return self.name.removeprefix("guestmem_") in PLUGIN_HOOK_NAMES


def _plain(text: str) -> str:
    """reST roles and literals as markdown code."""
    return _ROLE.sub(lambda m: f"`{m.group(1).rsplit('.', 1)[-1]}`", text).replace("``", "`")


#: Fields of the values hooks receive: named in docstrings, but not kernel functions.
_FIELDS = frozenset(f.name for cls in (Fault, GfnRange, Leaf) for f in attrs.fields(cls))


def _is_kernel(name: str) -> bool:
    """A kernel function's name (``kvm_gmem_bind``, ``kvm_x86_ops.set_external_spte``), not
    a field (``vm.arch``, ``attr_filter``), a hook or a syscall."""
    head, _, tail = name.rpartition(".")
    return (
        "_" in (tail or name)
        and head in ("", "kvm_x86_ops")
        and not name.startswith(PROJECT)
        and name not in _FIELDS
    )


def _spec(name: str, function: Any) -> HookSpec:
    options = getattr(function, f"{PROJECT}_spec", {}) or {}
    doc = inspect.cleandoc(function.__doc__ or "")
    lines = doc.splitlines()
    params: list[tuple[str, str]] = []
    body: list[str] = []
    for line in lines:
        found = _PARAM.match(line.strip())
        if found:
            params.append((found.group(1), found.group(2)))
        elif params and line.startswith("    ") and line.strip():
            params[-1] = (params[-1][0], f"{params[-1][1]} {line.strip()}")
        else:
            body.append(line)
    text = " ".join(" ".join(body).split())
    called = next((s.strip() for s in re.split(r"(?<=\.)\s+", text) if s.strip().startswith("Called")), "")
    summary = lines[0] if lines else ""
    signature = str(inspect.signature(function)).replace("'", "")
    return HookSpec(
        name=name,
        signature=f"{name}{signature}",
        firstresult=bool(options.get("firstresult")),
        historic=bool(options.get("historic")),
        summary=summary,
        kernel=tuple(dict.fromkeys(n for n in _KERNEL_NAME.findall(f"{summary} {called}") if _is_kernel(n))),
        called_from=called,
        doc="\n".join(body).strip(),
        params=tuple(params),
    )


def hook_specs() -> list[HookSpec]:
    """Every hook of :mod:`guestmem.hookspecs`, in the module's order."""
    return [
        _spec(name, function)
        for name, function in vars(hookspecs).items()
        if name.startswith(f"{PROJECT}_") and callable(function)
    ]


def implementers(registry: Registry | None = None) -> dict[str, list[str]]:
    """Hook name -> the installed backends that implement it, by name.

    A policy hook counts for the backends whose policy implements it; a plugin-level hook
    (``guestmem_register_backends``, ``guestmem_conformance_options``) for the backends
    the implementing plugin registered.
    """
    registry = registry or get_registry()
    found: dict[str, list[str]] = {spec.name: [] for spec in hook_specs()}
    for name, backend in sorted(registry.backends().items()):
        for hook in registry.hook_names(backend) + registry.plugin_hook_names(backend):
            found.setdefault(hook, []).append(name)
    return found


def as_json(specs: list[HookSpec], used: dict[str, list[str]]) -> list[dict[str, Any]]:
    """What ``guestmem hooks --json`` prints."""
    return [
        {
            "name": s.name,
            "signature": s.signature,
            "firstresult": s.firstresult,
            "historic": s.historic,
            "plugin_level": s.plugin_level,
            "kernel": list(s.kernel),
            "called_from": s.called_from,
            "summary": _plain(s.summary),
            "params": {name: _plain(text) for name, text in s.params},
            "backends": used.get(s.name, []),
        }
        for s in specs
    ]


def render_markdown(specs: list[HookSpec] | None = None) -> str:
    """The hook reference of docs/backends.md, markers included."""
    out = [
        BEGIN,
        "",
        "| hook | nature | kernel function |",
        "|---|---|---|",
    ]
    specs = hook_specs() if specs is None else specs
    for s in specs:
        kernel = ", ".join(f"`{k}`" for k in s.kernel) or "-"
        out.append(f"| [`{s.name}`](#{s.name}) | {s.nature} | {kernel} |")
    for s in specs:
        out += ["", f"### {s.name}", "", f"`{s.signature}`", ""]
        where = (
            "the plugin that registers backends" if s.plugin_level else "a backend's policy or an observer"
        )
        out.append(f"*{s.nature}*; implemented by {where}.")
        out += ["", _plain(s.doc)]
        if s.params:
            out.append("")
            out += [f"- `{name}`: {_plain(text)}" for name, text in s.params]
    out += ["", END, ""]
    return "\n".join(out)


def format_text(specs: list[HookSpec], used: dict[str, list[str]]) -> str:
    """What ``guestmem hooks`` prints: one block per hook."""
    blocks = []
    for s in specs:
        lines = [f"{s.signature}  [{s.nature}]", f"  {_plain(s.summary)}"]
        if s.called_from:
            lines.append(f"  {_plain(s.called_from)}")
        lines.append(f"  backends: {', '.join(used.get(s.name, [])) or '-'}")
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks) + "\n"


def _cmd_hooks(args: argparse.Namespace) -> int:
    specs = hook_specs()
    if args.markdown:
        sys.stdout.write(render_markdown(specs))
        return 0
    used = implementers()
    if args.json:
        print(json.dumps(as_json(specs, used), indent=2))
        return 0
    sys.stdout.write(format_text(specs, used))
    return 0


def add_cli(subparsers: Any) -> None:
    """Add ``guestmem hooks [--json | --markdown]`` to the CLI's subparsers."""
    p = subparsers.add_parser(
        "hooks", help="every hook a backend can implement, where the kernel calls it, and who implements it"
    )
    form = p.add_mutually_exclusive_group()
    form.add_argument("--json", action="store_true", help="machine-readable output")
    form.add_argument("--markdown", action="store_true", help="the reference section of docs/backends.md")
    p.set_defaults(func=_cmd_hooks)
