"""``guestmem new-backend NAME``: a complete backend distribution to start from.

The distribution it writes installs and passes the conformance kit as it is: its policy
implements every hook of :mod:`guestmem.hookspecs` a backend's policy can implement, each
stubbed with the spec's own documentation and the answer that keeps the core's default,
so the new backend behaves as ``sw`` does (an x86 host) or as an arm64 host without an
architecture of its own would, until its author fills the hooks in.  Written:

- ``pyproject.toml``: the distribution ``guestmem-NAME`` with its entry point in group
  ``guestmem``;
- ``guestmem_NAME/plugin.py``: the VM types (a default one and a private one) and the
  registration; ``guestmem_conformance_options``, empty;
- ``guestmem_NAME/policy.py``: the policy, every hook stubbed;
- ``tests/``: the conformance kit subclassed for both VM types (``test_NAME_kit.py``), and
  a scenario under the core's invariant checker and the leak check (``test_NAME.py``);
- ``README.md`` and ``tox.ini``.

The files import only the public API (``guestmem``, ``guestmem.backend``,
``guestmem.uapi``...), as every backend must.
"""

from __future__ import annotations

import argparse
import re
import sys
import textwrap
from pathlib import Path
from typing import Any

from guestmem.hookref import HookSpec, hook_specs

Arch = str
ARCHES = ("x86", "arm64")
#: The generated code's line length (its pyproject's ruff setting, the project's own).
_LINE = 110
_NAME = re.compile(r"^[a-z][a-z0-9]*(?:[-_][a-z0-9]+)*$")
#: The hooks an observer implements, not a policy (they are listed in policy.py's docstring).
_OBSERVER_HOOKS = ("guestmem_ownership_update", "guestmem_trace", "guestmem_operation_done")
#: What the stubbed backend behaves as, by architecture.
_LIKE = {
    "x86": "x86 KVM without hardware (the built-in sw backend)",
    "arm64": "arm64 KVM without an architecture of its own",
}
_VIEW_NAMES = (
    "Fault",
    "GfnRange",
    "GmemView",
    "HostFault",
    "HostView",
    "Leaf",
    "SlotView",
    "VcpuView",
    "VmView",
)


def check_name(name: str) -> str:
    """*name* if it can name a backend, its distribution and its package; ValueError if not."""
    if not _NAME.match(name) or name in ("sw", "linux"):
        raise ValueError(
            f"{name!r} cannot name a backend: lower-case letters and digits, words joined by '-' or '_', "
            "not the name of a backend guestmem ships"
        )
    return name


def _package(name: str) -> str:
    return "guestmem_" + name.replace("-", "_")


def _title(name: str) -> str:
    return "".join(part.capitalize() for part in re.split(r"[-_]", name))


def _constant(name: str) -> str:
    return re.sub(r"[-]", "_", name).upper()


# --- the policy -------------------------------------------------------------------------------------
def _stub(spec: HookSpec) -> str:
    params = spec.signature[len(spec.name) :]
    args, _, returns = params.rpartition(" -> ")
    args = "(self, " + args[1:] if args != "()" else "(self)"
    noqa = "  # noqa: A002" if "range:" in args else ""
    answer = returns != "None"
    if answer:
        default = (
            "Returning None leaves the answer to the core: what the kernel does without the arch hook."
            if spec.firstresult
            else "Returning None is what an architecture without this hook answers."
        )
    else:
        default = "Doing nothing is what an architecture without this hook does."
    doc = textwrap.indent(f"{spec.doc}\n\n{default}", " " * 8).lstrip()
    body = '        """' + doc + '\n        """\n'
    if answer:
        body += "        return None\n"
    define = f"    def {spec.name}{args} -> {returns}:{noqa}"
    if len(define) > _LINE:  # as ruff format wraps it
        define = f"    def {spec.name}(\n        {args[1:-1]}\n    ) -> {returns}:{noqa}"
    return f"    @hookimpl\n{define}\n{body}"


def _import(module: str, names: list[str]) -> str:
    """``from module import names``, wrapped as ruff format does past the line length."""
    line = f"from {module} import {', '.join(names)}"
    if len(line) <= _LINE:
        return line
    inner = "".join(f"    {name},\n" for name in names)
    return f"from {module} import (\n{inner})"


