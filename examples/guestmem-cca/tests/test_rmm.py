"""The RMM on its own: every granule, realm, REC, RTT and RIPAS transition and every illegal
one, with the RMI status TF-RMM answers (``runtime/rmi/granule.c``, ``realm.c``, ``rec.c``,
``rtt.c``; the RMM 1.0 semantics of ``lib/granule``).  Memory is a dict of pages."""

from __future__ import annotations

import pytest

from guestmem_cca.rmi import (
    GRANULE_SIZE,
    RMI_ERROR_INPUT,
    RMI_ERROR_REALM,
    RMI_ERROR_REC,
    RMI_ERROR_RTT,
    RMI_MEASURE_CONTENT,
    RMI_NO_MEASURE_CONTENT,
    RMI_SUCCESS,
    GranuleState,
    RealmState,
    Ripas,
    RttEntryState,
    pack_return_code,
    return_index,
    return_status,
)
from guestmem_cca.rmm import REC_AUX_COUNT, RealmParams, RmiResult, Rmm, SetRipas

G = GRANULE_SIZE
MiB, GiB = 1 << 20, 1 << 30
#: Granules the tests hand out: RD, root RTT, RTTs, RECs, data.
RD, ROOT, RTT2, RTT3, REC, AUX, DATA, DATA2, SRC = ((0x100000 + i) * G for i in range(9))
IPA = 0x40000000  # in the PAR of a 40-bit realm, 1 GiB aligned


class Memory:
    """Host memory as the RMM reaches it."""

    def __init__(self) -> None:
        self.pages: dict[int, bytearray] = {}

    def zero(self, pfn: int, n: int) -> None:
        for p in range(pfn, pfn + n):
            self.pages.pop(p, None)

    def write(self, pfn: int, offset: int, data: bytes) -> None:
        self.pages.setdefault(pfn, bytearray(G))[offset : offset + len(data)] = data

    def read(self, pfn: int, offset: int, n: int) -> bytes:
        page = self.pages.get(pfn)
        return bytes(n) if page is None else bytes(page[offset : offset + n])


@pytest.fixture
def mem() -> Memory:
    return Memory()


@pytest.fixture
def rmm(mem: Memory) -> Rmm:
    events: list[tuple[int, int, GranuleState, GranuleState]] = []
    machine = Rmm(zero=mem.zero, write=mem.write, read=mem.read, listener=lambda *e: events.append(e))
    machine.events = events  # type: ignore[attr-defined]
    return machine


def status(result: RmiResult) -> tuple[int, int]:
    return result.status, result.index


def delegate(rmm: Rmm, *addrs: int) -> None:
    for addr in addrs:
        assert rmm.granule_delegate(addr).ok


def new_realm(rmm: Rmm, vmid: int = 1) -> int:
    """A NEW realm: RD at RD, its root RTT at ROOT."""
    delegate(rmm, RD, ROOT)
    assert rmm.realm_create(RD, RealmParams(ipa_bits=40, rtt_base=ROOT, vmid=vmid)).ok
    return RD


