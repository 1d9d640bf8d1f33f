"""Portable guest intents: what a guest or its VMM means, in each backend's own mechanism.

A scenario file and the pytest fixture ``guestmem_vm`` describe a VM's life once, in
terms every confidential-computing architecture has: *populate* the launch image, *convert*
a range to shared or private, *accept* memory, load and store.  Each backend translates
them into its mechanism: a conversion is ``KVM_HC_MAP_GPA_RANGE`` on ``sw``, a GHCB
page-state change plus PVALIDATE on SEV-SNP, ``TDG.VP.VMCALL<MapGPA>`` plus
``TDG.MEM.PAGE.ACCEPT`` on TDX, ``MEM_SHARE``/``MEM_UNSHARE`` on pKVM; a Gunyah guest has
none (its bindings are lent or shared for good), which its backend says ("n/a: reason").

A backend provides the translation by registering an :class:`Intents` object with its
backend (``Backend(..., intents=MyIntents())``).  Every method of the base class is
either a generic implementation through the uAPI face (memory layout, guest accesses) or
raises :class:`NotApplicable`: a step a backend cannot express is reported as
"n/a: reason", never as a failure.  Methods receive the :class:`guestmem.guestvm.GuestVm`
they act on (the VM, its RAM regions, vCPUs, and the VMM loop that handles exits) and
use only the uAPI face plus, for a model backend, :func:`guestmem.backend.view`.

``docs/backends.md`` ("Portable intents") walks through an implementation.
"""

from __future__ import annotations

import errno
from collections.abc import Mapping
from functools import partial
from typing import TYPE_CHECKING, Any, ClassVar, Final, Literal

import attrs

from guestmem import api, uapi
from guestmem.errors import HypercallExit, KvmError, MemoryFault

if TYPE_CHECKING:
    from guestmem.backend import Backend, VmTypeInfo
    from guestmem.guestvm import GuestVm

__all__ = [
    "CAPABILITIES",
    "COST_CATEGORIES",
    "PAGE_SIZES",
    "Intents",
    "NotApplicable",
    "RamRegion",
    "VmKind",
    "X86Intents",
]

#: What kind of VM a scenario asks for: the backend's VM type with private memory, or its
#: plain VM type (``KVM_X86_DEFAULT_VM``, ``KVM_VM_TYPE_ARM_IPA_SIZE(0)``).
VmKind = Literal["private", "default"]

#: Page sizes an intent takes (bytes).
PAGE_SIZES: Final = (uapi.PAGE_SIZE, 1 << 21)

#: The capability names :meth:`Intents.capabilities` reports and
#: ``@pytest.mark.guestmem_requires`` and scenario ``requires`` take.
CAPABILITIES: Final[dict[str, str]] = {
    "private_mem": "the guest has memory the host cannot access (a private-memory VM type)",
    "memory_attributes": "KVM_SET_MEMORY_ATTRIBUTES works on the VM (CAP-4)",
    "host_mmap": "the host can mmap this VM's guest_memfd (GUEST_MEMFD_FLAG_MMAP, CAP-2/CAP-3)",
    "conversion": "guest.convert: the guest can turn memory shared or private",
    "in_place_conversion": "a conversion keeps the page and its contents (pKVM)",
    "acceptance": "guest.accept: the guest must accept private memory before use (PVALIDATE, ACCEPT)",
    "populate": "launch.populate: the VMM can put an image into guest memory before it runs",
    "launch_measurement": "launch.populate can measure what it puts in (SNP launch digest, TDX MRTD)",
    "guest_access": "the guest's loads and stores run (guest.read, guest.write)",
    "private_access": "the guest's private loads and stores run",
    "pre_fault": "KVM_PRE_FAULT_MEMORY works on the VM",
}

#: The cost categories of :meth:`Intents.costs`, shown side by side for every backend.
COST_CATEGORIES: Final[dict[str, str]] = {
    "exits": "exits to the VMM (KVM_EXIT_HYPERCALL, KVM_EXIT_MEMORY_FAULT)",
    "hypercalls": "guest hypercalls (VMGEXIT, TDCALL, HVC)",
    "hw_table_updates": "hardware ownership-table updates (RMPUPDATE, SEAMCALLs, pKVM hyp calls)",
    "firmware_commands": "security-processor / firmware commands (PSP, TDX module management)",
    "guest_instructions": "guest page-state instructions (PVALIDATE, TDG.MEM.PAGE.ACCEPT)",
    "tlb_flushes": "TLB flushes, vCPU kicks and cache flushes",
    "zeroed_bytes": "bytes cleared",
    "copied_bytes": "bytes copied",
    "pages_allocated": "guest_memfd pages allocated",
    "faults": "stage-2 faults taken",
}