_ARM64_CHECK_EXTENSION = '''        arm64 answers 0 where the core's defaults are x86's: ``KVM_CAP_VM_TYPES``,
        ``KVM_CAP_PRE_FAULT_MEMORY`` and ``KVM_CAP_MULTI_ADDRESS_SPACE`` exist on x86 only; None
        leaves every other capability to the core.
        """
        if cap in (uapi.KVM_CAP_VM_TYPES, uapi.KVM_CAP_PRE_FAULT_MEMORY, uapi.KVM_CAP_MULTI_ADDRESS_SPACE):
            return 0
        return None
'''


def policy_source(name: str, arch: Arch) -> str:
    """``policy.py`` of a new backend: every policy hook, stubbed."""
    title = _title(name)
    stubs = []
    for spec in hook_specs():
        if spec.plugin_level or spec.name in _OBSERVER_HOOKS:
            continue
        stub = _stub(spec)
        if arch == "arm64" and spec.name == "guestmem_check_extension":
            stub = stub[: stub.index("        Returning None")] + _ARM64_CHECK_EXTENSION
        stubs.append(stub)
    body = "\n".join(stubs)
    views = [n for n in _VIEW_NAMES if re.search(rf"\b{n}\b", body)]
    imports = ["from typing import Any", ""]
    if "uapi." in body:
        imports += ["from guestmem import uapi"]
    imports += [_import("guestmem.backend", [*views, "hookimpl"])]
    header = f'''"""The arch policy of the ``{name}`` backend: the hooks the core calls for its hosts and VMs.

Every hook a policy can implement is here, stubbed with what :mod:`guestmem.hookspecs`
says of it and the answer that keeps the core's default, so that the backend behaves as
{_LIKE[arch]}.  Fill in the hooks your architecture needs
and delete the others (an unimplemented hook costs nothing); ``guestmem hooks`` and
docs/backends.md of guestmem say where the kernel calls each one.

The observer hooks (``guestmem_ownership_update``, ``guestmem_trace``,
``guestmem_operation_done``) belong on an observer plugin, such as an invariant checker
of your own, not here.
"""

from __future__ import annotations

{chr(10).join(imports)}


class {title}Policy:
    """The hook implementations of the ``{name}`` backend.

    One object serves every host: per-host state belongs in what ``guestmem_host_init``
    returns (``host.arch``), per-VM state in what ``guestmem_vm_init`` returns
    (``vm.arch``).
    """

'''
    return header + body


# --- the other files ----------------------------------------------------------------------------------
def _vm_types(name: str, arch: Arch) -> str:
    const = _constant(name)
    if arch == "x86":
        return f"""#: Every x86 host offers the default VM type next to its own (CAP-6); the policy leaves
#: such VMs alone, so they behave as on the built-in ``sw`` backend.
DEFAULT_VM = X86_DEFAULT_VM
#: The backend's confidential VM type.  Change ``type`` to your architecture's
#: ``KVM_CREATE_VM`` value and the declarations to what it does: here attributes decide
#: privateness (CAP-5) and conversions are destructive, as on x86 in mainline.
{const}_VM = VmTypeInfo(
    type=6,
    name="KVM_X86_{const}_VM",
    has_private_mem=True,
    nr_memslot_as_ids=1,
    conversion="destructive",
)"""
    return f"""#: A normal arm64 VM as Linux 6.18 has it: no private memory, no memory attributes,
#: gmem-only memslots (S-16), no KVM_PRE_FAULT_MEMORY, one address space.
DEFAULT_VM = VmTypeInfo(
    type=0,
    name="KVM_VM_TYPE_ARM_IPA_SIZE(0)",
    arch="arm64",
    supports_init_shared=True,
    pre_fault_allowed=False,
    nr_memslot_as_ids=1,
    gmem_slot_requires_mmap=True,
    memory_attributes=False,
)
#: The backend's confidential VM type (``KVM_VM_TYPE_ARM(2)``: change it to yours).  Here
#: memory attributes decide privateness and conversions are destructive, as Arm CCA
#: realms have it; a design that shares pages in place (pKVM, Gunyah) declares
#: ``conversion="in_place"`` and converts through its own hypercalls.
{const}_VM = VmTypeInfo(
    type=0x200,
    name="KVM_VM_TYPE_ARM_{const}",
    arch="arm64",
    has_private_mem=True,
    pre_fault_allowed=False,
    nr_memslot_as_ids=1,
    conversion="destructive",
)"""


