"""The Realm Management Monitor: granules, realms, their RTTs and RECs, and the RMI commands.

Modelled on TF-RMM (``runtime/rmi/granule.c``, ``rtt.c``, ``realm.c``, ``rec.c``; the
RMM 1.0 semantics of ``lib/granule``): each command checks its inputs in the order the
source does and answers an RMI return code (:mod:`guestmem_cca.rmi`); a refused command
changes nothing.  Usable on its own: memory is reached through the callables given to
:class:`Rmm` (the backend passes its host's), and every granule state change is reported
to ``listener`` (the backend turns them into ownership events).

Simplifications, each named where it applies: one root table (level 1) per realm, given
at REALM_CREATE; entries are 4 KiB pages, no block mappings (no RTT fold); unprotected
(shared) mappings are kept per page without their own tables; measurements hash the
descriptors with SHA-256 only.
"""

from __future__ import annotations

import hashlib
import struct
from collections import Counter
from collections.abc import Callable

import attrs

from guestmem.backend import RangeMap
from guestmem_cca.rmi import (
    GRANULE_SHIFT,
    GRANULE_SIZE,
    RMI_ERROR_INPUT,
    RMI_ERROR_REALM,
    RMI_ERROR_REC,
    RMI_ERROR_RTT,
    RMI_MEASURE_CONTENT,
    RMI_NO_MEASURE_CONTENT,
    RMI_SUCCESS,
    RTT_PAGE_LEVEL,
    RTT_START_LEVEL,
    STATUS_NAMES,
    GranuleState,
    RealmState,
    Ripas,
    RttEntryState,
    level_shift,
    map_size,
    pack_return_code,
)

#: Granule states in which the RMM holds a granule for a realm.
_REALM_PAS = frozenset(GranuleState) - {GranuleState.NS}
#: ``RMI_REC_AUX_COUNT`` of this RMM.
REC_AUX_COUNT = 1
_DIGEST = 32  # SHA-256


@attrs.frozen
class RmiResult:
    """What an RMI command returned: x0 (status and index) and the outputs x1, x2."""

    status: int
    index: int = 0
    x1: int = 0
    x2: int = 0

    @property
    def code(self) -> int:
        """x0 as the host reads it (``pack_return_code``)."""
        return pack_return_code(self.status, self.index)

    @property
    def ok(self) -> bool:
        """``RMI_SUCCESS``."""
        return self.status == RMI_SUCCESS

    def __str__(self) -> str:
        name = STATUS_NAMES.get(self.status, str(self.status))
        return f"{name}({self.index})" if self.status == RMI_ERROR_RTT else name


def _input() -> RmiResult:
    return RmiResult(RMI_ERROR_INPUT)


def _rtt(level: int) -> RmiResult:
    return RmiResult(RMI_ERROR_RTT, level)


OK = RmiResult(RMI_SUCCESS)


@attrs.frozen
class RealmParams:
    """``struct rmi_realm_params``: what the host gives REALM_CREATE."""

    #: ``s2sz``: IPA width in bits.
    ipa_bits: int
    #: The root RTT granule(s), ``rtt_base`` (addresses).
    rtt_base: int
    vmid: int
    #: ``rtt_level_start``.
    rtt_level_start: int = RTT_START_LEVEL
    rtt_num_start: int = 1


@attrs.define(eq=False)
class SetRipas:
    """A REC's outstanding RIPAS change (``rec->set_ripas``), from the realm's RSI call."""

    base: int
    top: int
    ripas: Ripas
    change_destroyed: bool
    #: How far the host has got (``set_ripas.addr``).
    addr: int


@attrs.define(eq=False)
class Rec:
    """A Realm Execution Context."""

    addr: int
    rd: int
    aux: tuple[int, ...]
    set_ripas: SetRipas | None = None