def tables(rmm: Rmm, ipa: int = IPA) -> None:
    """The level-2 and level-3 tables for *ipa* (``realm_create_rtt_levels``)."""
    delegate(rmm, RTT2, RTT3)
    assert rmm.rtt_create(RD, RTT2, ipa // GiB * GiB, 2).ok
    assert rmm.rtt_create(RD, RTT3, ipa // (2 * MiB) * (2 * MiB), 3).ok


def ram(rmm: Rmm, base: int = IPA, top: int = IPA + 4 * G) -> None:
    assert rmm.rtt_init_ripas(RD, base, top).ok


# --- the return code -----------------------------------------------------------------------------------
def test_return_code_packs_status_and_level() -> None:
    """``pack_return_code`` / ``RMI_RETURN_STATUS`` / ``RMI_RETURN_INDEX``."""
    code = pack_return_code(RMI_ERROR_RTT, 2)
    assert code == 0x204 and (return_status(code), return_index(code)) == (RMI_ERROR_RTT, 2)
    assert RmiResult(RMI_ERROR_RTT, 2).code == code and str(RmiResult(RMI_ERROR_RTT, 2)) == "RMI_ERROR_RTT(2)"


# --- granule.c: smc_granule_delegate / smc_granule_undelegate ----------------------------------------------
def test_delegate_takes_an_ns_granule_and_zeroes_it(rmm: Rmm, mem: Memory) -> None:
    mem.write(DATA >> 12, 0, b"host bytes")
    assert rmm.granule_delegate(DATA) == RmiResult(RMI_SUCCESS)
    assert rmm.state(DATA) is GranuleState.DELEGATED and rmm.in_realm_pas(DATA)
    assert mem.read(DATA >> 12, 0, 10) == bytes(10)  # granule_memzero(g, SLOT_DELEGATED)
    assert rmm.events == [(DATA, 1, GranuleState.NS, GranuleState.DELEGATED)]  # type: ignore[attr-defined]


@pytest.mark.parametrize("addr", [DATA + 8, -G])
def test_delegate_of_an_unaligned_granule_is_error_input(rmm: Rmm, addr: int) -> None:
    assert status(rmm.granule_delegate(addr)) == (RMI_ERROR_INPUT, 0)


def test_delegate_twice_is_error_input(rmm: Rmm) -> None:
    """find_lock_granule(addr, GRANULE_STATE_NS) fails for a DELEGATED granule."""
    delegate(rmm, DATA)
    assert status(rmm.granule_delegate(DATA)) == (RMI_ERROR_INPUT, 0)


def test_undelegate_gives_the_granule_back_sanitised(rmm: Rmm, mem: Memory) -> None:
    """buffer_granule_sanitize before RMM_EL3 GTSI undelegate: no realm byte reaches NS."""
    delegate(rmm, DATA)
    mem.write(DATA >> 12, 0, b"realm bytes")
    assert rmm.granule_undelegate(DATA).ok
    assert rmm.state(DATA) is GranuleState.NS and not rmm.in_realm_pas(DATA)
    assert mem.read(DATA >> 12, 0, 11) == bytes(11)


def test_undelegate_of_anything_but_delegated_is_error_input(rmm: Rmm) -> None:
    """find_lock_granule(addr, GRANULE_STATE_DELEGATED): NS, RD, RTT, REC, REC_AUX, DATA refuse."""
    assert status(rmm.granule_undelegate(DATA)) == (RMI_ERROR_INPUT, 0)
    new_realm(rmm)
    tables(rmm)
    ram(rmm)
    delegate(rmm, REC, AUX, DATA)
    assert rmm.rec_create(RD, REC, (AUX,)).ok
    assert rmm.data_create_unknown(RD, DATA, IPA).ok
    for addr in (RD, ROOT, RTT2, RTT3, REC, AUX, DATA):
        assert status(rmm.granule_undelegate(addr)) == (RMI_ERROR_INPUT, 0), rmm.state(addr)


# --- realm.c: smc_realm_create / activate / destroy ---------------------------------------------------------
def test_realm_create_makes_the_rd_and_root_rtt(rmm: Rmm) -> None:
    rd = new_realm(rmm)
    realm = rmm.realms[rd]
    assert (rmm.state(RD), rmm.state(ROOT), realm.state) == (
        GranuleState.RD,
        GranuleState.RTT,
        RealmState.NEW,
    )
    assert realm.rim != bytes(32)


@pytest.mark.parametrize(
    ("why", "params", "delegated"),
    [
        ("rd not delegated", RealmParams(40, ROOT, 1), (ROOT,)),
        ("root not delegated", RealmParams(40, ROOT, 1), (RD,)),
        ("ipa width", RealmParams(60, ROOT, 1), (RD, ROOT)),
        ("root is the rd", RealmParams(40, RD, 1), (RD,)),
        ("root level", RealmParams(40, ROOT, 1, rtt_level_start=0), (RD, ROOT)),
    ],
)
def test_realm_create_refusals_are_error_input(
    rmm: Rmm, why: str, params: RealmParams, delegated: tuple[int, ...]
) -> None:
    delegate(rmm, *delegated)
    assert status(rmm.realm_create(RD, params)) == (RMI_ERROR_INPUT, 0), why
    assert rmm.state(RD) is not GranuleState.RD and not rmm.realms


def test_realm_create_refuses_a_vmid_in_use(rmm: Rmm) -> None:
    new_realm(rmm, vmid=7)
    delegate(rmm, RTT2, RTT3)
    assert status(rmm.realm_create(RTT2, RealmParams(40, RTT3, 7))) == (RMI_ERROR_INPUT, 0)


def test_realm_activate_new_to_active_once(rmm: Rmm) -> None:
    assert status(rmm.realm_activate(RD)) == (RMI_ERROR_INPUT, 0)  # no RD there
    new_realm(rmm)
    assert rmm.realm_activate(RD).ok and rmm.realms[RD].state is RealmState.ACTIVE
    assert status(rmm.realm_activate(RD)) == (RMI_ERROR_REALM, 0)


def test_realm_destroy_needs_no_rec_and_no_rtt_below_the_root(rmm: Rmm) -> None:
    new_realm(rmm)
    delegate(rmm, REC, AUX, RTT2)
    assert rmm.rec_create(RD, REC, (AUX,)).ok
    assert status(rmm.realm_destroy(RD)) == (RMI_ERROR_REALM, 0)
    assert rmm.rec_destroy(REC).ok
    assert rmm.rtt_create(RD, RTT2, IPA, 2).ok
    assert status(rmm.realm_destroy(RD)) == (RMI_ERROR_REALM, 0)
    assert rmm.rtt_destroy(RD, IPA, 2).ok
    assert rmm.realm_destroy(RD).ok
    assert (rmm.state(RD), rmm.state(ROOT)) == (GranuleState.DELEGATED, GranuleState.DELEGATED)
    assert not rmm.realms and not rmm.vmids
    assert status(rmm.realm_destroy(RD)) == (RMI_ERROR_INPUT, 0)


# --- rec.c: smc_rec_create / destroy / enter ----------------------------------------------------------------
def test_rec_create_while_new_with_its_aux_granules(rmm: Rmm) -> None:
    new_realm(rmm)
    delegate(rmm, REC, AUX)
    assert rmm.rec_aux_count(RD).x1 == REC_AUX_COUNT
    assert status(rmm.rec_create(RD, REC, ())) == (RMI_ERROR_INPUT, 0)  # aux count
    assert status(rmm.rec_create(RD, REC, (REC,))) == (RMI_ERROR_INPUT, 0)
    assert status(rmm.rec_create(RD, REC, (DATA,))) == (RMI_ERROR_INPUT, 0)  # aux not delegated
    assert rmm.rec_create(RD, REC, (AUX,)).ok
    assert (rmm.state(REC), rmm.state(AUX)) == (GranuleState.REC, GranuleState.REC_AUX)
    assert status(rmm.rec_create(RD, REC, (AUX,))) == (RMI_ERROR_INPUT, 0)  # REC no longer delegated
    assert rmm.rec_destroy(REC).ok
    assert (rmm.state(REC), rmm.state(AUX)) == (GranuleState.DELEGATED, GranuleState.DELEGATED)
    assert status(rmm.rec_destroy(REC)) == (RMI_ERROR_INPUT, 0)


def test_rec_create_after_activation_is_error_realm(rmm: Rmm) -> None:
    new_realm(rmm)
    rmm.realm_activate(RD)
    delegate(rmm, REC, AUX)
    assert status(rmm.rec_create(RD, REC, (AUX,))) == (RMI_ERROR_REALM, 0)
    assert rmm.state(REC) is GranuleState.DELEGATED


def test_rec_enter_needs_an_active_realm(rmm: Rmm) -> None:
    new_realm(rmm)
    delegate(rmm, REC, AUX)
    rmm.rec_create(RD, REC, (AUX,))
    assert status(rmm.rec_enter(REC)) == (RMI_ERROR_REALM, 0)
    rmm.realm_activate(RD)
    assert rmm.rec_enter(REC).ok
    rmm.system_off(RD)
    assert status(rmm.rec_enter(REC)) == (RMI_ERROR_REALM, 0)
    assert status(rmm.rec_enter(AUX)) == (RMI_ERROR_INPUT, 0)


# --- rtt.c: smc_rtt_create / smc_rtt_destroy / smc_rtt_read_entry -------------------------------------------
def test_rtt_create_walks_level_by_level(rmm: Rmm) -> None:
    new_realm(rmm)
    delegate(rmm, RTT2, RTT3)
    assert status(rmm.rtt_create(RD, RTT3, IPA, 3)) == (RMI_ERROR_RTT, 1)  # no level-2 table yet
    assert rmm.rtt_create(RD, RTT2, IPA, 2).ok
    assert status(rmm.rtt_create(RD, RTT3, IPA, 2)) == (RMI_ERROR_RTT, 1)  # s2tte_is_table(parent)
    assert rmm.rtt_create(RD, RTT3, IPA, 3).ok
    assert (rmm.state(RTT2), rmm.state(RTT3)) == (GranuleState.RTT, GranuleState.RTT)
    read = rmm.rtt_read_entry(RD, IPA, 2)
    assert (read.x1, read.x2) == (2, RttEntryState.TABLE)
    assert (rmm.rtt_read_entry(RD, IPA, 3).x1, rmm.rtt_read_entry(RD, IPA, 3).x2) == (
        3,
        RttEntryState.UNASSIGNED,
    )


@pytest.mark.parametrize(("ipa", "level"), [(IPA, 1), (IPA, 4), (IPA + G, 2), (IPA + G, 3), (1 << 40, 2)])
def test_rtt_create_outside_the_structure_is_error_input(rmm: Rmm, ipa: int, level: int) -> None:
    """validate_rtt_structure_cmds: below the root, aligned, inside the IPA space."""
    new_realm(rmm)
    delegate(rmm, RTT2)
    assert status(rmm.rtt_create(RD, RTT2, ipa, level)) == (RMI_ERROR_INPUT, 0)


def test_rtt_create_of_a_granule_not_delegated_is_error_input(rmm: Rmm) -> None:
    new_realm(rmm)
    assert status(rmm.rtt_create(RD, RTT2, IPA, 2)) == (RMI_ERROR_INPUT, 0)


def test_rtt_destroy_only_of_a_table_without_live_entries(rmm: Rmm) -> None:
    new_realm(rmm)
    assert status(rmm.rtt_destroy(RD, IPA, 2)) == (RMI_ERROR_RTT, 1)  # nothing there
    tables(rmm)
    ram(rmm)
    delegate(rmm, DATA)
    rmm.data_create_unknown(RD, DATA, IPA)
    assert status(rmm.rtt_destroy(RD, IPA, 2)) == (RMI_ERROR_RTT, 2)  # a child table
    assert status(rmm.rtt_destroy(RD, IPA, 3)) == (RMI_ERROR_RTT, 3)  # an ASSIGNED entry
    assert rmm.data_destroy(RD, IPA).ok
    result = rmm.rtt_destroy(RD, IPA, 3)
    assert result.ok and result.x1 == RTT3 and rmm.state(RTT3) is GranuleState.DELEGATED
    # The parent entry is UNASSIGNED_DESTROYED inside the PAR.
    assert rmm.realms[RD].entry(IPA + 5 * G) == (RttEntryState.UNASSIGNED, None, Ripas.DESTROYED)


# --- rtt.c: smc_rtt_init_ripas ------------------------------------------------------------------------------
def test_init_ripas_makes_empty_entries_ram_and_measures_them(rmm: Rmm) -> None:
    new_realm(rmm)
    tables(rmm)
    rim = rmm.realms[RD].rim
    result = rmm.rtt_init_ripas(RD, IPA, IPA + 3 * G)
    assert result.ok and result.x1 == IPA + 3 * G
    realm = rmm.realms[RD]
    assert [realm.entry(IPA + i * G)[2] for i in range(4)] == [Ripas.RAM] * 3 + [Ripas.EMPTY]
    assert realm.rim != rim


def test_init_ripas_works_at_the_level_the_walk_reaches(rmm: Rmm) -> None:
    """Without a level-3 table the entries are 2 MiB: an unaligned base is RMI_ERROR_RTT at
    the level reached, an aligned range stops where the table ends."""
    new_realm(rmm)
    assert status(rmm.rtt_init_ripas(RD, IPA, IPA + 2 * MiB)) == (RMI_ERROR_RTT, 1)  # 1 GiB entries
    delegate(rmm, RTT2)
    rmm.rtt_create(RD, RTT2, IPA, 2)
    assert status(rmm.rtt_init_ripas(RD, IPA + G, IPA + 2 * MiB)) == (RMI_ERROR_RTT, 2)
    result = rmm.rtt_init_ripas(RD, IPA + GiB - 2 * MiB, IPA + GiB + 2 * MiB)
    assert result.ok and result.x1 == IPA + GiB  # the end of the level-2 table


@pytest.mark.parametrize(
    ("base", "top"), [(IPA, IPA), (IPA + G, IPA), (IPA + 8, IPA + G), (1 << 39, (1 << 39) + G)]
)
def test_init_ripas_bad_ranges_are_error_input(rmm: Rmm, base: int, top: int) -> None:
    new_realm(rmm)
    tables(rmm)
    assert status(rmm.rtt_init_ripas(RD, base, top)) == (RMI_ERROR_INPUT, 0)


def test_init_ripas_is_for_new_realms_and_stops_at_assigned_entries(rmm: Rmm) -> None:
    new_realm(rmm)
    tables(rmm)
    ram(rmm, IPA, IPA + G)
    delegate(rmm, DATA)
    rmm.data_create_unknown(RD, DATA, IPA + G)
    result = rmm.rtt_init_ripas(RD, IPA, IPA + 4 * G)
    assert result.ok and result.x1 == IPA + G
    assert status(rmm.rtt_init_ripas(RD, IPA + G, IPA + 4 * G)) == (RMI_ERROR_RTT, 3)
    rmm.realm_activate(RD)
    assert status(rmm.rtt_init_ripas(RD, IPA + 2 * G, IPA + 4 * G)) == (RMI_ERROR_REALM, 0)


# --- rtt.c: data_create / smc_data_create_unknown / smc_data_destroy ----------------------------------------
def test_data_create_copies_and_measures_into_a_ram_entry(rmm: Rmm, mem: Memory) -> None:
    new_realm(rmm)
    tables(rmm)
    ram(rmm)
    delegate(rmm, DATA, DATA2)
    rim = rmm.realms[RD].rim
    assert rmm.data_create(RD, DATA, IPA, b"image".ljust(G, b"\0"), RMI_MEASURE_CONTENT).ok
    assert mem.read(DATA >> 12, 0, 5) == b"image" and rmm.state(DATA) is GranuleState.DATA
    assert rmm.realms[RD].entry(IPA) == (RttEntryState.ASSIGNED, DATA, Ripas.RAM)
    measured = rmm.realms[RD].rim
    assert measured != rim
    assert rmm.data_create(RD, DATA2, IPA + G, b"image".ljust(G, b"\0"), RMI_NO_MEASURE_CONTENT).ok
    assert rmm.realms[RD].rim not in (rim, measured)


def test_data_create_refusals_in_the_order_of_the_source(rmm: Rmm) -> None:
    new_realm(rmm)
    delegate(rmm, RTT2)
    rmm.rtt_create(RD, RTT2, IPA, 2)
    page = bytes(G)
    assert status(rmm.data_create(RD, DATA, IPA, page, 2)) == (RMI_ERROR_INPUT, 0)  # flags
    assert status(rmm.data_create(RD, DATA, IPA, page[:8], 0)) == (RMI_ERROR_INPUT, 0)  # not a page
    assert status(rmm.data_create(RD, DATA, IPA, page, 0)) == (RMI_ERROR_INPUT, 0)  # not delegated
    delegate(rmm, DATA)
    assert status(rmm.data_create(RD, DATA, 1 << 39, page, 0)) == (RMI_ERROR_INPUT, 0)  # outside the PAR
    assert status(rmm.data_create(RD, DATA, IPA + 8, page, 0)) == (RMI_ERROR_INPUT, 0)  # unaligned
    assert status(rmm.data_create(RD, DATA, IPA, page, 0)) == (RMI_ERROR_RTT, 2)  # no level-3 table
    delegate(rmm, RTT3)
    rmm.rtt_create(RD, RTT3, IPA, 3)
    assert status(rmm.data_create(RD, DATA, IPA, page, 0)) == (RMI_ERROR_RTT, 3)  # RIPAS EMPTY
    ram(rmm)
    rmm.realm_activate(RD)
    assert status(rmm.data_create(RD, DATA, IPA, page, 0)) == (RMI_ERROR_REALM, 0)  # not NEW
    assert rmm.state(DATA) is GranuleState.DELEGATED


def test_data_create_unknown_takes_any_unassigned_entry(rmm: Rmm) -> None:
    """Any UNASSIGNED entry, the realm NEW or ACTIVE; the entry becomes ASSIGNED RAM
    (``s2tte_create_assigned_ram``); an ASSIGNED one is RMI_ERROR_RTT(3)."""
    new_realm(rmm)
    tables(rmm)
    rmm.realm_activate(RD)
    delegate(rmm, DATA, DATA2)
    assert rmm.data_create_unknown(RD, DATA, IPA).ok  # RIPAS was EMPTY
    assert rmm.realms[RD].entry(IPA) == (RttEntryState.ASSIGNED, DATA, Ripas.RAM)
    assert status(rmm.data_create_unknown(RD, DATA2, IPA)) == (RMI_ERROR_RTT, 3)
    assert rmm.state(DATA2) is GranuleState.DELEGATED


def test_data_destroy_zeroes_the_page_and_leaves_the_ipa_destroyed(rmm: Rmm, mem: Memory) -> None:
    new_realm(rmm)
    tables(rmm)
    ram(rmm)
    delegate(rmm, DATA)
    rmm.data_create(RD, DATA, IPA, b"secret".ljust(G, b"\0"), 0)
    assert status(rmm.data_destroy(RD, IPA + G)) == (RMI_ERROR_RTT, 3)  # UNASSIGNED
    result = rmm.data_destroy(RD, IPA)
    assert result.ok and result.x1 == DATA
    assert rmm.state(DATA) is GranuleState.DELEGATED and mem.read(DATA >> 12, 0, 6) == bytes(6)
    assert rmm.realms[RD].entry(IPA) == (RttEntryState.UNASSIGNED, None, Ripas.DESTROYED)
    assert status(rmm.data_destroy(RD, IPA + 8)) == (RMI_ERROR_INPUT, 0)
    assert status(rmm.data_destroy(RD, 3 * GiB)) == (RMI_ERROR_RTT, 1)


# --- rtt.c: smc_rtt_set_ripas -------------------------------------------------------------------------------
@pytest.fixture
def running(rmm: Rmm) -> Rmm:
    """An ACTIVE realm with RAM at [IPA, IPA + 4 pages) and a REC."""
    new_realm(rmm)
    tables(rmm)
    ram(rmm)
    delegate(rmm, REC, AUX)
    rmm.rec_create(RD, REC, (AUX,))
    rmm.realm_activate(RD)
    return rmm


def test_set_ripas_follows_the_recs_request(running: Rmm) -> None:
    rec = running.realms[RD].recs[REC]
    assert status(running.rtt_set_ripas(RD, REC, IPA, IPA + G)) == (RMI_ERROR_INPUT, 0)  # no request
    rec.set_ripas = SetRipas(IPA, IPA + 2 * G, Ripas.EMPTY, True, IPA)
    assert status(running.rtt_set_ripas(RD, REC, IPA + G, IPA + 2 * G)) == (RMI_ERROR_INPUT, 0)  # not next
    assert status(running.rtt_set_ripas(RD, REC, IPA, IPA + 3 * G)) == (RMI_ERROR_INPUT, 0)  # past top
    assert status(running.rtt_set_ripas(RD, REC, IPA + G, IPA)) == (RMI_ERROR_INPUT, 0)  # top <= base
    result = running.rtt_set_ripas(RD, REC, IPA, IPA + 2 * G)
    assert result.ok and result.x1 == IPA + 2 * G and rec.set_ripas.addr == IPA + 2 * G
    assert running.realms[RD].entry(IPA)[2] is Ripas.EMPTY


def test_set_ripas_of_another_realms_rec_is_error_rec(running: Rmm) -> None:
    delegate(running, RTT2 + 16 * G, RTT3 + 16 * G, REC + 16 * G, AUX + 16 * G)
    other = RTT2 + 16 * G
    assert running.realm_create(other, RealmParams(40, RTT3 + 16 * G, 9)).ok
    assert running.rec_create(other, REC + 16 * G, (AUX + 16 * G,)).ok
    assert status(running.rtt_set_ripas(RD, REC + 16 * G, IPA, IPA + G)) == (RMI_ERROR_REC, 0)


def test_set_ripas_changes_destroyed_only_with_the_realms_permission(running: Rmm) -> None:
    delegate(running, DATA)
    running.data_create_unknown(RD, DATA, IPA)
    running.data_destroy(RD, IPA)  # the host took the page: DESTROYED
    rec = running.realms[RD].recs[REC]
    rec.set_ripas = SetRipas(IPA, IPA + G, Ripas.RAM, False, IPA)
    assert status(running.rtt_set_ripas(RD, REC, IPA, IPA + G)) == (RMI_ERROR_RTT, 3)
    assert running.realms[RD].entry(IPA)[2] is Ripas.DESTROYED
    rec.set_ripas = SetRipas(IPA, IPA + G, Ripas.RAM, True, IPA)
    assert running.rtt_set_ripas(RD, REC, IPA, IPA + G).ok
    assert running.realms[RD].entry(IPA)[2] is Ripas.RAM


def test_data_destroy_of_an_assigned_empty_entry_leaves_it_empty(running: Rmm) -> None:
    """update_ripas: ASSIGNED RAM -> ASSIGNED EMPTY; DATA_DESTROY of it: UNASSIGNED EMPTY."""
    delegate(running, DATA)
    running.data_create_unknown(RD, DATA, IPA)
    running.realms[RD].recs[REC].set_ripas = SetRipas(IPA, IPA + G, Ripas.EMPTY, False, IPA)
    assert running.rtt_set_ripas(RD, REC, IPA, IPA + G).ok
    realm = running.realms[RD]
    assert realm.entry(IPA) == (RttEntryState.ASSIGNED, DATA, Ripas.EMPTY)
    assert running.data_destroy(RD, IPA).ok
    assert realm.entry(IPA) == (RttEntryState.UNASSIGNED, None, Ripas.EMPTY)


# --- rtt.c: map_unmap_ns -----------------------------------------------------------------------------------
def test_unprotected_mappings_live_outside_the_par(running: Rmm) -> None:
    shared = IPA | (1 << 39)
    assert status(running.rtt_map_unprotected(RD, IPA, SRC)) == (RMI_ERROR_INPUT, 0)  # in the PAR
    assert status(running.rtt_map_unprotected(RD, shared, ROOT)) == (RMI_ERROR_INPUT, 0)  # not NS
    assert running.rtt_map_unprotected(RD, shared, SRC).ok
    assert status(running.rtt_map_unprotected(RD, shared, SRC)) == (RMI_ERROR_RTT, 3)
    assert running.rtt_unmap_unprotected(RD, shared).ok
    assert status(running.rtt_unmap_unprotected(RD, shared)) == (RMI_ERROR_RTT, 3)