def plugin_source(name: str, arch: Arch) -> str:
    """``plugin.py``: the VM types, the registration and the kit's options."""
    package, title, const = _package(name), _title(name), _constant(name)
    backend_import = (
        "from guestmem.backend import X86_DEFAULT_VM, Backend, VmTypeInfo, hookimpl"
        if arch == "x86"
        else "from guestmem.backend import Backend, VmTypeInfo, hookimpl"
    )
    return f'''"""The ``guestmem`` entry point of guestmem-{name}: registers the ``{name}`` backend."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

{backend_import}
from {package}.policy import {title}Policy

{_vm_types(name, arch)}

#: The policy object: reached only by hosts and VMs of this backend.
POLICY = {title}Policy()


@hookimpl
def guestmem_register_backends(register: Callable[[Backend], None]) -> None:
    """Register the ``{name}`` backend."""
    register(
        Backend(
            name="{name}",
            summary="{title}: a guestmem backend made with guestmem new-backend",
            vm_types=({const}_VM, DEFAULT_VM),
            policy=POLICY,
        )
    )


@hookimpl
def guestmem_conformance_options(backend: Backend, vm_type: VmTypeInfo) -> dict[str, Any] | None:
    """What the conformance kit cannot read from the VM types' declarations.

    Nothing yet: the kit's defaults.  Flags go here where the declarations do not say
    enough (``{{"private_unmap": "revoke"}}``), and the backend's own invariant checkers
    (``{{"observers": (MyChecker,)}}``).  How the kit launches and drives a VM is not an
    option: it is the backend's intents (``Backend(intents=...)``, none yet: the generic
    base, QEMU's layout and implicit conversions), which scenario files and the pytest
    plugin use too.
    """
    return None
'''


def _init_source(name: str) -> str:
    const = _constant(name)
    package = _package(name)
    return f'''"""guestmem-{name}: a guestmem backend.

The entry point :mod:`{package}.plugin` registers the ``{name}`` backend; its arch policy
is :mod:`{package}.policy`.
"""

from __future__ import annotations

from {package}.plugin import DEFAULT_VM, {const}_VM

__all__ = ["DEFAULT_VM", "{const}_VM"]
'''


def _pyproject(name: str) -> str:
    package = _package(name)
    return f'''[build-system]
requires = ["setuptools>=77"]
build-backend = "setuptools.build_meta"

[project]
name = "guestmem-{name}"
version = "0.1.0"
description = "guestmem backend: {_title(name)}"
readme = "README.md"
requires-python = ">=3.11"
license = "MIT"
dependencies = ["guestmem>=0.1"]

[project.optional-dependencies]
test = ["pytest>=8", "hypothesis>=6.100"]

[project.entry-points.guestmem]
{name} = "{package}.plugin"

[tool.setuptools.packages.find]
include = ["{package}*"]

[tool.setuptools.package-data]
{package} = ["py.typed"]

[tool.pytest.ini_options]
testpaths = ["tests"]
filterwarnings = ["error"]
addopts = "-ra --strict-markers"

[tool.ruff]
line-length = 110
target-version = "py311"

[tool.ruff.lint]
select = ["E", "F", "W", "I", "B", "UP", "N", "A", "SIM", "RUF", "PL", "BLE"]
ignore = ["PLR0913", "PLR0917", "PLR2004", "PLR0911", "PLR0912", "PLR0915", "PLC0415", "N818"]

[tool.ruff.lint.isort]
known-first-party = ["guestmem", "{package}"]

[tool.mypy]
strict = true
python_version = "3.11"
'''


def _tox(name: str) -> str:
    return f"""[tox]
requires = tox>=4.11
env_list = py, lint, type

[testenv]
description = the conformance kit and the backend's own tests
package = editable
deps =
    {{env:GUESTMEM_CORE:guestmem}}
    pytest>=8
    hypothesis>=6.100
commands = pytest {{posargs:tests}}

[testenv:lint]
description = ruff
skip_install = true
deps = ruff>=0.6
commands = ruff check {_package(name)} tests

[testenv:type]
description = mypy --strict
deps =
    {{env:GUESTMEM_CORE:guestmem}}
    mypy>=1.11
commands = mypy --strict {_package(name)}
"""