class NotApplicable(Exception):
    """The backend cannot express this intent; *reason* says why ("n/a: reason")."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@attrs.define(eq=False)
class RamRegion:
    """One region of guest RAM as the VMM laid it out (a QEMU RAMBlock with its memslot).

    ``shared`` is the host's view of the region's shared side: the anonymous mapping at
    ``userspace_addr`` (x86 CoCo: conversions discard the other side), or the guest_memfd's
    own mapping when ``in_place`` (pKVM, a gmem-only slot: one page, two states).
    """

    gpa: int
    size: int
    gmem: api.GuestMemfd | None = None
    #: Offset of ``gpa`` in the guest_memfd.
    gmem_offset: int = 0
    shared: api.HostMapping | None = None
    in_place: bool = False
    #: The memslot id.
    slot: int = 0
    #: The memslot's ``userspace_addr`` (0 for a gmem-only memslot that names no host
    #: memory, as arm64 VMMs create them).
    userspace_addr: int = 0

    @property
    def end(self) -> int:
        """One past the last guest physical address."""
        return self.gpa + self.size

    def clip(self, gpa: int, size: int) -> tuple[int, int] | None:
        """The part ``(gpa, size)`` of ``[gpa, gpa + size)`` inside the region, or None."""
        lo, hi = max(gpa, self.gpa), min(gpa + size, self.end)
        return (lo, hi - lo) if lo < hi else None


class Intents:
    """A backend's translation of the portable intents; the base is generic KVM.

    Subclass it and override what your architecture does differently; leave a method
    raising :class:`NotApplicable` (with the reason) where it has no such mechanism.  The
    base class lays out memory as QEMU does for a VM with private memory, runs guest
    accesses through ``Vcpu.access``, converts implicitly where memory attributes decide
    privateness (:meth:`convert`) and can neither accept nor populate.
    """

    #: The VM type a ``"private"`` VM is (``KVM_X86_SNP_VM``, ``KVM_X86_TDX_VM``) on a host
    #: that offers other types with private memory before it (``KVM_X86_SW_PROTECTED_VM``);
    #: None: the first type with private memory.
    private_vm_type: ClassVar[int | None] = None

    # --- choosing and creating the VM -------------------------------------------------------
    def vm_type(self, backend: Backend, kind: VmKind) -> tuple[VmTypeInfo, str]:
        """The VM type for *kind* and a note for the report ("" if none).

        The base picks :attr:`private_vm_type` if the backend offers it, else the first VM
        type with private memory, for ``"private"``, and the first without for
        ``"default"``; :class:`NotApplicable` if there is none.
        """
        if kind == "private" and self.private_vm_type is not None:
            found = backend.vm_type(self.private_vm_type)
            if found is not None:
                return found, ""
        for info in backend.vm_types:
            if info.has_private_mem == (kind == "private"):
                return info, ""
        raise NotApplicable(f"backend {backend.name!r} offers no {kind} VM type")

    def vm_init(self, guest: GuestVm) -> None:
        """Right after ``KVM_CREATE_VM``, before memory and vCPUs (SEV ``KVM_SEV_INIT2``).

        The base enables ``KVM_CAP_EXIT_HYPERCALL`` for ``KVM_HC_MAP_GPA_RANGE`` on an x86
        VM with private memory, as QEMU's ``kvm_arch_init`` does for guest_memfd machines.
        """
        if guest.vm_type.has_private_mem and guest.vm_type.arch == "x86":
            mask = guest.vm.check_extension(uapi.KVM_CAP_EXIT_HYPERCALL)
            if mask & (1 << uapi.KVM_HC_MAP_GPA_RANGE):
                guest.vm.enable_cap(uapi.KVM_CAP_EXIT_HYPERCALL, 1 << uapi.KVM_HC_MAP_GPA_RANGE)

    def gmem_flags(self, guest: GuestVm) -> int:
        """``KVM_CREATE_GUEST_MEMFD`` flags of guest RAM.

        Private-memory VMs: none (the shared side is separate anonymous memory).  Others:
        ``MMAP | INIT_SHARED``, guest_memfd as the only backing (a gmem-only memslot).
        """
        if guest.vm_type.has_private_mem:
            return 0
        return uapi.GUEST_MEMFD_FLAG_MMAP | uapi.GUEST_MEMFD_FLAG_INIT_SHARED

    def add_region(self, guest: GuestVm, gpa: int, size: int, slot: int) -> RamRegion:
        """Create the backing of one RAM region and its memslot (QEMU ``kvm_set_phys_mem``).

        A guest_memfd of :meth:`gmem_flags`; the shared side is anonymous memory, or the
        guest_memfd's own mapping when it is mappable and shared from the start.
        """
        vm = guest.vm
        flags = self.gmem_flags(guest)
        gmem = vm.create_guest_memfd(size, flags)
        in_place = bool(flags & uapi.GUEST_MEMFD_FLAG_MMAP)
        shared = gmem.mmap(size) if in_place else guest.kvm.mmap_anonymous(size)
        vm.set_user_memory_region2(slot, uapi.KVM_MEM_GUEST_MEMFD, gpa, size, shared.address, gmem, 0)
        return RamRegion(gpa, size, gmem, 0, shared, in_place, slot, shared.address)

    def initial_attributes(self, guest: GuestVm) -> None:
        """Attributes of new RAM: QEMU makes guest_memfd RAM of a private-memory VM private
        (``kvm_set_phys_mem`` -> ``kvm_set_memory_attributes_private``)."""
        if not guest.vm_type.has_private_mem or not guest.vm.check_extension(uapi.KVM_CAP_MEMORY_ATTRIBUTES):
            return
        for region in guest.regions:
            guest.vm.set_memory_attributes(region.gpa, region.size, uapi.KVM_MEMORY_ATTRIBUTE_PRIVATE)

    def launch_start(self, guest: GuestVm) -> str:
        """Begin the launch once memory and vCPUs exist (SNP ``LAUNCH_START``, TDX
        ``INIT_VM``); returns a note for the report.  The base has nothing to do."""
        return ""

    # --- the launch ----------------------------------------------------------------------------
    def populate(self, guest: GuestVm, gpa: int, data: bytes, measure: bool | None) -> str:
        """Put *data* at *gpa* before the guest runs (``launch.populate``); returns a note.

        *measure*: True to require a measurement, False to leave it out, None for what the
        architecture does by default.
        """
        raise NotApplicable("this VM type has no launch: the host cannot put data into private memory")

    def launch_finish(self, guest: GuestVm) -> str:
        """End the launch (SNP ``LAUNCH_FINISH``, TDX ``FINALIZE_VM``); returns a note (a
        measurement).  The base has nothing to do."""
        return ""

    # --- the guest ------------------------------------------------------------------------------
    def convert(
        self, guest: GuestVm, gpa: int, size: int, *, private: bool, page_size: int, coalesce: bool
    ) -> str:
        """The guest turns ``[gpa, gpa + size)`` private or shared (``guest.convert``).

        *coalesce* False makes one request per page (GHCB MSR protocol, a legacy
        single-page hypercall).  Exits go through :meth:`GuestVm.run`; returns a note.

        The base converts implicitly, the one conversion every VM type whose memory
        attributes decide privateness has without a call of its own: the guest touches
        each page as it now means it, KVM answers the mismatch with
        ``KVM_EXIT_MEMORY_FAULT`` (G-2) and the VMM converts the page before the access
        runs again (QEMU's ``kvm_convert_memory``; the selftest
        ``private_mem_kvm_exits_test``).  Any other VM type: :class:`NotApplicable`.
        """
        vm = guest.vm
        attributes = vm.check_extension(uapi.KVM_CAP_MEMORY_ATTRIBUTES) & uapi.KVM_MEMORY_ATTRIBUTE_PRIVATE
        if not (guest.vm_type.has_private_mem and attributes):
            raise NotApplicable("this VM type has no guest-initiated conversion")
        vcpu = guest.vcpu()
        for page in range(gpa, gpa + size, uapi.PAGE_SIZE):
            guest.run(partial(vcpu.access, page, 1, private=private), vcpu)
        return f"{size >> uapi.PAGE_SHIFT} page(s) converted implicitly (KVM_EXIT_MEMORY_FAULT)"

    def accept(
        self, guest: GuestVm, gpa: int, size: int, *, page_size: int, coalesce: bool, entries: int
    ) -> str:
        """The guest accepts private memory it has not used yet (``guest.accept``): SNP
        page-state change to private + PVALIDATE, TDX ``TDG.MEM.PAGE.ACCEPT``.  *entries*
        bounds a request's entries (a PSC descriptor's); returns a note."""
        raise NotApplicable("this VM type has no memory acceptance: private memory is usable at once")

    def unaccepted(self, guest: GuestVm, exc: BaseException) -> int | None:
        """The gpa a guest access that raised *exc* stopped at because the guest has not
        accepted the page (SNP's #VC for an unvalidated page, TDX's #VE for a pending
        one), or None for any other failure.  A guest launched with
        ``accept_on_fault`` accepts that page and runs the access again
        (:meth:`GuestVm.read`).  The base has no acceptance: None."""
        return None

    def side(self, guest: GuestVm, gpa: int, private: bool | None) -> bool | None:
        """Which side a guest access of *gpa* takes: *private* if given; None lets the
        VM decide (the attribute, G-1).  Backends whose guests mark accesses (a C-bit, a
        shared bit) answer from their own state."""
        return private

    def read(self, guest: GuestVm, gpa: int, length: int, *, private: bool | None) -> bytes:
        """A guest load (``guest.read``)."""
        side = self.side(guest, gpa, private)
        vcpu = guest.vcpu()
        data = guest.run(lambda: vcpu.access(gpa, length, private=side), vcpu)
        assert data is not None
        return bytes(data)

    def write(self, guest: GuestVm, gpa: int, data: bytes, *, private: bool | None) -> None:
        """A guest store (``guest.write``)."""
        side = self.side(guest, gpa, private)
        vcpu = guest.vcpu()
        guest.run(lambda: vcpu.access(gpa, data=data, private=side), vcpu)

    def touch(self, guest: GuestVm, gpa: int, size: int) -> int:
        """The guest's first stores to every page of the range (``guest.touch``): the
        stage-2 faults its boot takes on memory it uses.  Returns the pages touched.

        On a model backend the range is faulted as runs (``VmView.fault_range``), so a
        large range costs what its runs cost; a page whose fault exits is stored to by the
        vCPU, through the VMM loop, and the walk goes on after it.
        """
        from guestmem.backend import view

        vcpu = guest.vcpu()
        try:
            vm_view, vcpu_view = view(guest.vm), view(vcpu)
        except TypeError:  # the real kernel: one store per page
            vm_view = vcpu_view = None
        gfn, end = gpa >> uapi.PAGE_SHIFT, (gpa + size) >> uapi.PAGE_SHIFT
        while gfn < end:
            page = gfn << uapi.PAGE_SHIFT
            side = self.side(guest, page, None)
            if vm_view is not None:
                private = side
                if private is None:
                    with vm_view.host.operation():  # another thread may be converting
                        private = bool(vm_view.is_private(gfn))
                mapped = vm_view.fault_range(gfn, end - gfn, private=private, write=True, vcpu=vcpu_view)
                if mapped:
                    gfn += mapped
                    continue
            guest.run(partial(vcpu.access, page, data=b"\x00", private=side), vcpu)
            gfn += 1
        return end - (gpa >> uapi.PAGE_SHIFT)

    # --- exits ---------------------------------------------------------------------------------
    def resume(self, guest: GuestVm, vcpu: api.Vcpu, exit: HypercallExit, ret: int) -> Any:  # noqa: A002
        """Re-enter *vcpu* after the VMM handled *exit* with ``run->hypercall.ret = ret``;
        returns what the interrupted guest operation returns, or raises the next exit.

        The base is x86's ``complete_hypercall_exit``: the guest's hypercall returns *ret*.
        """
        return ret

    def handle_exit(self, guest: GuestVm, exit: HypercallExit | MemoryFault) -> int | None:  # noqa: A002
        """An exit the architecture defines, handled as its VMM would before the generic
        QEMU handling (:class:`guestmem.vmm.QemuVmm`); the ``run->hypercall.ret`` to resume
        with (0 for a memory fault, which is retried), or None to leave it to QEMU's."""
        return None

    # --- what the backend can do, and what it cost ------------------------------------------------
    def capabilities(self, guest: GuestVm) -> frozenset[str]:
        """The :data:`CAPABILITIES` of *guest*'s VM on this backend.

        The base reports what the uAPI says (attributes, mmap, pre-fault) plus guest
        access, and ``private_mem``/``private_access`` for a VM type with private memory,
        which converts (implicitly, :meth:`convert`) where attributes decide privateness.
        """
        vm = guest.vm
        found = {"guest_access"}
        if guest.vm_type.has_private_mem:
            found |= {"private_mem", "private_access"}
        if vm.check_extension(uapi.KVM_CAP_MEMORY_ATTRIBUTES) & uapi.KVM_MEMORY_ATTRIBUTE_PRIVATE:
            found.add("memory_attributes")
            if guest.vm_type.has_private_mem:
                found.add("conversion")
        if vm.check_extension(uapi.KVM_CAP_GUEST_MEMFD_FLAGS) & uapi.GUEST_MEMFD_FLAG_MMAP:
            found.add("host_mmap")
        if guest.vm_type.pre_fault_allowed and vm.check_extension(uapi.KVM_CAP_PRE_FAULT_MEMORY):
            found.add("pre_fault")
        return frozenset(found)

    def costs(self, counters: Mapping[str, int]) -> dict[str, int]:
        """The :data:`COST_CATEGORIES` from a VM's (or host's) counters.

        The base knows the core's counters; a backend adds its own (its table updates,
        firmware commands, guest instructions) to what ``super().costs`` returns.
        """
        get = counters.get
        return {
            "exits": get("userspace_exits", 0) + get("memory_fault_exits", 0),
            "hypercalls": get("hypercalls", 0),
            "hw_table_updates": 0,
            "firmware_commands": 0,
            "guest_instructions": 0,
            "tlb_flushes": get("tlb_flushes", 0) + get("remote_tlb_flushes", 0),
            "zeroed_bytes": get("zeroed_bytes", 0),
            "copied_bytes": get("copied_bytes", 0),
            "pages_allocated": get("gmem_pages_allocated", 0),
            "faults": get("faults", 0),
        }

    def cost_details(self, counters: Mapping[str, int]) -> dict[str, int]:
        """The architecture's own operations worth a row of their own in the cost table
        (``{"RMPUPDATE": n, "PVALIDATE": n}`` on SNP, ``{"SEAMCALL": n}`` on TDX): other
        backends show "—" there, which is the point.  The base has none."""
        return {}


