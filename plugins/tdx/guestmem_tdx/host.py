"""Host-wide TDX state: the TDX module, the TDX KeyID pool, packages and memory integrity.

One :class:`TdxHost` per ``guestmem.open("tdx")`` (``guestmem_host_init``); it is
``host.arch`` of that host.  Everything here belongs to the machine, not to a VM: every
TD on the host shares the module (PAMT, KOT), the KeyIDs and the packages.

The KeyID pool is the host kernel's (``arch/x86/virt/vmx/tdx/tdx.c``:
``tdx_guest_keyid_alloc`` on the IDA ``tdx_guest_keyid_pool`` over the TDX private KeyID
range that ``record_keyid_partitioning`` read from ``IA32_MKTME_KEYID_PARTITIONING``).
"""

from __future__ import annotations

import errno
from collections.abc import Iterator
from typing import Any, Final

import attrs

from guestmem import uapi
from guestmem.backend import HostView, Owner, RangeMap, VmView, view
from guestmem.errors import KvmError
from guestmem_tdx.abi import (
    KVM_TDX_CPUID_NO_SUBLEAF,
    TDX_TD_ATTR_DEBUG,
    TDX_TD_ATTR_PERFMON,
    TDX_TD_ATTR_PKS,
    TDX_TD_ATTR_SEPT_VE_DISABLE,
    XFEATURE_MASK_AVX512,
    XFEATURE_MASK_FPSSE,
    XFEATURE_MASK_PKRU,
    XFEATURE_MASK_YMM,
)
from guestmem_tdx.module import Td, TdxModule
from guestmem_tdx.sept import PamtEntry, SeptState, pamt_owner

PAGE_SIZE: Final = uapi.PAGE_SIZE
#: Bytes per cache line: the unit of TDX memory integrity (and of poison).
CACHE_LINE: Final = 64
LINES_PER_PAGE: Final = PAGE_SIZE // CACHE_LINE
#: Ownership-table names in events: S-EPT leaves (by gfn), S-EPT page-table entries (by
#: the first gfn they cover), PAMT (by pfn).
SEPT_TABLE: Final = "sept"
SEPT_NL_TABLE: Final = "sept.nl"
PAMT_TABLE: Final = "pamt"


@attrs.frozen
class TdxSysInfo:
    """What KVM reads of the TDX module at load (``tdx_get_sysinfo``) and of the CPU.

    The defaults are this model's, chosen to look like a TDX 1.5 module on a two-socket
    Sapphire Rapids host; the TDCS/TDVPS sizes are the module's own minimums.
    """

    attributes_fixed0: int = (
        TDX_TD_ATTR_DEBUG | TDX_TD_ATTR_SEPT_VE_DISABLE | TDX_TD_ATTR_PKS | TDX_TD_ATTR_PERFMON
    )
    attributes_fixed1: int = 0
    xfam_fixed0: int = 0x0006DBE7
    xfam_fixed1: int = XFEATURE_MASK_FPSSE
    #: ``kvm_caps.supported_xcr0`` / ``supported_xss`` of the host.
    supported_xcr0: int = XFEATURE_MASK_FPSSE | XFEATURE_MASK_YMM | XFEATURE_MASK_AVX512 | XFEATURE_MASK_PKRU
    supported_xss: int = 0
    #: ``td_conf.cpuid_config_leaves``: the CPUID leaves (and subleaves) a TD may configure.
    cpuid_config: tuple[tuple[int, int], ...] = (
        (0x1, KVM_TDX_CPUID_NO_SUBLEAF),
        (0x7, 0),
        (0xD, 0),
        (0xD, 1),
        (0x80000008, KVM_TDX_CPUID_NO_SUBLEAF),
    )
    #: ``cpu_has_vmx_ept_5levels``: GPAW 52 is allowed.
    ept_5level: bool = True
    #: ``num_present_cpus``: the most vCPUs a TD may have (``tdx_vm_init``).
    nr_cpus: int = 64


class KeyIdPool:
    """``tdx_guest_keyid_pool``: the TDX private KeyIDs ``[start, start + nr)``.

    A KeyID whose release failed is *leaked*: it stays allocated for the host's lifetime
    (``tdx_mmu_release_hkid``: "HKID %d is leaked").
    """

    def __init__(self, start: int = 32, nr: int = 32) -> None:
        if start < 1 or nr < 1:
            raise ValueError("TDX KeyIDs start above the MKTME KeyIDs and there is at least one")
        self.start = start
        self.nr = nr
        self.in_use: set[int] = set()
        self.leaked: set[int] = set()

    def __repr__(self) -> str:
        return f"<KeyIdPool [{self.start}, {self.start + self.nr}) in use {sorted(self.in_use)}>"

    def alloc(self) -> int:
        """``tdx_guest_keyid_alloc``: the lowest free KeyID; ``ENOSPC`` when all are taken."""
        for hkid in range(self.start, self.start + self.nr):
            if hkid not in self.in_use:
                self.in_use.add(hkid)
                return hkid
        raise KvmError(errno.ENOSPC, "TDX-1.1", f"all {self.nr} TDX private KeyIDs are in use")

    def free(self, hkid: int) -> None:
        """``tdx_guest_keyid_free``."""
        self.in_use.discard(hkid)

    def leak(self, hkid: int) -> None:
        """The HKID could not be released: it is never handed out again."""
        self.leaked.add(hkid)

    @property
    def available(self) -> int:
        """KeyIDs a new TD could get."""
        return self.nr - len(self.in_use)