@attrs.define(eq=False)
class Realm:
    """A realm: its RD, state, RTTs, IPA states and RECs."""

    rd: int
    params: RealmParams
    state: RealmState = RealmState.NEW
    #: ``(level, ipa >> level_shift(level - 1))`` -> the RTT granule's address, below the root.
    tables: dict[tuple[int, int], int] = attrs.Factory(dict)
    #: IPA page -> RIPAS (absent: EMPTY).
    ripas: RangeMap[Ripas] = attrs.Factory(RangeMap)
    #: IPA page -> ``pa_page - ipa_page`` of the ASSIGNED entries.
    assigned: RangeMap[int] = attrs.Factory(RangeMap)
    #: Unprotected IPA page -> ``pa_page - ipa_page`` (ASSIGNED_NS entries).
    unprotected: RangeMap[int] = attrs.Factory(RangeMap)
    recs: dict[int, Rec] = attrs.Factory(dict)
    #: The Realm Initial Measurement.
    rim: bytes = bytes(_DIGEST)

    @property
    def ipa_size(self) -> int:
        """``realm_ipa_size``."""
        return 1 << self.params.ipa_bits

    def in_par(self, ipa: int) -> bool:
        """``addr_in_par``: *ipa* is in the Protected Address Range (the lower half)."""
        return ipa < self.ipa_size // 2

    def last_level(self, ipa: int, target: int = RTT_PAGE_LEVEL) -> int:
        """``rtt_walk_lock_unlock``: the level of the table the walk towards *target* ends in."""
        level = RTT_START_LEVEL
        while level < target and (level + 1, ipa >> level_shift(level)) in self.tables:
            level += 1
        return level

    def entry(self, ipa: int) -> tuple[RttEntryState, int | None, Ripas]:
        """State, PA and RIPAS of the 4 KiB entry at *ipa*."""
        page = ipa >> GRANULE_SHIFT
        delta = self.assigned.get(page)
        ripas = self.ripas.get(page) or Ripas.EMPTY
        if delta is None:
            return RttEntryState.UNASSIGNED, None, ripas
        return RttEntryState.ASSIGNED, (page + delta) << GRANULE_SHIFT, ripas

    def live(self, level: int, ipa: int) -> int:
        """The RTT's refcount: its ASSIGNED entries (level 3) or its child tables (level 2)."""
        base = ipa >> level_shift(level - 1) << level_shift(level - 1)
        if level == RTT_PAGE_LEVEL:
            pages = map_size(level - 1) >> GRANULE_SHIFT
            first = base >> GRANULE_SHIFT
            return sum(e - s for s, e, _ in self.assigned.items(first, first + pages))
        return sum(
            1 for (lv, idx) in self.tables if lv == level + 1 and idx >> 9 == base >> level_shift(level - 1)
        )


def _measure(rim: bytes, kind: int, *fields: int, content: bytes = b"") -> bytes:
    """``measurement_hash_compute`` of a descriptor (type, its fields, the RIM so far)."""
    body = struct.pack(f"<B{len(fields)}Q", kind, *fields) + rim + content
    return hashlib.sha256(body).digest()


_MEASURE_DATA, _MEASURE_RIPAS, _MEASURE_REALM = 0, 2, 3