class X86Intents(Intents):
    """The portable intents of the core's x86 VM types, ``KVM_X86_DEFAULT_VM`` and
    ``KVM_X86_SW_PROTECTED_VM``: the ``sw`` backend's, and those of every backend that
    models a whole x86 host and offers them next to its own (subclass it).

    A guest converts with the ``KVM_HC_MAP_GPA_RANGE`` hypercall, which KVM turns into a
    ``KVM_EXIT_HYPERCALL`` for the VMM (``__kvm_emulate_hypercall``, enabled by
    ``KVM_CAP_EXIT_HYPERCALL``), exactly as the upstream selftest
    ``x86/private_mem_conversions_test.c`` guest does; the VMM sets the attributes and
    discards the old side.  There is no launch (the host cannot write private memory: no
    populate ioctl and no mmap of private guest_memfd) and no acceptance.
    """

    def convert(
        self, guest: GuestVm, gpa: int, size: int, *, private: bool, page_size: int, coalesce: bool
    ) -> str:
        if not guest.vm_type.has_private_mem:
            raise NotApplicable(f"{guest.vm_type.name} has no private memory")
        vcpu = guest.vcpu()
        flags = uapi.KVM_MAP_GPA_RANGE_ENCRYPTED if private else uapi.KVM_MAP_GPA_RANGE_DECRYPTED
        flags |= uapi.KVM_MAP_GPA_RANGE_PAGE_SZ_2M if page_size > uapi.PAGE_SIZE else 0
        step = page_size if not coalesce else size
        calls = 0
        for start in range(gpa, gpa + size, step):
            npages = step >> uapi.PAGE_SHIFT
            request = partial(vcpu.hypercall, uapi.KVM_HC_MAP_GPA_RANGE, start, npages, flags)
            ret = guest.run(request, vcpu)
            calls += 1
            if ret:
                raise NotApplicable(
                    f"KVM_HC_MAP_GPA_RANGE returned {ret}: exits to userspace are not enabled"
                )
        return f"{calls} KVM_HC_MAP_GPA_RANGE hypercall(s)"

    def capabilities(self, guest: GuestVm) -> frozenset[str]:
        found = super().capabilities(guest)
        if guest.vm_type.has_private_mem:
            found |= {"conversion"}
        return found


def require_aligned(gpa: int, size: int, page_size: int) -> None:
    """EINVAL unless ``[gpa, gpa + size)`` is a non-empty run of *page_size* pages."""
    if page_size not in PAGE_SIZES:
        raise KvmError(errno.EINVAL, "", f"page size {page_size:#x} is neither 4 KiB nor 2 MiB")
    if size <= 0 or gpa % page_size or size % page_size:
        raise KvmError(errno.EINVAL, "", f"[{gpa:#x}, +{size:#x}) is not a run of {page_size:#x}-byte pages")