def _readme(name: str, arch: Arch) -> str:
    package, const = _package(name), _constant(name)
    return f'''# guestmem-{name}

A [guestmem](https://github.com/) backend: `{name}`, an {arch} host.

Made by `guestmem new-backend {name} --arch {arch}`: it installs and passes the
conformance kit as it is, behaving as {_LIKE[arch]}.
Its VM types are `{const}_VM` (private memory, destructive conversions) and `DEFAULT_VM`.

## Using it

```sh
pip install -e . pytest hypothesis
pytest                        # the conformance kit and the backend's own tests
guestmem backends --hooks     # the backend is there, with the hooks it implements
guestmem fuzz --backend {name}  # the kit's stateful machine for 1000 steps
```

```python
import guestmem
from {package} import {const}_VM

with guestmem.open("{name}") as kvm, kvm.create_vm({const}_VM.type) as vm:
    gmem = vm.create_guest_memfd(1 << 20)
```

## Layout

| path | what |
|---|---|
| `{package}/plugin.py` | the entry point: VM types, registration, the conformance kit's options |
| `{package}/policy.py` | the arch policy: every hook, stubbed with its documentation |
| `tests/test_{package.removeprefix("guestmem_")}_kit.py` | the conformance kit for both VM types |
| `tests/test_{package.removeprefix("guestmem_")}.py` | its own tests (invariants, leak check) |

## Next steps

1. Declare your VM types truthfully in `plugin.py` (the `KVM_CREATE_VM` value, memory
   attributes, `conversion`: `"destructive"` or `"in_place"`).
2. Model your hardware's state in what `guestmem_host_init` / `guestmem_vm_init` return,
   and fill in the hooks it needs; delete the others.
3. Report every change of your ownership table with `vm.ownership_update(...)`: the kit's
   leak check and cross-checks read them.
4. Test every state transition and every illegal one, citing the source each follows.

guestmem's `docs/backends.md` walks through it; `guestmem hooks` lists every hook and
where the kernel calls it.
'''


def kit_test_source(name: str, arch: Arch) -> str:
    """``tests/test_NAME_kit.py``: the kit subclassed for both VM types."""
    package, title, const = _package(name), _title(name), _constant(name)
    uapi_import = "from guestmem import uapi\n" if arch == "arm64" else ""
    slot_flags = (
        "    # arm64 accepts only gmem-only (MMAP) guest_memfd memslots (S-16).\n"
        "    slot_gmem_flags = uapi.GUEST_MEMFD_FLAG_MMAP\n"
        if arch == "arm64"
        else ""
    )
    return f'''"""The guestmem conformance kit against both VM types of the ``{name}`` backend.

The kit's flags say what the backend supports; they start from what the VM types declare
(``guestmem.conformance.declared_flags``).  Every deep test ends with the leak check, and
the core's invariant checker watches every event.
"""

from __future__ import annotations

{uapi_import}from guestmem.conformance import GmemConformance
from {package} import DEFAULT_VM, {const}_VM


class Test{title}Vm(GmemConformance):
    """The confidential VM type: the uAPI rules, conversion round trips, host access,
    memslot changes, release while bound, the leak check and the stateful machine."""

    backend = "{name}"
    vm_type = {const}_VM.type
    private_access = True


class Test{title}DefaultVm(GmemConformance):
    """The default VM type: the same rules on plain guest_memfd memory."""

    backend = "{name}"
    vm_type = DEFAULT_VM.type
{slot_flags}'''


