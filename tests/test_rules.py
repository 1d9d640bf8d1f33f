"""The rule reference (rules.toml, docs/rules.md, ``guestmem rules``) covers what the code raises."""

from __future__ import annotations

import json
import pathlib
import re
import textwrap
from collections.abc import Iterable

import attrs
import pytest

import guestmem
from guestmem import rules
from guestmem.cli import main

ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGE = pathlib.Path(guestmem.__file__).resolve().parent
#: A rule ID of the spec as the code cites it in comments and docstrings (``S-14``, ``FA-1``).
CITED = re.compile(r"(?<![\w.-])(?:CAP|FA|PF|[CFMSBLAGHPE])-\d+\b")


def _undocumented(ids: Iterable[str]) -> list[str]:
    return sorted(rule_id for rule_id in ids if rules.lookup(rule_id) is None)


def test_every_rule_the_core_raises_is_documented() -> None:
    raised = rules.raised_rule_ids(PACKAGE)
    # The scan follows helpers with a rule parameter (G-2 via _memory_fault) and rule = "..."
    # assignments (M-4, host-mappability); the model and the conformance kit are both in it.
    assert len(raised) > 55, sorted(raised)
    assert {"B-5", "G-2", "G-5", "M-4", "host-mappability", "3.3", "CAP-9", "E-1", "P-5", "G-12"} <= set(
        raised
    )
    assert "" not in raised
    missing = {rule_id: raised[rule_id] for rule_id in _undocumented(raised)}
    assert not missing, f"rule IDs raised but not in rules.toml: {missing}"


def test_the_scan_reports_an_undocumented_rule(tmp_path: pathlib.Path) -> None:
    (tmp_path / "backend.py").write_text(
        textwrap.dedent(
            """
            from guestmem.errors import HostSigbus, KvmError, MemoryFault

            RULE = "Z-1"

            class RefusedError(KvmError):
                def __init__(self, err: int) -> None:
                    super().__init__(err, "Z-2", "refused")

            def fail(err: int, rule: str, why: str) -> KvmError:
                return KvmError(err, rule, why)

            def check(flag: bool) -> None:
                rule = "B-5"
                raise fail(22, "Z-3" if flag else "Z-4", "no such rule")

            def fault() -> None:
                raise MemoryFault(14, 0, 4096, 0, "Z-5", "why")

            def sigbus() -> None:
                raise HostSigbus(0x1000, rule="Z-6", why="why")

            def unnumbered() -> None:
                raise KvmError(9, "", "no rule decided this")
            """
        )
    )
    raised = rules.raised_rule_ids(tmp_path)
    assert set(raised) == {"B-5", "Z-1", "Z-2", "Z-3", "Z-4", "Z-5", "Z-6"}
    assert raised["Z-2"] == ["backend.py:8"]
    assert _undocumented(raised) == ["Z-1", "Z-2", "Z-3", "Z-4", "Z-5", "Z-6"]


def test_every_rule_the_code_and_docs_cite_is_documented() -> None:
    sources = [*PACKAGE.rglob("*.py"), ROOT / "README.md", *(ROOT / "docs").glob("*.md")]
    cited = {rule_id for path in sources for rule_id in CITED.findall(path.read_text(encoding="utf-8"))}
    assert len(cited) > 100
    assert _undocumented(cited) == []


def test_docs_rules_md_is_generated_from_rules_toml() -> None:
    doc = ROOT / "docs" / "rules.md"
    assert doc.read_text(encoding="utf-8") == rules.render_markdown(), (
        "docs/rules.md is stale: run `guestmem rules --markdown > docs/rules.md`"
    )


def test_every_rule_is_complete() -> None:
    all_rules = rules.all_rules()
    assert len(all_rules) == len({r.id for r in all_rules})
    for rule in all_rules:
        assert rule.id and rule.section, rule
        assert rule.condition.strip(), rule.id
        assert rule.kernel and all(re.fullmatch(r"[a-z_][a-z0-9_]*", name) for name in rule.kernel), rule.id
        assert all(rules.is_errno_name(name) for name in rule.errno), rule.id
    assert {name for r in all_rules for name in r.errno} >= {"EINVAL", "EHWPOISON", "EOPNOTSUPP", "EEXIST"}


def test_every_spec_group_is_there() -> None:
    ids = {r.id for r in rules.all_rules()}
    last_ids = ("CAP-9", "C-11", "F-4", "FA-11", "M-10", "S-16", "B-11", "L-9", "A-12", "G-13", "H-6")
    for last in (*last_ids, "P-5", "PF-4", "E-2"):
        prefix, count = last.rsplit("-", 1)
        assert {f"{prefix}-{n}" for n in range(1, int(count) + 1)} <= ids, prefix
    assert {f"3.{n}" for n in range(1, 7)} <= ids


