"""Launch measurement: MRTD as the TDX module computes it through KVM_TDX_INIT_MEM_REGION
and FINALIZE, against :func:`guestmem_tdx.expected_mrtd` computed offline."""

from __future__ import annotations

from tdx_helpers import MIB, PAGE, make_td

from guestmem_tdx import MeasuredRegion, expected_mrtd

BIOS = bytes(range(256)) * 24  # 1.5 pages
KERNEL = b"\x0f\x05" * (PAGE // 2)


def _launch(regions: list[MeasuredRegion]) -> bytes:
    td = make_td()
    for r in regions:
        td.tdx.init_mem_region(td.vcpu, r.gpa, r.data, measure=r.measure)
    mrtd = td.tdx.finalize()
    td.close()
    return mrtd


def test_mrtd_is_what_a_verifier_computes() -> None:
    """PAGE.ADD (gpa) and MR.EXTEND (gpa + 256 B chunks) in order, frozen at FINALIZE."""
    regions = [
        MeasuredRegion(0, BIOS),
        MeasuredRegion(MIB, KERNEL),
        MeasuredRegion(2 * MIB, b"cfg", measure=False),
    ]
    assert _launch(regions) == expected_mrtd(regions)


def test_mrtd_changes_with_content_address_and_order() -> None:
    base = [MeasuredRegion(0, BIOS), MeasuredRegion(MIB, KERNEL)]
    reference = expected_mrtd(base)
    assert expected_mrtd([MeasuredRegion(0, BIOS), MeasuredRegion(MIB, KERNEL[:-1] + b"\x00")]) != reference
    assert expected_mrtd([MeasuredRegion(0, BIOS), MeasuredRegion(MIB + PAGE, KERNEL)]) != reference
    assert expected_mrtd(list(reversed(base))) != reference
    # an unmeasured page changes MRTD by its gpa only, whatever it holds
    unmeasured = [MeasuredRegion(0, BIOS, measure=False)]
    assert expected_mrtd(unmeasured) == expected_mrtd([MeasuredRegion(0, bytes(len(BIOS)), measure=False)])
    assert expected_mrtd(unmeasured) != expected_mrtd([MeasuredRegion(0, BIOS)])
    assert _launch(list(reversed(base))) == expected_mrtd(list(reversed(base))) != reference


def test_mrtd_is_frozen_at_finalize() -> None:
    """Before FINALIZE there is no MRTD; afterwards the TD's pages change, MRTD does not."""
    td = make_td(payload=BIOS)
    assert td.tdx.mrtd == b""
    mrtd = td.tdx.finalize()
    assert td.guest.accept(MIB) == 0
    td.guest.write(MIB, b"runtime data")
    assert td.tdx.mrtd == mrtd == expected_mrtd([MeasuredRegion(0, BIOS)])
    td.close()


def test_the_payload_is_in_the_td() -> None:
    """PAGE.ADD copied the source into the private pages: the TD reads it (MAPPED, no ACCEPT)."""
    td = make_td(payload=BIOS, finalize=True)
    assert td.guest.read(0, len(BIOS)) == BIOS
    assert td.guest.read(len(BIOS), 16) == bytes(16)
    td.close()