class Rmm:
    """The RMM of one machine.

    *zero* clears whole granules, *write* stores bytes in one, *read* loads one; *listener*
    hears ``(address, count, old, new)`` for every change of granule states.
    """

    def __init__(
        self,
        *,
        zero: Callable[[int, int], None],
        write: Callable[[int, int, bytes], None],
        read: Callable[[int, int, int], bytes],
        listener: Callable[[int, int, GranuleState, GranuleState], None] | None = None,
    ) -> None:
        self._zero = zero
        self._write = write
        self._read = read
        self.listener = listener
        #: Granule page -> state (absent: NS).
        self.granules: RangeMap[GranuleState] = RangeMap()
        #: Realms by RD address.
        self.realms: dict[int, Realm] = {}
        self.vmids: set[int] = set()
        #: RMI commands run, by name, and their failures.
        self.calls: Counter[str] = Counter()

    # --- granules -----------------------------------------------------------------------
    def state(self, addr: int) -> GranuleState:
        """The state of the granule at *addr*."""
        return self.granules.get(addr >> GRANULE_SHIFT) or GranuleState.NS

    def _set(self, addr: int, new: GranuleState, count: int = 1) -> None:
        first = addr >> GRANULE_SHIFT
        old = self.state(addr)
        self.granules.set(first, first + count, None if new is GranuleState.NS else new)
        if self.listener is not None and old is not new:
            self.listener(addr, count, old, new)

    def _is(self, addr: int, state: GranuleState) -> bool:
        """``find_lock_granule(addr, state)``: an aligned granule in *state*."""
        return addr % GRANULE_SIZE == 0 and addr >= 0 and self.state(addr) is state

    def _scrub(self, addr: int) -> None:
        self._zero(addr >> GRANULE_SHIFT, 1)

    def _give_back(self, addr: int) -> None:
        """A granule the RMM used goes back to DELEGATED, zeroed (``granule_memzero``)."""
        self._scrub(addr)
        self._set(addr, GranuleState.DELEGATED)

    def _rec_realm(self, rec: int) -> Realm | None:
        """The realm of the REC at *rec*, if *rec* holds one."""
        if not self._is(rec, GranuleState.REC):
            return None
        return next(r for r in self.realms.values() if rec in r.recs)

    def granule_delegate(self, addr: int) -> RmiResult:
        """``smc_granule_delegate``: NS -> DELEGATED (the GPT gives it to the Realm PAS), zeroed."""
        self.calls["granule_delegate"] += 1
        if not self._is(addr, GranuleState.NS):
            return _input()
        self._set(addr, GranuleState.DELEGATED)
        self._scrub(addr)  # granule_memzero(g, SLOT_DELEGATED)
        return OK

    def granule_undelegate(self, addr: int) -> RmiResult:
        """``smc_granule_undelegate``: DELEGATED -> NS, sanitised on the way
        (``buffer_granule_sanitize``, then DC CIPAPA)."""
        self.calls["granule_undelegate"] += 1
        if not self._is(addr, GranuleState.DELEGATED):
            return _input()
        self._scrub(addr)
        self._set(addr, GranuleState.NS)
        return OK

    # --- realms ------------------------------------------------------------------------------
    def realm(self, rd: int) -> Realm | None:
        """The realm whose RD is at *rd*, if *rd* holds one."""
        return self.realms.get(rd) if self._is(rd, GranuleState.RD) else None

    def realm_create(self, rd: int, params: RealmParams) -> RmiResult:
        """``smc_realm_create``: the RD and its root RTT, the realm NEW, its RIM started."""
        self.calls["realm_create"] += 1
        if not self._is(rd, GranuleState.DELEGATED):
            return _input()
        roots = [params.rtt_base + i * GRANULE_SIZE for i in range(params.rtt_num_start)]
        if (
            not 32 <= params.ipa_bits <= 48
            or params.rtt_level_start != RTT_START_LEVEL
            or params.rtt_num_start != 1
            or params.vmid in self.vmids
            or not all(self._is(root, GranuleState.DELEGATED) for root in roots)
            or rd in roots
        ):
            return _input()
        realm = Realm(rd, params)
        realm.rim = _measure(bytes(_DIGEST), _MEASURE_REALM, params.ipa_bits, params.vmid)
        self.realms[rd] = realm
        self.vmids.add(params.vmid)
        self._set(rd, GranuleState.RD)
        for root in roots:
            self._set(root, GranuleState.RTT)
        return OK

    def realm_activate(self, rd: int) -> RmiResult:
        """``smc_realm_activate``: NEW -> ACTIVE; RECs may run from now on."""
        self.calls["realm_activate"] += 1
        realm = self.realm(rd)
        if realm is None:
            return _input()
        if realm.state is not RealmState.NEW:
            return RmiResult(RMI_ERROR_REALM)
        realm.state = RealmState.ACTIVE
        return OK

    def realm_destroy(self, rd: int) -> RmiResult:
        """``smc_realm_destroy``: only without RECs and RTTs below the root; the RD and the
        root RTT become DELEGATED again."""
        self.calls["realm_destroy"] += 1
        realm = self.realm(rd)
        if realm is None:
            return _input()
        if realm.recs or realm.tables:
            return RmiResult(RMI_ERROR_REALM)
        del self.realms[rd]
        self.vmids.discard(realm.params.vmid)
        self._give_back(rd)
        self._give_back(realm.params.rtt_base)
        return OK

    def system_off(self, rd: int) -> None:
        """The realm called PSCI SYSTEM_OFF: its RECs never run again."""
        realm = self.realms[rd]
        realm.state = RealmState.SYSTEM_OFF

    # --- RECs ----------------------------------------------------------------------------------
    def rec_aux_count(self, rd: int) -> RmiResult:
        """``smc_rec_aux_count``: x1 is how many auxiliary granules a REC needs."""
        self.calls["rec_aux_count"] += 1
        return _input() if self.realm(rd) is None else RmiResult(RMI_SUCCESS, x1=REC_AUX_COUNT)

    def rec_create(self, rd: int, rec: int, aux: tuple[int, ...]) -> RmiResult:
        """``smc_rec_create``: only while the realm is NEW."""
        self.calls["rec_create"] += 1
        realm = self.realm(rd)
        if realm is None or not self._is(rec, GranuleState.DELEGATED):
            return _input()
        if len(aux) != REC_AUX_COUNT or len(set(aux)) != len(aux) or rec in aux:
            return _input()
        if not all(self._is(a, GranuleState.DELEGATED) for a in aux):
            return _input()
        if realm.state is not RealmState.NEW:
            return RmiResult(RMI_ERROR_REALM)
        realm.recs[rec] = Rec(rec, rd, aux)
        self._set(rec, GranuleState.REC)
        for a in aux:
            self._set(a, GranuleState.REC_AUX)
        return OK

    def rec_destroy(self, rec: int) -> RmiResult:
        """``smc_rec_destroy``: the REC and its auxiliary granules back to DELEGATED."""
        self.calls["rec_destroy"] += 1
        owner = self._rec_realm(rec)
        if owner is None:
            return _input()
        found = owner.recs.pop(rec)
        for addr in (rec, *found.aux):
            self._give_back(addr)
        return OK

    def rec_enter(self, rec: int) -> RmiResult:
        """``smc_rec_enter``'s checks: a REC of an ACTIVE realm."""
        self.calls["rec_enter"] += 1
        owner = self._rec_realm(rec)
        if owner is None:
            return _input()
        if owner.state is not RealmState.ACTIVE:
            return RmiResult(RMI_ERROR_REALM)
        return OK

    # --- RTTs ----------------------------------------------------------------------------------
    @staticmethod
    def _structure_ok(realm: Realm, ipa: int, level: int) -> bool:
        """``validate_rtt_structure_cmds``: below the root, aligned to the table's range."""
        if not RTT_START_LEVEL < level <= RTT_PAGE_LEVEL:
            return False
        return 0 <= ipa < realm.ipa_size and ipa % map_size(level - 1) == 0

    def rtt_create(self, rd: int, rtt: int, ipa: int, level: int) -> RmiResult:
        """``smc_rtt_create``: a table of *level* for the range its parent entry maps."""
        self.calls["rtt_create"] += 1
        realm = self.realm(rd)
        if realm is None or not self._is(rtt, GranuleState.DELEGATED):
            return _input()
        if not self._structure_ok(realm, ipa, level):
            return _input()
        reached = realm.last_level(ipa, level - 1)
        if reached != level - 1:
            return _rtt(reached)
        key = (level, ipa >> level_shift(level - 1))
        if key in realm.tables:  # s2tte_is_table(parent_s2tte)
            return _rtt(level - 1)
        realm.tables[key] = rtt
        self._set(rtt, GranuleState.RTT)
        return OK

    def rtt_destroy(self, rd: int, ipa: int, level: int) -> RmiResult:
        """``smc_rtt_destroy``: a table with no live entry goes back to DELEGATED (x1 its
        address); the parent entry becomes UNASSIGNED, DESTROYED inside the PAR."""
        self.calls["rtt_destroy"] += 1
        realm = self.realm(rd)
        if realm is None or not self._structure_ok(realm, ipa, level):
            return _input()
        key = (level, ipa >> level_shift(level - 1))
        if key not in realm.tables:
            return _rtt(realm.last_level(ipa, level - 1))
        if realm.live(level, ipa):
            return _rtt(level)
        addr = realm.tables.pop(key)
        if realm.in_par(ipa):
            first = ipa >> GRANULE_SHIFT
            realm.ripas.set(first, first + (map_size(level - 1) >> GRANULE_SHIFT), Ripas.DESTROYED)
        self._give_back(addr)
        return RmiResult(RMI_SUCCESS, x1=addr)

    def rtt_read_entry(self, rd: int, ipa: int, level: int) -> RmiResult:
        """``smc_rtt_read_entry``: x1 the level the walk towards *level* reached, x2 the state
        of the entry there (TABLE where a deeper table hangs from it)."""
        self.calls["rtt_read_entry"] += 1
        realm = self.realm(rd)
        if realm is None or not RTT_START_LEVEL <= level <= RTT_PAGE_LEVEL or not 0 <= ipa < realm.ipa_size:
            return _input()
        reached = realm.last_level(ipa, level)
        if reached < RTT_PAGE_LEVEL and (reached + 1, ipa >> level_shift(reached)) in realm.tables:
            state = RttEntryState.TABLE
        elif reached == RTT_PAGE_LEVEL:
            state = realm.entry(ipa)[0]
        else:
            state = RttEntryState.UNASSIGNED
        return RmiResult(RMI_SUCCESS, x1=reached, x2=state)

    def _ripas_walk(self, realm: Realm, base: int) -> tuple[int, int] | RmiResult:
        """Walk to the deepest level at *base*: ``(level, entry size)``, or
        RMI_ERROR_RTT where the entry there covers memory below *base*."""
        level = realm.last_level(base)
        size = map_size(level)
        if base % size:
            return _rtt(level)
        return level, size

    def rtt_init_ripas(self, rd: int, base: int, top: int) -> RmiResult:
        """``smc_rtt_init_ripas``: UNASSIGNED EMPTY entries of ``[base, top)`` -> RAM, each
        measured into the RIM, up to the end of the table the walk reached; x1 is how far it
        got.  NEW realms only."""
        self.calls["rtt_init_ripas"] += 1
        if top <= base:
            return _input()
        realm = self.realm(rd)
        if realm is None:
            return _input()
        aligned = base % GRANULE_SIZE == 0 and top % GRANULE_SIZE == 0 and top <= realm.ipa_size
        if not aligned or not realm.in_par(base) or not realm.in_par(top - GRANULE_SIZE):
            return _input()
        if realm.state is not RealmState.NEW:
            return RmiResult(RMI_ERROR_REALM)
        walked = self._ripas_walk(realm, base)
        if isinstance(walked, RmiResult):
            return walked
        level, size = walked
        addr, table_end = base, (base // map_size(level - 1) + 1) * map_size(level - 1)
        while addr < table_end and addr + size <= top:
            first, pages = addr >> GRANULE_SHIFT, size >> GRANULE_SHIFT
            if realm.assigned.overlaps(first, first + pages):
                break
            empty = realm.ripas.covers(first, first + pages, None)
            if not empty and not realm.ripas.covers(first, first + pages, Ripas.RAM):
                break
            realm.ripas.set(first, first + pages, Ripas.RAM)
            realm.rim = _measure(realm.rim, _MEASURE_RIPAS, addr, addr + size)
            addr += size
        if addr == base:
            return _rtt(level)
        return RmiResult(RMI_SUCCESS, x1=addr)

    def rtt_set_ripas(self, rd: int, rec: int, base: int, top: int) -> RmiResult:
        """``smc_rtt_set_ripas``: carry out the REC's RIPAS change over the next chunk of its
        range (``update_ripas`` per entry; a DESTROYED entry only with the realm's
        permission); x1 is how far it got, and the REC remembers it."""
        self.calls["rtt_set_ripas"] += 1
        if top <= base:
            return _input()
        realm = self.realm(rd)
        if realm is None or not self._is(rec, GranuleState.REC):
            return _input()
        found = realm.recs.get(rec)
        if found is None:
            return RmiResult(RMI_ERROR_REC)
        request = found.set_ripas
        if request is None or base != request.addr or top > request.top:
            return _input()
        walked = self._ripas_walk(realm, base)
        if isinstance(walked, RmiResult):
            return walked
        level, size = walked
        addr, table_end = base, (base // map_size(level - 1) + 1) * map_size(level - 1)
        while addr < table_end and addr + size <= top:
            if not self._update_ripas(realm, addr, size, request):
                break
            addr += size
        if addr == base:
            return _rtt(level)
        request.addr = addr
        return RmiResult(RMI_SUCCESS, x1=addr)

    def _update_ripas(self, realm: Realm, addr: int, size: int, request: SetRipas) -> bool:
        """``update_ripas`` of one entry; False where it must stop (a DESTROYED entry the
        realm did not allow to change)."""
        first, pages = addr >> GRANULE_SHIFT, size >> GRANULE_SHIFT
        destroyed = realm.ripas.overlaps(first, first + pages) and any(
            v is Ripas.DESTROYED for _, _, v in realm.ripas.items(first, first + pages)
        )
        if destroyed and not request.change_destroyed:
            return False
        realm.ripas.set(first, first + pages, None if request.ripas is Ripas.EMPTY else request.ripas)
        return True

    # --- data ------------------------------------------------------------------------------------
    def _data_checks(self, rd: int, data: int, ipa: int) -> tuple[Realm, int] | RmiResult:
        """``data_create``'s common checks, in the source's order; ``(realm, ipa page)``."""
        realm = self.realm(rd)
        if realm is None or not self._is(data, GranuleState.DELEGATED):
            return _input()
        if not realm.in_par(ipa) or ipa % GRANULE_SIZE or ipa < 0:  # validate_data_create_unknown
            return _input()
        return realm, ipa >> GRANULE_SHIFT

    def data_create(self, rd: int, data: int, ipa: int, src: bytes, flags: int) -> RmiResult:
        """``smc_data_create``: a DELEGATED granule becomes the realm's page at *ipa* with the
        contents of *src* (an NS granule), measured with ``RMI_MEASURE_CONTENT``.  NEW
        realms only, into an UNASSIGNED RAM entry."""
        self.calls["data_create"] += 1
        if flags not in (RMI_NO_MEASURE_CONTENT, RMI_MEASURE_CONTENT) or len(src) != GRANULE_SIZE:
            return _input()
        checked = self._data_checks(rd, data, ipa)
        if isinstance(checked, RmiResult):
            return checked
        realm, page = checked
        if realm.state is not RealmState.NEW:  # validate_data_create
            return RmiResult(RMI_ERROR_REALM)
        level = realm.last_level(ipa)
        if level != RTT_PAGE_LEVEL:
            return _rtt(level)
        state, _, ripas = realm.entry(ipa)
        if state is not RttEntryState.UNASSIGNED or ripas is not Ripas.RAM:  # s2tte_is_unassigned_ram
            return _rtt(RTT_PAGE_LEVEL)
        self._write(data >> GRANULE_SHIFT, 0, src)
        content = hashlib.sha256(src).digest() if flags == RMI_MEASURE_CONTENT else b""
        realm.rim = _measure(realm.rim, _MEASURE_DATA, ipa, flags, content=content)
        self._assign(realm, page, data)
        return OK

    def data_create_unknown(self, rd: int, data: int, ipa: int) -> RmiResult:
        """``smc_data_create_unknown``: a DELEGATED granule becomes the realm's page at *ipa*,
        contents unknown to the realm (zero), into any UNASSIGNED entry; the entry becomes
        ASSIGNED RAM (``s2tte_create_assigned_ram``)."""
        self.calls["data_create_unknown"] += 1
        checked = self._data_checks(rd, data, ipa)
        if isinstance(checked, RmiResult):
            return checked
        realm, page = checked
        level = realm.last_level(ipa)
        if level != RTT_PAGE_LEVEL:
            return _rtt(level)
        if realm.entry(ipa)[0] is not RttEntryState.UNASSIGNED:
            return _rtt(RTT_PAGE_LEVEL)
        self._assign(realm, page, data)
        return OK

    def _assign(self, realm: Realm, page: int, data: int) -> None:
        realm.assigned.set(page, page + 1, (data >> GRANULE_SHIFT) - page)
        realm.ripas.set(page, page + 1, Ripas.RAM)
        self._set(data, GranuleState.DATA)

    def data_destroy(self, rd: int, ipa: int) -> RmiResult:
        """``smc_data_destroy``: the page at *ipa* leaves the realm zeroed, DATA ->
        DELEGATED (x1 its address); the entry becomes UNASSIGNED, DESTROYED if it was RAM
        (the realm must accept it again), EMPTY if it was EMPTY."""
        self.calls["data_destroy"] += 1
        realm = self.realm(rd)
        if realm is None or ipa % GRANULE_SIZE or not 0 <= ipa < realm.ipa_size:
            return _input()
        level = realm.last_level(ipa)
        if level != RTT_PAGE_LEVEL:
            return _rtt(level)
        state, addr, ripas = realm.entry(ipa)
        if state is not RttEntryState.ASSIGNED or addr is None:
            return _rtt(RTT_PAGE_LEVEL)
        page = ipa >> GRANULE_SHIFT
        realm.assigned.erase(page, page + 1)
        realm.ripas.set(page, page + 1, Ripas.DESTROYED if ripas is Ripas.RAM else None)
        self._give_back(addr)  # granule_memzero(g_data, SLOT_DELEGATED)
        return RmiResult(RMI_SUCCESS, x1=addr)

    # --- unprotected (shared) mappings -------------------------------------------------------------
    def rtt_map_unprotected(self, rd: int, ipa: int, pa: int) -> RmiResult:
        """``smc_rtt_map_unprotected`` of a 4 KiB NS page at an unprotected *ipa* (outside the
        PAR); the entry must be UNASSIGNED_NS.  (Without its own tables: a simplification.)"""
        self.calls["rtt_map_unprotected"] += 1
        realm = self.realm(rd)
        if realm is None or ipa % GRANULE_SIZE or pa % GRANULE_SIZE or not 0 <= ipa < realm.ipa_size:
            return _input()
        if realm.in_par(ipa) or self.state(pa) is not GranuleState.NS:  # host_ns_s2tte_is_valid
            return _input()
        page = ipa >> GRANULE_SHIFT
        if realm.unprotected.get(page) is not None:
            return _rtt(RTT_PAGE_LEVEL)
        realm.unprotected.set(page, page + 1, (pa >> GRANULE_SHIFT) - page)
        return OK

    def rtt_unmap_unprotected(self, rd: int, ipa: int) -> RmiResult:
        """``smc_rtt_unmap_unprotected``: the ASSIGNED_NS entry at *ipa* goes."""
        self.calls["rtt_unmap_unprotected"] += 1
        realm = self.realm(rd)
        if realm is None or ipa % GRANULE_SIZE or not 0 <= ipa < realm.ipa_size or realm.in_par(ipa):
            return _input()
        page = ipa >> GRANULE_SHIFT
        if realm.unprotected.get(page) is None:
            return _rtt(RTT_PAGE_LEVEL)
        realm.unprotected.erase(page, page + 1)
        return OK

    # --- what the host may touch -------------------------------------------------------------------
    def in_realm_pas(self, addr: int) -> bool:
        """The GPT gives the granule at *addr* to the Realm PAS: a host access faults (GPF)."""
        return self.state(addr) in _REALM_PAS