class TdxHost:
    """The TDX state of one host.

    ``online_packages`` says which physical packages have an online CPU (``__tdx_td_init``
    needs all of them); ``poisoned`` holds the cache lines (``pfn * 64 + line``) a host
    write to TD memory poisoned (``X86_BUG_TDX_PW_MCE``) until MOVDIR64B or the TD's own
    zeroing rewrites them;
    ``leaked`` the pages KVM keeps away from the allocator because it failed to take
    them back from the module; ``mce`` the machine-check verdicts so far.
    """

    def __init__(
        self,
        host: HostView,
        *,
        packages: int = 2,
        keyids: KeyIdPool | None = None,
        sysinfo: TdxSysInfo | None = None,
    ) -> None:
        self.host = host
        self.module = TdxModule(host, packages, on_change=self._changed)
        self.keyids = keyids if keyids is not None else KeyIdPool()
        self.sysinfo = sysinfo if sysinfo is not None else TdxSysInfo()
        self.online_packages = [True] * packages
        self.poisoned: RangeMap[bool] = RangeMap()
        self.leaked: RangeMap[str] = RangeMap()
        self.mce: list[str] = []
        #: ``nr_configured_hkid``: TDs whose HKID is programmed (``tdx_offline_cpu`` checks it).
        self.nr_configured_hkid = 0
        self._vms: dict[int, VmView] = {}

    def __repr__(self) -> str:
        return f"<TdxHost packages={self.module.packages} {self.keyids!r}>"

    # --- which VM a TD belongs to (for ownership events) --------------------------------------
    def bind(self, td: Td, vm: VmView) -> None:
        """Report *td*'s table changes as made for *vm*."""
        self._vms[td.tdr] = vm

    def unbind(self, td: Td) -> None:
        """Forget *td* (its TDR was reclaimed)."""
        self._vms.pop(td.tdr, None)

    def _changed(self, table: str, first: int, npages: int, old: Any, new: Any, td: Td | None) -> None:
        if table == PAMT_TABLE:
            owners = {"old_owner": pamt_owner(old), "new_owner": pamt_owner(new)}
        elif table == SEPT_TABLE:
            owners = {"old_owner": _sept_owner(old), "new_owner": _sept_owner(new)}
        else:
            owners = {
                "old_owner": Owner.HOST if old is None else Owner.HYPERVISOR,
                "new_owner": Owner.HOST if new is None else Owner.HYPERVISOR,
            }
        vm = None if td is None else self._vms.get(td.tdr)
        if vm is not None and not vm.destroyed:
            vm.ownership_update(table, first, npages, old, new, **owners)
        else:
            self.host.ownership_update(table, first, npages, old, new, **owners)

    # --- memory integrity ----------------------------------------------------------------------
    def td_owned(self, pfn: int) -> PamtEntry | None:
        """The PAMT entry of *pfn* if the module gave it to a TD (``paddr_is_tdx_private``)."""
        return self.module.pamt_entry(pfn)

    def host_write(self, pfn: int, offset: int = 0, length: int = PAGE_SIZE) -> None:
        """A host store (a KeyID-0 write) to bytes ``[offset, offset + length)`` of *pfn*: if
        the page is TD memory, the lines written lose their integrity and are poisoned;
        the store itself completes."""
        if length > 0 and self.td_owned(pfn) is not None:
            first, last = _lines(pfn, offset, length)
            self.poisoned.set(first, last, True)
            self.host.trace("tdx_memory_poisoned", pfn=pfn, offset=offset, length=length)

    def clear(self, pfn: int, npages: int) -> None:
        """Stores that rewrite whole lines with integrity (MOVDIR64B, the TD's own zeroing
        at ACCEPT, PAGE.ADD's copy): the poison of those pages is gone."""
        self.poisoned.erase(pfn * LINES_PER_PAGE, (pfn + npages) * LINES_PER_PAGE)

    def is_poisoned(self, pfn: int, offset: int = 0, length: int = PAGE_SIZE) -> bool:
        """A line of bytes ``[offset, offset + length)`` of *pfn* is poisoned."""
        if length <= 0:
            return False
        return self.poisoned.overlaps(*_lines(pfn, offset, length))

    def leak(self, pfn: int, npages: int, why: str) -> None:
        """KVM keeps ``[pfn, pfn + npages)`` forever (its reference is never dropped)."""
        self.leaked.set(pfn, pfn + npages, why)
        self.host.trace("tdx_page_leaked", pfn=pfn, npages=npages, why=why)

    def leaked_runs(self) -> Iterator[tuple[int, int, str]]:
        """The leaked pfn runs and why."""
        return self.leaked.items()


def _lines(pfn: int, offset: int, length: int) -> tuple[int, int]:
    """The cache lines ``[first, last)`` (numbered ``pfn * 64 + line``) bytes touch."""
    base = pfn * LINES_PER_PAGE
    return base + offset // CACHE_LINE, base + (offset + length - 1) // CACHE_LINE + 1


def _sept_owner(state: SeptState | None) -> Owner:
    return Owner.HOST if state is None or not state.is_leaf else Owner.GUEST


def tdx_host(kvm: Any) -> TdxHost:
    """The TDX state of the host behind *kvm* (a ``Kvm`` of the tdx backend, or its view)."""
    state = view(kvm).arch
    if not isinstance(state, TdxHost):
        raise TypeError(f"{kvm!r} is not a host of the tdx backend")
    return state