def scenario_test_source(name: str) -> str:
    """``tests/test_NAME.py``: a scenario under the invariant checker and the leak check."""
    package, const = _package(name), _constant(name)
    return f'''"""The ``{name}`` backend's own tests: a guest's lifecycle under the core's invariant
checker, then the leak check.  Add a test per state transition of your hardware here,
legal and illegal, citing the source function each follows."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

import guestmem
from guestmem import uapi
from guestmem.conformance import OwnershipLedger, allocated, check_released
from guestmem.invariants import InvariantChecker
from {package} import {const}_VM

MiB = 1 << 20
GPA = 0x10000000
PRIVATE = uapi.KVM_MEMORY_ATTRIBUTE_PRIVATE


@pytest.fixture
def observers() -> Iterator[tuple[InvariantChecker, OwnershipLedger]]:
    """The invariant checker and the ownership ledger, registered for one test."""
    registry = guestmem.get_registry()
    checker, ledger = InvariantChecker(), OwnershipLedger()
    registry.add_plugin(checker, name="{name}-invariants")
    registry.add_plugin(ledger, name="{name}-ledger")
    try:
        yield checker, ledger
    finally:
        registry.remove_plugin(ledger)
        registry.remove_plugin(checker)


def test_a_guest_lifecycle_keeps_the_invariants_and_leaks_nothing(
    observers: tuple[InvariantChecker, OwnershipLedger],
) -> None:
    checker, ledger = observers
    with guestmem.open("{name}") as kvm:
        baseline = allocated(kvm)
        vm = kvm.create_vm({const}_VM.type)
        gmem = vm.create_guest_memfd(MiB)
        shared = kvm.mmap_anonymous(MiB)
        vm.set_user_memory_region2(0, uapi.KVM_MEM_GUEST_MEMFD, GPA, MiB, shared.address, gmem, 0)
        vm.set_memory_attributes(GPA, MiB, PRIVATE)
        vcpu = vm.create_vcpu(0)
        vcpu.access(GPA + 0x2000, data=b"secret", private=True)
        assert vcpu.access(GPA + 0x2000, 6, private=True) == b"secret"
        # Destructive conversion to shared: attribute, then the VMM punches the private copy.
        vm.set_memory_attributes(GPA + 0x2000, 0x1000, 0)
        gmem.fallocate(uapi.FALLOC_FL_KEEP_SIZE | uapi.FALLOC_FL_PUNCH_HOLE, 0x2000, 0x1000)
        assert vcpu.access(GPA + 0x2000, 6, private=False) == bytes(6)
        vcpu.close()
        vm.close()
        shared.close()
        gmem.close()
        check_released(kvm, ledger, baseline)
    assert checker.checked > 0
'''


def files(name: str, arch: Arch = "x86") -> dict[str, str]:
    """Every file of the new distribution, by path relative to its directory."""
    check_name(name)
    if arch not in ARCHES:
        raise ValueError(f"--arch must be one of {', '.join(ARCHES)}, not {arch!r}")
    package = _package(name)
    short = package.removeprefix("guestmem_")
    return {
        "pyproject.toml": _pyproject(name),
        "README.md": _readme(name, arch),
        "tox.ini": _tox(name),
        f"{package}/__init__.py": _init_source(name),
        f"{package}/plugin.py": plugin_source(name, arch),
        f"{package}/policy.py": policy_source(name, arch),
        f"{package}/py.typed": "",
        f"tests/test_{short}_kit.py": kit_test_source(name, arch),
        f"tests/test_{short}.py": scenario_test_source(name),
    }


def write(name: str, directory: Path, arch: Arch = "x86") -> list[Path]:
    """Write the distribution of backend *name* into *directory* (which must not exist or
    be empty); returns the files written."""
    content = files(name, arch)
    if directory.exists() and any(directory.iterdir()):
        raise FileExistsError(f"{directory} exists and is not empty")
    written = []
    for relative, text in content.items():
        path = directory / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
        written.append(path)
    return written


def _cmd_new_backend(args: argparse.Namespace) -> int:
    directory = Path(args.directory or f"guestmem-{args.name}")
    try:
        written = write(args.name, directory, args.arch)
    except (ValueError, FileExistsError) as exc:
        print(f"guestmem new-backend: {exc}", file=sys.stderr)
        return 2
    print(f"wrote guestmem-{args.name} ({args.arch}) to {directory}/: {len(written)} files")
    print(f"next: pip install -e {directory} pytest hypothesis && (cd {directory} && pytest)")
    return 0


def add_cli(subparsers: Any) -> None:
    """Add ``guestmem new-backend NAME [--arch x86|arm64] [--directory DIR]``."""
    p = subparsers.add_parser(
        "new-backend", help="write a complete backend distribution that passes the conformance kit as it is"
    )
    p.add_argument("name", help="the backend's name (distribution guestmem-NAME, package guestmem_NAME)")
    p.add_argument("--arch", choices=ARCHES, default="x86", help="the host architecture (default x86)")
    p.add_argument("--directory", help="where to write it (default ./guestmem-NAME)")
    p.set_defaults(func=_cmd_new_backend)
