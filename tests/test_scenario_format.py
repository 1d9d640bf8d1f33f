"""Scenario files: reading TOML into steps, and errors naming file, line and field."""

from __future__ import annotations

import pathlib

import pytest

from guestmem.scenario import format as fmt
from guestmem.scenario.format import parse_data, parse_size, parse_span
from guestmem.serialize import ScenarioError, line_index, load_scenario, parse_scenario

GOOD = """
[scenario]
title = "a conversion"
cites = ["somewhere"]

[vm]
size = "4M"
vcpus = 2

[[steps]]
do = "guest.write"
gpa = "0x1000"
data = "secret"

[[steps]]
do = "guest.convert"
range = "0x1000+4K"
to = "shared"
expect = { ok = true }
expect_on.snp = { ok = true, counters = { psc_exits = 1 } }

[[steps]]
do = "vm.create_guest_memfd"
size = "1M"
flags = ["GUEST_MEMFD_FLAG_MMAP"]
as = "extra"

[[steps]]
do = "gmem.fallocate"
gmem = "extra"
range = [0, "4K"]
"""


def problems(text: str) -> list[tuple[int | None, str, str]]:
    with pytest.raises(ScenarioError) as exc:
        parse_scenario(text, "bad.toml")
    return exc.value.problems


def test_a_good_file_becomes_typed_steps() -> None:
    scenario = parse_scenario(GOOD, "dir/convert.toml")
    assert scenario.name == "convert" and scenario.path == "dir/convert.toml"
    assert scenario.vm.layout() == [(0, 4 << 20)] and scenario.vm.vcpus == 2
    first, write, convert, create, punch = scenario.steps
    assert isinstance(first, fmt.LaunchFinish)  # inserted before the first guest step
    assert isinstance(write, fmt.GuestWrite) and write.data == b"secret" and write.gpa == 0x1000
    assert (
        isinstance(convert, fmt.Convert)
        and convert.range == fmt.Span(0x1000, 4096)
        and convert.to == "shared"
    )
    assert convert.expect_on["snp"].counters == {"psc_exits": 1}
    assert (
        isinstance(create, fmt.CreateGmem)
        and create.as_ == "extra"
        and create.flags == ["GUEST_MEMFD_FLAG_MMAP"]
    )
    assert (
        isinstance(punch, fmt.Fallocate) and punch.range == fmt.Span(0, 4096) and punch.mode == "punch_hole"
    )
    assert convert.describe() == "guest.convert range=0x1000+4K to=shared"
    assert create.describe() == "vm.create_guest_memfd size=1M as=extra"


def test_an_explicit_launch_finish_is_kept_where_it_is() -> None:
    text = '[[steps]]\ndo = "launch.populate"\ngpa = 0\ndata = "x"\n[[steps]]\ndo = "launch.finish"\n'
    text += '[[steps]]\ndo = "guest.read"\ngpa = 0\nlength = 1\n'
    kinds = [s.do for s in parse_scenario(text).steps]
    assert kinds == ["launch.populate", "launch.finish", "guest.read"]


@pytest.mark.parametrize(
    ("text", "value"),
    [
        (4096, 4096),
        ("4K", 4096),
        ("2M", 2 << 20),
        ("64G", 64 << 30),
        ("0x1000", 4096),
        ("1_024", 1024),
        ("2MiB", 2 << 20),
    ],
)
def test_sizes(text: object, value: int) -> None:
    assert parse_size(text) == value


@pytest.mark.parametrize("text", ["4Q", "", "x", True, 1.5, None])
def test_bad_sizes(text: object) -> None:
    with pytest.raises(ValueError):
        parse_size(text)


def test_data_forms() -> None:
    assert parse_data("héllo") == "héllo".encode()
    assert parse_data({"hex": "00ff"}) == b"\x00\xff"
    assert parse_data({"fill": 0x90, "size": "4K"}) == b"\x90" * 4096
    assert parse_data({"text": "ab", "size": 5}) == b"ababa"
    for bad in ({"fill": 300, "size": 1}, {"hex": "zz"}, {"text": "a"}, 3):
        with pytest.raises(ValueError):
            parse_data(bad)


def test_span_forms() -> None:
    assert parse_span("2M+4K") == parse_span(["2M", 4096]) == parse_span({"start": "2M", "size": "4K"})
    for bad in ("2M", "2M+0", [1], {"start": 1}):
        with pytest.raises(ValueError):
            parse_span(bad)


