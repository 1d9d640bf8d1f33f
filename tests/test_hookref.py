"""The hook reference: ``guestmem hooks``, ``guestmem backends --hooks`` and the generated
reference of docs/backends.md, all read from hookspecs.py."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from gmem_helpers import BackendPlugin, plugin, x86_type

import guestmem
from guestmem import hookref, hookspecs
from guestmem.backend import hookimpl
from guestmem.cli import main

ROOT = Path(__file__).resolve().parents[1]


class FaultOnly:
    @hookimpl
    def guestmem_fault(self, vm: Any, fault: Any) -> None:
        """Nothing: implements one hook."""


def test_every_hookspec_is_described_with_its_nature() -> None:
    specs = {s.name: s for s in hookref.hook_specs()}
    assert set(specs) == {n for n in vars(hookspecs) if n.startswith("guestmem_")}
    pm = guestmem.get_registry().pm
    for name, spec in specs.items():
        opts = getattr(pm.hook, name).spec.opts
        assert (spec.firstresult, spec.historic) == (bool(opts["firstresult"]), bool(opts["historic"]))
        assert spec.signature.startswith(f"{name}(") and spec.summary
    fault = specs["guestmem_fault"]
    assert fault.kernel == ("kvm_mmu_faultin_pfn", "gmem_abort") and fault.called_from.startswith(
        "Called from"
    )
    assert [p for p, _ in fault.params] == ["vm", "fault"]
    assert specs["guestmem_gmem_fault_user_mapping"].nature == "firstresult"
    assert specs["guestmem_conformance_options"].plugin_level and not fault.plugin_level
    assert "attr_filter" not in specs["guestmem_remove_external_spte"].kernel


class WithOptions(BackendPlugin):
    @hookimpl
    def guestmem_conformance_options(self, backend: Any, vm_type: Any) -> None:
        return None


def test_implementers_name_the_backends_of_each_hook() -> None:
    with (
        plugin(BackendPlugin("t-hookref", (x86_type(1),), FaultOnly())),
        plugin(WithOptions("t-hookref-opts", (x86_type(1),), FaultOnly())),
    ):
        used = hookref.implementers()
    assert {"t-hookref", "t-hookref-opts"} <= set(used["guestmem_fault"])
    assert {"t-hookref", "sw"} <= set(used["guestmem_register_backends"])
    assert "t-hookref" not in used["guestmem_gmem_prepare"] and "sw" not in used["guestmem_gmem_prepare"]
    assert "t-hookref-opts" in used["guestmem_conformance_options"]
    assert "t-hookref" not in used["guestmem_conformance_options"]


def test_cli_hooks_text_and_json(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["hooks"]) == 0
    text = capsys.readouterr().out
    assert (
        "guestmem_unmap_gfn_range(vm: VmView, range: GfnRange) -> bool | None  [every implementation]" in text
    )
    assert "  Called from the end of `kvm_mmu_faultin_pfn`" in text
    assert main(["hooks", "--json"]) == 0
    rows = {row["name"]: row for row in json.loads(capsys.readouterr().out)}
    assert rows["guestmem_host_init"]["firstresult"] is True
    assert "sw" in rows["guestmem_register_backends"]["backends"]
    assert rows["guestmem_fault"]["params"]["fault"] == "the fault (see `Fault`)."


def test_cli_backends_hooks(capsys: pytest.CaptureFixture[str]) -> None:
    with plugin(BackendPlugin("t-hookref-cli", (x86_type(1),), FaultOnly())):
        assert main(["backends", "--json", "--hooks"]) == 0
        rows = {row["name"]: row for row in json.loads(capsys.readouterr().out)}
        assert rows["t-hookref-cli"]["hooks"] == ["guestmem_register_backends", "guestmem_fault"]
        assert main(["backends", "--hooks"]) == 0
        assert "┃ hooks" in capsys.readouterr().out
    assert main(["backends", "--json"]) == 0
    assert "hooks" not in json.loads(capsys.readouterr().out)[0]


def test_docs_backends_md_holds_the_generated_reference() -> None:
    page = (ROOT / "docs" / "backends.md").read_text(encoding="utf-8")
    start, end = page.index(hookref.BEGIN), page.index(hookref.END) + len(hookref.END) + 1
    assert page[start:end] == hookref.render_markdown(), (
        "the hook reference of docs/backends.md is stale: replace it with `guestmem hooks --markdown`"
    )


def test_cli_markdown(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["hooks", "--markdown"]) == 0
    assert capsys.readouterr().out == hookref.render_markdown()