def test_a_rule_validates_its_fields() -> None:
    with pytest.raises(ValueError, match="ENOTANERRNO"):
        rules.Rule("X-1", "s", "c", ["ENOTANERRNO"], ["f"])
    with pytest.raises(ValueError):
        rules.Rule("X-1", "s", "", [], ["f"])
    rule = rules.Rule("X-1", "s", "c", ["EINVAL"], ["f"])
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        rule.id = "X-2"  # type: ignore[misc]


def test_lookup_is_forgiving_about_case_and_brackets() -> None:
    rule = rules.lookup("B-5")
    assert rule is not None and rule.errno == ("EINVAL",) and rule.kernel == ("kvm_gmem_bind",)
    assert rules.lookup("b-5") is rule
    assert rules.lookup("[B-5]") is rule
    assert rules.lookup("B-55") is None
    assert "B-5" in rules.close_ids("B-55")


# --- guestmem rules ------------------------------------------------------------------------
def test_cli_prints_one_rule(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["rules", "B-5"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("B-5  (guest_memfd binding)")
    assert "EINVAL" in out and "kvm_gmem_bind" in out and "S-14" in out


def test_cli_unknown_rule_exits_2_with_a_hint(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["rules", "B-55"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.count("\n") == 1
    assert "B-55" in captured.err and "B-5" in captured.err


def test_cli_lists_every_rule(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["rules"]) == 0
    out = capsys.readouterr().out
    for rule in rules.all_rules():
        assert re.search(rf"^  {re.escape(rule.id)} ", out, re.M), rule.id


def test_cli_json(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["rules", "--json", "B-5", "S-14"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert [d["id"] for d in data] == ["B-5", "S-14"]
    assert data[1]["errno"] == ["EEXIST"] and data[1]["kernel"] == ["kvm_check_memslot_overlap"]
    assert main(["rules", "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out)) == len(rules.all_rules())


def test_cli_markdown(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["rules", "--markdown"]) == 0
    assert capsys.readouterr().out == rules.render_markdown()


def test_readme_rule_ids_reads_the_rules_table() -> None:
    readme = textwrap.dedent(
        """\
        # guestmem-x

        ## Rules

        Prose may cite `Z-9`.

        | rule | meaning |
        |---|---|
        | `Z-1` | one |
        | `Z-2` | two |

        ## Tests

        | `Z-3` | another table |
        """
    )
    assert rules.readme_rule_ids(readme) == {"Z-1", "Z-2"}
    assert rules.readme_rule_ids("# no rules section\n") == set()


def test_readme_rule_problems_compares_the_table_with_the_code(tmp_path: pathlib.Path) -> None:
    package = tmp_path / "guestmem_x"
    package.mkdir()
    (package / "policy.py").write_text(
        'RULE = "X-1"\n\ndef refuse() -> None:\n    raise KvmError(1, "X-2", "no")\n'
    )
    (tmp_path / "README.md").write_text(
        "# x\n\n## Rules\n\n| rule | meaning |\n|---|---|\n| `X-1` | one |\n| `X-3` | gone |\n"
    )
    assert rules.readme_rule_problems(package) == [
        "X-2: raised (policy.py:4) but not in the README's Rules table",
        "X-3: in the README's Rules table but never raised",
    ]


def test_an_error_points_to_its_rule() -> None:
    """The message of an error names its rule and the command that explains it."""
    import guestmem
    from guestmem import KvmError

    with guestmem.open("sw") as kvm, kvm.create_vm(1) as vm, pytest.raises(KvmError) as info:
        vm.set_memory_attributes(1, 4096, 0)
    assert str(info.value).endswith("(guestmem rules A-6)")
    assert info.value.explain().startswith("A-6: ")
    undocumented = KvmError(22, "XYZ-1", "made up")
    assert str(undocumented) == "[Errno 22] EINVAL: [XYZ-1] made up" and undocumented.explain() == ""


def test_errno_names_are_the_kernels_not_pythons_aliases() -> None:
    """Every errno a rule names prints as the rule names it: Python's table ends on
    EDEADLOCK for 35, the kernel's uAPI and rule 3.7 say EDEADLK."""
    import errno

    from guestmem.errors import errno_name

    named = {name for rule in rules.all_rules() for name in rule.errno}
    for name in named:
        number = getattr(errno, name, None)
        if number is not None:
            assert errno_name(number) == name, name
    assert errno_name(errno.EDEADLK) == "EDEADLK" and errno_name(errno.EOPNOTSUPP) == "EOPNOTSUPP"