def test_errors_name_file_line_and_field() -> None:
    text = (
        "[vm]\n"  # 1
        'size = "16Q"\n'  # 2
        "[[steps]]\n"  # 3
        'do = "guest.convrt"\n'  # 4
        "[[steps]]\n"  # 5
        'do = "guest.convert"\n'  # 6
        'range = "0x1000+4K"\n'  # 7
        'too = "shared"\n'  # 8
        "[[steps]]\n"  # 9
        'do = "guest.read"\n'  # 10
        "gpa = 1\n"  # 11
        "length = 1\n"  # 12
        "expect.okk = true\n"  # 13
    )
    found = problems(text)
    assert found == [
        (2, "vm.size", "not a size or address: '16Q' (write 4096, 0x1000, 4K, 2M or 64G)"),
        (4, "steps[0].do", "unknown step 'guest.convrt' (did you mean 'guest.convert'?)"),
        (5, "steps[1].to", "required field missing"),
        (8, "steps[1].too", "unknown field (did you mean 'to'?)"),
        (13, "steps[2].expect.okk", "unknown field (did you mean 'ok'?)"),
    ]
    with pytest.raises(ScenarioError) as exc:
        parse_scenario(text, "bad.toml")
    assert (
        str(exc.value).splitlines()[0]
        == "bad.toml:2: vm.size: not a size or address: '16Q' (write 4096, 0x1000, 4K, 2M or 64G)"
    )


def test_inline_tables_and_unknown_top_level_keys() -> None:
    text = '[scenario]\ntitel = "x"\n\n[[steps]]\ndo = "guest.read"\ngpa = 0\nlength = 1\n'
    text += 'expect = { dataa = "x" }\n'
    assert problems(text) == [
        (2, "scenario.titel", "unknown field (did you mean 'title'?)"),
        (8, "steps[0].expect.dataa", "unknown field (did you mean 'data'?)"),
    ]
    assert problems("[vmm]\nhandle_exits = 'always'\n")[0][:2] == (2, "vmm.handle_exits")


def test_semantic_checks_after_structuring() -> None:
    text = (
        "[host]\n"
        "policies = { memslots_pin = true }\n"  # 2
        "[[steps]]\n"
        'do = "close"\n'
        'object = "nothing"\n'  # 5
        "[[steps]]\n"  # 6
        'do = "guest.read"\n'
        "gpa = 0\n"
        "length = 1\n"
        'requires = ["telepathy"]\n'  # 10
        'expect = { errno = "EFOO" }\n'  # 11
        "[[steps]]\n"  # 12
        'do = "vcpu.access"\n'
        "gpa = 0\n"
        "[[steps]]\n"  # 15
        'do = "guest.read"\n'
        "gpa = 0\n"
        "length = 1\n"
        'expect = { exit = "memoryfault" }\n'  # 19
        'expect_on.gunyah = { exit = "PageFaultExit" }\n'  # 20: a backend's own exit
    )
    found = problems(text)
    assert [(line, field) for line, field, _ in found] == [
        (2, "host.policies.memslots_pin"),
        (5, "steps[0].object"),
        (10, "steps[1].requires"),
        (11, "steps[1].expect.errno"),
        (12, "steps[2]"),
        (19, "steps[3].expect.exit"),
    ]
    assert "no object named 'nothing'" in found[1][2]
    assert found[5][2].startswith("not an exit: 'memoryfault' (memory_fault, hypercall, mmio")


def test_toml_syntax_errors_have_their_line() -> None:
    assert problems("[vm]\nsize = \n")[0][0] == 2


def test_line_index_counts_array_tables() -> None:
    index = line_index("[a]\nx = 1\n[[s]]\ny = 2\n[[s]]\ny = 3\nz = { q = 1 }\n")
    assert index[("a", "x")] == 2 and index[("s", 0, "y")] == 4 and index[("s", 1, "y")] == 6
    assert index[("s", 1, "z", "q")] == 7


def test_load_scenario_reads_a_file(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "mine.toml"
    path.write_text(GOOD)
    assert load_scenario(str(path)).name == "mine"
    path.write_text("[vm]\nsize = 'x'\n")
    with pytest.raises(ScenarioError, match=f"{path}:2: vm.size"):
        load_scenario(str(path))
