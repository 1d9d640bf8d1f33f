"""The conformance kit: pytest base classes every backend runs.

Subclass :class:`GmemConformance` in your backend's test suite, name the backend (and, if
it offers several, the VM type) and pytest collects the inherited tests; or let
:func:`guestmem.conformance.kit_for` build the class from the backend's declarations.
They use only the uAPI face (:mod:`guestmem.api`), so the same kit runs against the model
backends and against the real kernel::

    from guestmem.conformance import GmemConformance

    class TestMyBackend(GmemConformance):
        backend = "mybackend"
        vm_type = MY_VM_TYPE

Two groups of tests:

* **uAPI rules** (spec 2.B-2.I): what a backend *reports* (``KVM_CHECK_EXTENSION``)
  decides which apply: one that reports ``GUEST_MEMFD_FLAG_MMAP`` is held to the mmap
  rules, one that reports ``KVM_CAP_MEMORY_ATTRIBUTES`` to the attribute rules.  The
  capability flags declare the rest.
* **the deep kit**: a guest with RAM, launched and driven through the backend's intents
  (:class:`~guestmem.conformance.vmm.KitVmm`): conversion round trips in both directions
  with contents checked against the declared :attr:`~guestmem.backend.VmTypeInfo.conversion`,
  host access after each conversion, memslot moves and deletes with mapped pages, release
  of guest_memfd while bound, the stateful machine, and after each of them the leak check
  (every page back with the host, the ownership tables empty).

Invariants are on by default: :class:`guestmem.invariants.InvariantChecker`, the
:class:`~guestmem.conformance.ledger.OwnershipLedger` cross-checks and the backend's own
observers (``observers``) watch every event of every test.  Requires pytest.
"""

from __future__ import annotations

import errno
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any, ClassVar

import pytest

import guestmem
from guestmem import uapi
from guestmem.backend import VmTypeInfo
from guestmem.conformance.ledger import OwnershipLedger, allocated, check_released
from guestmem.conformance.vmm import KitVmm, Ram, create_vm
from guestmem.errors import GuestExit, HostSigbus, HypercallExit, KvmError, MemoryFault, MmioExit, errno_name
from guestmem.invariants import InvariantChecker

PAGE = uapi.PAGE_SIZE
MiB = 1 << 20
KEEP = uapi.FALLOC_FL_KEEP_SIZE
PUNCH = uapi.FALLOC_FL_KEEP_SIZE | uapi.FALLOC_FL_PUNCH_HOLE
MMAP = uapi.GUEST_MEMFD_FLAG_MMAP
INIT_SHARED = uapi.GUEST_MEMFD_FLAG_INIT_SHARED
GMEM = uapi.KVM_MEM_GUEST_MEMFD
#: Where the kit puts guest memory: low, below 4 GiB, clear of x86 legacy holes.
BASE_GPA = 0x10000000
#: Pages of the deep kit's guest RAM.
RAM_PAGES = 16
#: A second, plain (userspace_addr) memslot of the memslot tests, and where it moves.
PLAIN_GPA, MOVED_GPA, PLAIN_SLOT = 0x20000000, 0x30000000, 3
#: A gmem-only memslot the host tries to map (test_host_access_after_conversion).
PROBE_GPA, PROBE_SLOT = 0x40000000, 2
SECRET = b"guest private bytes 0123456789"
HOSTDATA = b"host-written bytes ABCDEFGHIJ"


def expect_errno(err: int, fn: Any, *args: Any, **kwargs: Any) -> KvmError:
    """Call *fn* and assert it fails with *err*; returns the exception."""
    with pytest.raises(OSError) as info:
        fn(*args, **kwargs)
    assert info.value.errno == err, f"expected {errno_name(err)}, got {info.value!r}"
    return info.value  # type: ignore[return-value]


class KitGuest:
    """One VM of the backend under test with the kit's RAM and vCPU 0, launched and driven
    through the backend's intents (:class:`~guestmem.conformance.vmm.KitVmm`): what the
    deep kit's tests act on."""

    def __init__(self, kvm: Any, info: VmTypeInfo, npages: int = RAM_PAGES) -> None:
        self.kvm = kvm
        self.info = info
        self.vmm = KitVmm(kvm, info, BASE_GPA, npages * PAGE)
        self.vm = self.vmm.vm
        self.vcpu = self.vmm.vcpu
        self.ram: Ram = self.vmm.ram
        #: Other files and mappings a test made for this VM (closed with it).
        self.extra: list[Any] = []

    @property
    def private(self) -> bool:
        """The kit's RAM is guest-private (the VM type converts)."""
        return self.info.private

    def write(self, page: int, data: bytes, *, private: bool | None = None, offset: int = 0) -> None:
        """The guest stores *data* in RAM page *page* (private by default on a private VM)."""
        private = self.private if private is None else private
        self.vmm.write(self.ram.gpa_of(page) + offset, data, private=private)

    def read(self, page: int, n: int, *, private: bool | None = None, offset: int = 0) -> bytes:
        """The guest loads *n* bytes of RAM page *page*."""
        private = self.private if private is None else private
        return self.vmm.read(self.ram.gpa_of(page) + offset, n, private=private)

    def convert(self, page: int, npages: int = 1, *, private: bool) -> None:
        """The guest converts RAM pages to *private* or shared; the VMM carries it out."""
        self.vmm.convert(self.ram.gpa_of(page), npages * PAGE, private=private)

    def close_files(self) -> None:
        """Unmap and close guest RAM and every file the test made for the VM."""
        self.ram.close()
        self.vmm.firmware.close()
        for obj in self.extra:
            obj.close()

    def close(self) -> None:
        """Release everything in the order a VMM exits: vCPU, VM, mappings, guest_memfd."""
        self.vcpu.close()
        self.vm.close()
        self.close_files()


def private_probe(g: KitGuest) -> Callable[[int, int], bytes] | None:
    """For RAM whose guest_memfd is not mmap-able (its shared side is anonymous memory): a
    gmem-only memslot of an mmap-able file at ``PROBE_GPA``, private, with the guest's
    secret in page 3; returns the host's read of a page of it through a mapping, or None
    where the RAM itself is mappable or the VM offers no mmap-able file."""
    if g.ram.gmem_mappable or not g.vmm.attributes():
        return None
    if not g.vm.check_extension(uapi.KVM_CAP_GUEST_MEMFD_FLAGS) & MMAP:
        return None
    gmem = g.vm.create_guest_memfd(4 * PAGE, MMAP)
    g.extra.append(gmem)
    g.vmm.add_ram(gmem, PROBE_GPA, 4 * PAGE, PROBE_SLOT)
    g.vmm.convert(PROBE_GPA, 4 * PAGE, private=True)  # as the guest accepts memory
    g.vmm.write(PROBE_GPA + 3 * PAGE, SECRET, private=True)

    def read(page: int, n: int) -> bytes:
        with gmem.mmap(4 * PAGE) as mapping:
            data: bytes = mapping.read(page * PAGE, n)
            return data

    return read


class GmemConformance:
    """guest_memfd rules every backend must follow (spec 2.B-2.I), and the deep kit."""

    #: Backend name for :func:`guestmem.open`.
    backend: ClassVar[str] = "sw"
    #: Options for :func:`guestmem.open` (e.g. ``{"profile": ...}``).
    open_options: ClassVar[dict[str, Any]] = {}
    #: VM type the kit creates; None: the backend's default VM type.
    vm_type: ClassVar[int | None] = None
    #: ``Vcpu.access`` runs guest loads/stores on shared gmem-only memory.
    guest_access: ClassVar[bool] = True
    #: A plain private ``Vcpu.access`` works on private memory without arch-specific setup.
    private_access: ClassVar[bool] = False
    #: A gmem-only slot (MMAP gmem) serves shared faults from gmem with userspace_addr 0.
    gmem_only_from_gmem: ClassVar[bool] = True
    #: Host and guest see the same bytes of INIT_SHARED gmem without any conversion (M-7);
    #: False for "private unless shared" designs such as pKVM's protected VMs.
    init_shared_coherent: ClassVar[bool] = True
    #: guest_memfd flags the kit adds to files it binds to memslots (arm64: MMAP, S-16).
    slot_gmem_flags: ClassVar[int] = 0
    #: What the architecture does to a guest-private page when a memslot change (delete,
    #: move) removes its mapping: ``"keep"`` (the page stays the guest's, contents and all:
    #: SNP, SW_PROTECTED, L-7), ``"destroy"`` (the page is scrubbed and reads zero when
    #: the guest maps it again) or ``"revoke"`` (the page is taken
    #: back from the running guest, which reads zero, gets EFAULT or takes an abort: pKVM's
    #: force reclaim, CCA's DATA_DESTROY leaving the IPA DESTROYED).  Also what a punch hole
    #: of a private page does to the running guest's view of it.
    private_unmap: ClassVar[str] = "keep"
    #: The errno with which the architecture refuses to delete or move a memslot of a VM
    #: that ran (``kvm_arch_prepare_memory_region``: pKVM's protected VMs, EPERM,
    #: pKVM-3.6), or 0 where memslots change freely.  The memslot tests then expect that
    #: errno for every delete and move of the running guest's memslots, with nothing
    #: changed: the guest reads its bytes back, its private pages stay out of the host's
    #: reach and no ownership table moves a page.
    memslot_change_errno: ClassVar[int] = 0
    #: What a host access to a guest-private page of a gmem-only memslot does:
    #: ``"sigbus"`` (the host may never map it, M-4) or ``"reclaim"`` (the host takes the
    #: page back from the guest, contents and all, and maps it; the guest's next touch
    #: takes it again: Gunyah's guest_memfd launders a lent folio at a host fault,
    #: backends.md 4.5).
    host_private_access: ClassVar[str] = "sigbus"
    #: Factories of the backend's own observer plugins (invariant checkers) registered for
    #: every test next to the core's.
    observers: ClassVar[tuple[Callable[[], object], ...]] = ()
    #: The backend's arch face for ``guestmem fuzz --hostile``: ``{name: (kind, call,
    #: params[, partial])}`` (:mod:`guestmem.conformance.hostile`).
    hostile_ops: ClassVar[dict[str, tuple[Any, ...]]] = {}
    #: Exception types that are the backend's modelled hardware verdicts, or documented
    #: usage errors of its model-only helpers (``hostile_outcomes``).
    hostile_outcomes: ClassVar[tuple[type[BaseException], ...]] = ()
    #: ``leaks(kvm)``: what the backend's host still holds (ASIDs, KeyIDs...) once every
    #: object is closed; the machine's leak check fails on anything it names.
    leaks: ClassVar[Callable[[Any], list[str]] | None] = None
    #: Run the core's invariant checker and the ownership cross-checks on every event.
    invariants: ClassVar[bool] = True
    #: Budget of the stateful machine test: examples and steps per example.
    machine_examples: ClassVar[int] = 12
    machine_steps: ClassVar[int] = 20
    #: Shrink a failing run of the machine to a minimal program before reporting it.
    machine_shrink: ClassVar[bool] = True
    #: Steps of the bounded ``guestmem fuzz --hostile`` run (``test_hostile_machine``).
    hostile_steps: ClassVar[int] = 200

    # --- fixtures ----------------------------------------------------------------------------
    @pytest.fixture
    def ledger(self) -> Iterator[OwnershipLedger]:
        """The invariant observers of one test: the core's checker, the ownership ledger and
        the backend's own, registered for the test and removed after it."""
        registry = guestmem.get_registry()
        ledger = OwnershipLedger(cross_check=self.invariants)
        plugins: list[object] = [ledger]
        if self.invariants:
            plugins += [InvariantChecker(), *(factory() for factory in self.observers)]
        added: list[object] = []
        try:
            for plugin in plugins:
                registry.add_plugin(plugin, name=f"guestmem.conformance.{id(plugin):x}")
                added.append(plugin)
            yield ledger
        finally:
            for plugin in reversed(added):
                registry.remove_plugin(plugin)

    @pytest.fixture
    def kvm(self, ledger: OwnershipLedger) -> Iterator[Any]:
        with guestmem.open(self.backend, **self.open_options) as k:
            yield k

    @pytest.fixture
    def info(self) -> VmTypeInfo:
        """The backend's description of the kit's VM type."""
        backend = guestmem.get_registry().backend(self.backend)
        if self.vm_type is None:
            return backend.default_vm_type
        found = backend.vm_type(self.vm_type)
        assert found is not None, f"backend {self.backend!r} offers no VM type {self.vm_type}"
        return found

    @pytest.fixture
    def vm(self, kvm: Any, info: VmTypeInfo) -> Iterator[Any]:
        """A VM of the kit's type as its VMM creates one, for the uAPI rules: created, and
        what the backend's intents do right after (``Intents.vm_init``: SEV's INIT2, TDX's
        INIT_VM, a realm's CREATE_REALM), nothing more."""
        vm = create_vm(kvm, info)
        yield vm
        vm.close()

    @pytest.fixture
    def gmem_flags(self, vm: Any) -> int:
        flags: int = vm.check_extension(uapi.KVM_CAP_GUEST_MEMFD_FLAGS)
        return flags

    @pytest.fixture
    def guest(self, kvm: Any, info: VmTypeInfo) -> Iterator[KitGuest]:
        """A guest with RAM, set up by the backend's VMM driver (closed after the test if the
        test did not)."""
        g = self._guest(kvm, info)
        yield g
        if not g.vcpu.closed:
            g.close()

    def _guest(self, kvm: Any, info: VmTypeInfo) -> KitGuest:
        return KitGuest(kvm, info)

    def _slot_gmem(self, vm: Any, size: int) -> Any:
        """A guest_memfd this backend accepts in a memslot."""
        return vm.create_guest_memfd(size, self.slot_gmem_flags)

    def _attributes(self, vm: Any) -> int:
        value: int = vm.check_extension(uapi.KVM_CAP_MEMORY_ATTRIBUTES)
        return value

    @staticmethod
    def released(kvm: Any, ledger: OwnershipLedger, baseline: list[tuple[int, int]]) -> None:
        """The leak check (:func:`~guestmem.conformance.ledger.check_released`)."""
        check_released(kvm, ledger, baseline)

    # --- capabilities (CAP-1..CAP-3) --------------------------------------------------------
    def test_cap1_guest_memfd_reported(self, kvm: Any, vm: Any) -> None:
        assert kvm.check_extension(uapi.KVM_CAP_GUEST_MEMFD) == 1
        assert vm.check_extension(uapi.KVM_CAP_GUEST_MEMFD) == 1

    def test_cap2_flags_reported_are_accepted(self, vm: Any, gmem_flags: int) -> None:
        for bit in (MMAP, INIT_SHARED):
            if gmem_flags & bit:
                vm.create_guest_memfd(MiB, bit | (gmem_flags & MMAP)).close()
            else:
                expect_errno(errno.EINVAL, vm.create_guest_memfd, MiB, bit)

    # --- create (C-3, C-4) ----------------------------------------------------------------
    @pytest.mark.parametrize("size", [0, PAGE - 1, PAGE + 1, 1 << 63])
    def test_c4_bad_size_is_einval(self, vm: Any, size: int) -> None:
        expect_errno(errno.EINVAL, vm.create_guest_memfd, size)

    def test_c3_unknown_flag_before_size(self, vm: Any) -> None:
        expect_errno(errno.EINVAL, vm.create_guest_memfd, 0, 1 << 40)

    # --- closed descriptors -------------------------------------------------------------------
    def test_closed_objects_fileno_is_valueerror_and_syscalls_ebadf(self, kvm: Any) -> None:
        """A closed guest_memfd, VM or ``/dev/kvm`` answers ``fileno()`` with ValueError, as a
        closed Python file object does (there is no descriptor to name), and every system
        call on it with EBADF (``fdget`` fails); ``close()`` again is a no-op."""
        vm = kvm.create_vm(self.vm_type)
        gmem = vm.create_guest_memfd(MiB)
        for obj, syscall in (
            (gmem, lambda: gmem.fallocate(KEEP, 0, PAGE)),
            (vm, lambda: vm.check_extension(uapi.KVM_CAP_GUEST_MEMFD)),
            (kvm, lambda: kvm.check_extension(uapi.KVM_CAP_GUEST_MEMFD)),
        ):
            assert isinstance(obj.fileno(), int) and not obj.closed
            obj.close()
            assert obj.closed
            with pytest.raises(ValueError, match="closed"):
                obj.fileno()
            expect_errno(errno.EBADF, syscall)
            obj.close()

    # --- arguments as the kernel's C types (guestmem.cabi) -------------------------------------
    def test_non_integer_arguments_are_typeerrors_naming_them(self, vm: Any) -> None:
        """Every backend takes the uAPI face's arguments through ``guestmem.cabi``: a float,
        a string or None where the uAPI carries an integer is a TypeError naming the
        parameter, and so is data that is not bytes-like."""
        with vm.create_guest_memfd(MiB) as gmem:
            calls: tuple[tuple[Callable[[], Any], str], ...] = (
                (lambda: vm.create_guest_memfd(float(MiB)), "size"),
                (lambda: vm.create_vcpu(0.5), "vcpu_id"),
                (lambda: vm.set_user_memory_region2(0, 0, 0, None, 0), "memory_size"),
                (lambda: vm.check_extension("1"), "cap"),
                (lambda: gmem.fallocate(KEEP, 0.0, PAGE), "offset"),
                (lambda: gmem.write("x"), "data"),
            )
            for call, name in calls:
                with pytest.raises(TypeError, match=f"^{name} must be"):
                    call()

    def test_wider_integers_are_truncated_as_the_c_field_holds_them(self, vm: Any) -> None:
        """A value wider than its field reaches the kernel's checks as C stores it: a
        ``__u64`` size of ``2**64 + MiB`` is a guest_memfd of 1 MiB (C-4 passes), a
        ``loff_t`` fallocate offset of ``2**64 - PAGE`` is negative (EINVAL, FA-1)."""
        with vm.create_guest_memfd((1 << 64) + MiB) as gmem:
            assert gmem.fstat().st_size == MiB
            expect_errno(errno.EINVAL, gmem.fallocate, KEEP, (1 << 64) - PAGE, PAGE)

    # --- plain file operations (F-1..F-3) ---------------------------------------------------
    def test_f1_read_write_fail(self, vm: Any) -> None:
        with vm.create_guest_memfd(MiB) as gmem:
            expect_errno(errno.EINVAL, gmem.read, 8)
            expect_errno(errno.EINVAL, gmem.write, b"x")

    def test_f2_fstat(self, vm: Any) -> None:
        with vm.create_guest_memfd(MiB) as a, vm.create_guest_memfd(2 * MiB) as b:
            sa, sb = a.fstat(), b.fstat()
            assert (sa.st_size, sb.st_size) == (MiB, 2 * MiB)
            assert sa.st_blksize == PAGE
            assert sa.st_ino != sb.st_ino

    def test_f3_truncate_refused(self, vm: Any) -> None:
        with vm.create_guest_memfd(MiB) as gmem:
            expect_errno(errno.EINVAL, gmem.truncate, 2 * MiB)
            assert gmem.fstat().st_size == MiB

    # --- fallocate (FA-1..FA-7) -----------------------------------------------------------
    def test_fa_rules(self, vm: Any) -> None:
        with vm.create_guest_memfd(MiB) as gmem:
            expect_errno(errno.EINVAL, gmem.fallocate, KEEP, 0, 0)  # FA-1
            expect_errno(errno.EOPNOTSUPP, gmem.fallocate, 0, 0, PAGE)  # FA-2
            expect_errno(errno.EINVAL, gmem.fallocate, KEEP, 1, PAGE)  # FA-4
            expect_errno(errno.EINVAL, gmem.fallocate, PUNCH, 0, PAGE + 1)  # FA-4
            expect_errno(errno.EINVAL, gmem.fallocate, KEEP, MiB, PAGE)  # FA-5
            gmem.fallocate(KEEP, 0, MiB)  # FA-6
            gmem.fallocate(PUNCH, MiB, 16 * MiB)  # FA-7: beyond EOF is fine
            gmem.fallocate(PUNCH, 0, MiB)

    # --- mmap (M-1..M-5, M-10) -------------------------------------------------------------
    def test_m1_mmap_without_flag_enodev(self, vm: Any) -> None:
        with vm.create_guest_memfd(MiB) as gmem:
            expect_errno(errno.ENODEV, gmem.mmap, MiB)

    def test_m2_m3_m4_m5_m10_host_mapping(self, vm: Any, gmem_flags: int) -> None:
        if not gmem_flags & MMAP:
            pytest.skip("backend reports no GUEST_MEMFD_FLAG_MMAP for this VM type")
        with vm.create_guest_memfd(MiB, MMAP) as private:
            expect_errno(errno.EINVAL, private.mmap, MiB, 0, False)  # M-2
            with private.mmap(MiB) as m, pytest.raises(HostSigbus):
                m.read(0, 1)  # M-4
        if not gmem_flags & INIT_SHARED:
            return
        with vm.create_guest_memfd(MiB, MMAP | INIT_SHARED) as shared, shared.mmap(2 * MiB) as m:
            assert m.read(PAGE, 4) == bytes(4)  # M-5: zeroed on first touch
            m.write(PAGE, b"data")
            assert m.read(PAGE, 4) == b"data"
            with pytest.raises(HostSigbus):
                m.read(MiB, 1)  # M-3: beyond i_size
            shared.fallocate(PUNCH, 0, 2 * PAGE)
            assert m.read(PAGE, 4) == bytes(4)  # M-10

    # --- madvise of host mappings (mm/madvise.c) ---------------------------------------------
    def test_madvise_dontneed_keeps_shared_memory_remove_frees_it(
        self, kvm: Any, vm: Any, gmem_flags: int
    ) -> None:
        with kvm.mmap_anonymous(4 * PAGE) as shared:
            shared.write(0, b"keep")
            shared.write(PAGE, b"drop")
            shared.madvise(uapi.MADV_DONTNEED, 0, PAGE)  # shmem keeps the page, only PTEs go
            assert shared.read(0, 4) == b"keep"
            shared.madvise(uapi.MADV_REMOVE, PAGE, PAGE)  # madvise_remove punches the shmem file
            assert shared.read(PAGE, 4) == bytes(4)
            shared.madvise(uapi.MADV_REMOVE, 0, 0)  # a zero length does nothing
            assert shared.read(0, 4) == b"keep"
        if not (gmem_flags & MMAP and gmem_flags & INIT_SHARED and self.init_shared_coherent):
            return
        with vm.create_guest_memfd(MiB, MMAP | INIT_SHARED) as gmem, gmem.mmap(MiB) as view:
            view.write(2 * PAGE, b"gmem")
            view.madvise(uapi.MADV_DONTNEED, 2 * PAGE, PAGE)  # the folio stays in guest_memfd
            assert view.read(2 * PAGE, 4) == b"gmem"
            view.madvise(uapi.MADV_REMOVE, 2 * PAGE, PAGE)  # vfs_fallocate(PUNCH_HOLE | KEEP_SIZE)
            assert view.read(2 * PAGE, 4) == bytes(4)

    def test_madvise_errors_in_the_kernels_order(self, kvm: Any) -> None:
        shared = kvm.mmap_anonymous(2 * PAGE)
        expect_errno(errno.EINVAL, shared.madvise, 99, 0, PAGE)  # madvise_behavior_valid
        expect_errno(errno.EINVAL, shared.madvise, uapi.MADV_DONTNEED, 1, PAGE)  # unaligned start
        expect_errno(errno.EINVAL, shared.madvise, uapi.MADV_DONTNEED, 0, uapi.U64_MAX)  # PAGE_ALIGN wraps
        expect_errno(errno.ENOMEM, shared.madvise, uapi.MADV_DONTNEED, PAGE, 2 * PAGE)  # not all mapped
        shared.close()
        expect_errno(errno.ENOMEM, shared.madvise, uapi.MADV_DONTNEED, 0, PAGE)  # no VMA left

    # --- memslots and binding (S-2, S-14, B-1..B-5, B-11) ---------------------------------------
    def test_s2_v1_rejects_guest_memfd(self, vm: Any) -> None:
        expect_errno(errno.EINVAL, vm.set_user_memory_region, 0, GMEM, BASE_GPA, MiB, 0)

    def test_b_rules(self, kvm: Any, vm: Any) -> None:
        with self._slot_gmem(vm, 2 * MiB) as gmem:
            expect_errno(errno.EBADF, vm.set_user_memory_region2, 0, GMEM, BASE_GPA, MiB, 0, -1, 0)  # B-1
            other = kvm.create_vm(vm.vm_type)
            try:
                with self._slot_gmem(other, MiB) as foreign:
                    expect_errno(
                        errno.EINVAL, vm.set_user_memory_region2, 0, GMEM, BASE_GPA, MiB, 0, foreign, 0
                    )
            finally:
                other.close()
            expect_errno(errno.EINVAL, vm.set_user_memory_region2, 0, GMEM, BASE_GPA, MiB, 0, gmem, 1)  # B-4
            expect_errno(errno.EINVAL, vm.set_user_memory_region2, 0, GMEM, BASE_GPA, MiB, 0, gmem, 2 * MiB)
            vm.set_user_memory_region2(0, GMEM, BASE_GPA, MiB, 0, gmem, 0)
            # B-5: the same file pages again (another gpa) is EINVAL; S-14: the same gpa is EEXIST.
            expect_errno(errno.EINVAL, vm.set_user_memory_region2, 1, GMEM, BASE_GPA + MiB, MiB, 0, gmem, 0)
            expect_errno(errno.EEXIST, vm.set_user_memory_region2, 1, GMEM, BASE_GPA, MiB, 0, gmem, MiB)
            vm.set_user_memory_region2(1, GMEM, BASE_GPA + MiB, MiB, 0, gmem, MiB)  # B-7
            vm.set_user_memory_region2(0, 0, BASE_GPA, 0, 0)  # delete
            vm.set_user_memory_region2(0, GMEM, BASE_GPA, MiB, 0, gmem, 0)  # B-11 rebind

    def test_s11_gmem_slot_immutable(self, vm: Any) -> None:
        with self._slot_gmem(vm, MiB) as gmem:
            vm.set_user_memory_region2(0, GMEM, BASE_GPA, MiB, 0, gmem, 0)
            expect_errno(errno.EINVAL, vm.set_user_memory_region2, 0, GMEM, BASE_GPA, MiB, 0, gmem, 0)

    def test_l2_close_while_bound(self, vm: Any) -> None:
        gmem = self._slot_gmem(vm, MiB)
        vm.set_user_memory_region2(0, GMEM, BASE_GPA, MiB, 0, gmem, 0)
        gmem.close()
        vm.set_user_memory_region2(0, 0, BASE_GPA, 0, 0)

    # --- attributes (A-3..A-6) ---------------------------------------------------------------
    def test_a_rules(self, vm: Any) -> None:
        supported = self._attributes(vm)
        if not supported:
            with pytest.raises(OSError) as info:
                vm.set_memory_attributes(0, PAGE, uapi.KVM_MEMORY_ATTRIBUTE_PRIVATE)
            assert info.value.errno in (errno.ENOTTY, errno.EINVAL)
            return
        expect_errno(errno.EINVAL, vm.set_memory_attributes, 0, PAGE, 0, 1)
        expect_errno(errno.EINVAL, vm.set_memory_attributes, 0, PAGE, 1 << 5)
        expect_errno(errno.EINVAL, vm.set_memory_attributes, 0, 0, 0)
        expect_errno(errno.EINVAL, vm.set_memory_attributes, 1, PAGE, 0)
        vm.set_memory_attributes(BASE_GPA, MiB, supported)  # no memslot needed

    # --- guest accesses (G-*, M-7, L-4) -------------------------------------------------------------
    def test_m7_guest_and_host_share_gmem_only_memory(self, vm: Any, gmem_flags: int) -> None:
        if not (self.guest_access and self.init_shared_coherent and gmem_flags & INIT_SHARED):
            pytest.skip("needs guest access and coherent INIT_SHARED gmem")
        with vm.create_guest_memfd(MiB, MMAP | INIT_SHARED) as gmem, gmem.mmap(MiB) as m:
            uaddr = 0 if self.gmem_only_from_gmem else m.address
            vm.set_user_memory_region2(0, GMEM, BASE_GPA, MiB, uaddr, gmem, 0)
            with vm.create_vcpu(0) as vcpu:
                m.write(0x3000, b"host")
                assert vcpu.access(BASE_GPA + 0x3000, 4) == b"host"
                vcpu.access(BASE_GPA + 0x5000, data=b"guest")
                assert m.read(0x5000, 5) == b"guest"

    def test_no_memslot_shared_access_is_mmio(self, kvm: Any, info: VmTypeInfo) -> None:
        """A shared access where no memslot is: KVM_EXIT_MMIO (G-3), on a VM set up as the
        backend's VMM does."""
        if not self.guest_access:
            pytest.skip("backend declares no guest access")
        g = self._guest(kvm, info)
        with pytest.raises(MmioExit):
            g.vmm.read(PLAIN_GPA + 0x1000, 4, private=False)
        g.close()

    def test_private_round_trip_and_mismatch_exit(self, kvm: Any, info: VmTypeInfo) -> None:
        """A private store reads back; a shared access to the private page exits with
        KVM_EXIT_MEMORY_FAULT for the whole page, no PRIVATE flag (G-2); after a punch the
        page reads zero (FA-7, G-11)."""
        g = self._guest(kvm, info)
        if not (self.private_access and g.vmm.attributes()):
            g.close()
            pytest.skip("needs private guest access and memory attributes")
        g.write(2, b"secret", private=True, offset=0x10)
        assert g.read(2, 6, private=True, offset=0x10) == b"secret"
        with pytest.raises(MemoryFault) as info_:
            g.read(2, 1, private=False, offset=0x10)
        exit_ = info_.value
        assert (exit_.errno, exit_.gpa, exit_.size, exit_.flags) == (errno.EFAULT, g.ram.gpa_of(2), PAGE, 0)
        g.ram.discard_private(2, 1)
        self._after_unmap(g, bytes(6), lambda: g.read(2, 6, private=True, offset=0x10), private=True)
        g.close()

    # --- the deep kit: conversions (backends.md 0.2, 0.3, 6.1) -----------------------------------
    @staticmethod
    def _needs_conversion(info: VmTypeInfo) -> None:
        if not info.private:
            pytest.skip(f"{info.name} has no private memory to convert (VmTypeInfo.conversion is None)")

    def _converting_guest(self, kvm: Any, info: VmTypeInfo) -> KitGuest:
        """A guest that converts, or a skip with the backend's reason why its guest cannot
        (``guest.convert`` is not applicable: Gunyah's bindings are lent or shared for good)."""
        g = self._guest(kvm, info)
        reason = g.vmm.conversion_not_applicable()
        if reason is not None:
            g.close()
            pytest.skip(f"n/a: {reason}")
        return g

    @staticmethod
    def _after_conversion(info: VmTypeInfo, before: bytes) -> bytes:
        """What the other side shows after a conversion of a page that held *before*."""
        return before if info.conversion == "in_place" else bytes(len(before))

    def test_conversion_private_to_shared_to_private(
        self, kvm: Any, info: VmTypeInfo, ledger: OwnershipLedger
    ) -> None:
        """A private page converted to shared and back: its contents follow the declared
        semantics on both sides, and the host sees the shared side only."""
        self._needs_conversion(info)
        baseline = allocated(kvm)
        g = self._converting_guest(kvm, info)
        semantics = f"declared {info.conversion}"
        g.write(1, SECRET, private=True)
        assert g.read(1, len(SECRET), private=True) == SECRET, "a private store reads back"
        g.convert(1, private=False)
        want = self._after_conversion(info, SECRET)
        assert g.read(1, len(SECRET), private=False) == want, f"{semantics}: guest view after to-shared"
        assert g.ram.host_read(1, len(SECRET)) == want, f"{semantics}: host view after to-shared"
        g.ram.host_write(1, HOSTDATA)
        assert g.read(1, len(HOSTDATA), private=False) == HOSTDATA, "host and guest share a shared page"
        g.convert(1, private=True)
        want = self._after_conversion(info, HOSTDATA)
        got = g.read(1, len(HOSTDATA), private=True)
        assert got != SECRET[: len(got)] or info.conversion == "in_place", (
            f"{semantics}: the old private bytes came back after converting to private again"
        )
        assert got == want, f"{semantics}: guest view after to-private"
        g.close()
        self.released(kvm, ledger, baseline)

    def test_conversion_shared_to_private_to_shared(
        self, kvm: Any, info: VmTypeInfo, ledger: OwnershipLedger
    ) -> None:
        """A shared page converted to private and back: the host's bytes and then the
        guest's private bytes follow the declared semantics."""
        self._needs_conversion(info)
        baseline = allocated(kvm)
        g = self._converting_guest(kvm, info)
        semantics = f"declared {info.conversion}"
        g.convert(2, private=False)
        g.ram.host_write(2, HOSTDATA)
        assert g.read(2, len(HOSTDATA), private=False) == HOSTDATA, "host and guest share a shared page"
        g.convert(2, private=True)
        want = self._after_conversion(info, HOSTDATA)
        assert g.read(2, len(HOSTDATA), private=True) == want, f"{semantics}: guest view after to-private"
        g.write(2, SECRET, private=True)
        g.convert(2, private=False)
        want = self._after_conversion(info, SECRET)
        assert g.read(2, len(SECRET), private=False) == want, f"{semantics}: guest view after to-shared"
        assert g.ram.host_read(2, len(SECRET)) == want, f"{semantics}: host view after to-shared"
        g.close()
        self.released(kvm, ledger, baseline)

    def test_host_access_after_conversion(self, kvm: Any, info: VmTypeInfo, ledger: OwnershipLedger) -> None:
        """The host never maps a private page (M-4, and each architecture's rule: an RMP or
        GPC fault, a stage-2 abort) and always reaches a shared one, whichever way the page
        last converted.

        Where the RAM's shared side is anonymous memory, a second, mmap-able guest_memfd
        memslot (gmem-only) gives the host something to try: the guest keeps private bytes
        there too.
        """
        self._needs_conversion(info)
        baseline = allocated(kvm)
        g = self._converting_guest(kvm, info)
        ram = g.ram
        probe = private_probe(g)

        def private_unreachable(tag: str) -> None:
            for what, read in (("RAM", ram.gmem_read if ram.gmem_mappable else None), ("probe", probe)):
                if read is None:
                    continue
                try:
                    leaked = read(3, len(SECRET))
                except HostSigbus:
                    continue
                raise AssertionError(f"{tag}: the host mapped a private {what} page and read {leaked!r}")
            if not ram.gmem_only:
                assert ram.host_read(3, len(SECRET)) != SECRET, f"{tag}: the shared side shows private bytes"

        g.write(3, SECRET, private=True)
        private_unreachable("private from the start")
        g.convert(3, private=False)
        ram.host_write(3, HOSTDATA)
        assert ram.host_read(3, len(HOSTDATA)) == HOSTDATA, "the host reaches a page converted to shared"
        assert g.read(3, len(HOSTDATA), private=False) == HOSTDATA
        g.convert(3, private=True)
        g.write(3, SECRET, private=True)
        private_unreachable("private again after a round trip")
        g.close()
        self.released(kvm, ledger, baseline)

    # --- the deep kit: memslots and release with mapped pages (S-10..S-12, L-3, L-4, L-7) --------
    def _after_unmap(self, g: KitGuest, before: bytes, read: Callable[[], bytes], private: bool) -> None:
        """Check what the guest finds on a page that held *before* once a memslot change
        unmapped it, against ``private_unmap`` (*private*: the page was guest-private)."""
        mode = self.private_unmap if private else "keep"
        try:
            got = read()
        except KvmError as exc:
            if mode == "revoke" and exc.errno == errno.EFAULT:
                return
            raise
        except GuestExit as exc:
            # The architecture's abort of an access to a page taken away (CCA: a DESTROYED
            # IPA), not an exit to userspace.
            if mode == "revoke" and not isinstance(exc, MmioExit | HypercallExit):
                return
            raise
        want = {"keep": [before], "destroy": [bytes(len(before))], "revoke": [bytes(len(before))]}[mode]
        assert got in want, f"private_unmap={mode!r}: after the memslot change the page holds {got!r}"

    def _refused_change(
        self, kvm: Any, ledger: OwnershipLedger, change: Callable[[], object], intact: Callable[[], None]
    ) -> None:
        """*change*, a delete or move of a memslot of the running guest, fails with
        ``memslot_change_errno`` and changes nothing: no ownership table moves a page, and
        *intact* (the guest's and the host's view of the pages) still holds."""
        before = {name: list(table.items()) for name, table in ledger.tables(kvm).items()}
        expect_errno(self.memslot_change_errno, change)
        after = {name: list(table.items()) for name, table in ledger.tables(kvm).items()}
        assert after == before, "a refused memslot change moved pages between owners"
        intact()

    def test_memslot_move_with_mapped_pages(
        self, kvm: Any, info: VmTypeInfo, ledger: OwnershipLedger
    ) -> None:
        """KVM_MR_MOVE of a plain memslot whose pages the guest mapped: the old gpa is gone
        (MMIO), the new one reaches the same memory (private memory as ``private_unmap``
        says); deleting it unmaps it."""
        baseline = allocated(kvm)
        g = self._guest(kvm, info)
        plain = kvm.mmap_anonymous(4 * PAGE)
        g.extra.append(plain)
        try:
            g.vm.set_user_memory_region2(PLAIN_SLOT, 0, PLAIN_GPA, 4 * PAGE, plain.address)
        except OSError as exc:
            g.close()
            pytest.skip(f"{info.name} takes no plain memslot: {exc}")
        plain.write(PAGE + 8, b"plain bytes")
        # Without attributes to say otherwise, a private VM's every page is the guest's.
        private = info.private and not g.vmm.attributes()

        def read(gpa: int) -> bytes:
            return g.vmm.read(gpa + PAGE + 8, 11, private=False)

        assert read(PLAIN_GPA) == b"plain bytes"
        if self.memslot_change_errno:

            def intact() -> None:
                assert read(PLAIN_GPA) == b"plain bytes", "a refused memslot change changed the page"

            move, delete = (MOVED_GPA, 4 * PAGE, plain.address), (PLAIN_GPA, 0, 0)
            for args in (move, delete):
                change = partial(g.vm.set_user_memory_region2, PLAIN_SLOT, 0, *args)
                self._refused_change(kvm, ledger, change, intact)
            g.close()
            self.released(kvm, ledger, baseline)
            return
        g.vm.set_user_memory_region2(PLAIN_SLOT, 0, MOVED_GPA, 4 * PAGE, plain.address)  # KVM_MR_MOVE
        with pytest.raises(MmioExit):
            read(PLAIN_GPA)
        self._after_unmap(g, b"plain bytes", lambda: read(MOVED_GPA), private)
        g.vm.set_user_memory_region2(PLAIN_SLOT, 0, MOVED_GPA, 0, 0)
        with pytest.raises(MmioExit):
            read(MOVED_GPA)
        g.close()
        self.released(kvm, ledger, baseline)

    def test_memslot_delete_with_mapped_pages(
        self, kvm: Any, info: VmTypeInfo, ledger: OwnershipLedger
    ) -> None:
        """A guest_memfd memslot with mapped pages: moving it is refused (S-11) and leaves
        them mapped; deleting it unmaps them (the gpa is gone); binding the file again gives
        the guest its page as ``private_unmap`` says (L-7: kept, for a page that is not
        private), and the page is usable again."""
        baseline = allocated(kvm)
        g = self._guest(kvm, info)
        ram = g.ram
        g.write(4, SECRET)
        uaddr = ram.uaddr
        expect_errno(
            errno.EINVAL,
            g.vm.set_user_memory_region2,
            ram.slot,
            GMEM,
            MOVED_GPA,
            ram.size,
            uaddr,
            ram.gmem,
            0,
        )
        assert g.read(4, len(SECRET)) == SECRET, "a refused move left the page as it was"
        if self.memslot_change_errno:

            def intact() -> None:
                assert g.read(4, len(SECRET)) == SECRET, "a refused memslot change changed the page"
                if info.private and ram.gmem_mappable:
                    with pytest.raises(HostSigbus):
                        ram.gmem_read(4, len(SECRET))

            self._refused_change(kvm, ledger, ram.unbind, intact)
            g.close()
            self.released(kvm, ledger, baseline)
            return
        ram.unbind()
        with pytest.raises((MmioExit, MemoryFault)):
            g.read(4, len(SECRET))
        ram.bind()
        self._after_unmap(g, SECRET, lambda: g.read(4, len(SECRET)), info.private)
        if self.private_unmap != "revoke" or not info.private:
            g.write(4, HOSTDATA)
            assert g.read(4, len(HOSTDATA)) == HOSTDATA, "the page is usable again"
        g.close()
        self.released(kvm, ledger, baseline)

    def test_gmem_release_while_bound(self, kvm: Any, info: VmTypeInfo, ledger: OwnershipLedger) -> None:
        """Closing guest_memfd while its memslot maps pages (L-3): the guest's next access to
        it is a memory-fault exit with EFAULT (L-4); once the memslot is deleted and the VM
        closed every page is back with the host."""
        baseline = allocated(kvm)
        g = self._guest(kvm, info)
        if not (info.private or g.ram.gmem_only):
            g.close()
            pytest.skip("the guest's RAM is not in guest_memfd (no private memory, no gmem-only memslot)")
        g.write(5, SECRET)
        g.write(6, HOSTDATA)
        g.ram.release_gmem()
        if g.ram.uaddr_map is not None and not self.gmem_only_from_gmem and not info.private:
            # Shared faults of this kernel's gmem-only memslots go through userspace_addr,
            # the mapping just removed: nothing is there any more (an MMIO exit).
            with pytest.raises(MmioExit):
                g.read(5, len(SECRET))
        else:
            with pytest.raises(MemoryFault) as exit_info:
                g.read(5, len(SECRET))
            assert exit_info.value.errno == errno.EFAULT, "L-4: EFAULT once the file is gone"
        if self.memslot_change_errno:
            # The memslot stays, naming a file that is gone: the guest still gets EFAULT.

            def intact() -> None:
                with pytest.raises(MemoryFault) as again:
                    g.read(6, len(HOSTDATA))
                assert again.value.errno == errno.EFAULT, "L-4: the kept memslot names a released file"

            self._refused_change(kvm, ledger, g.ram.unbind, intact)
        else:
            g.ram.unbind()
        g.close()
        self.released(kvm, ledger, baseline)

    def test_leak_check_after_a_lifecycle(self, kvm: Any, info: VmTypeInfo, ledger: OwnershipLedger) -> None:
        """A guest touching every page, converting and punching, then closed object by object
        in two orders: the host owns every page again and every table is empty."""
        baseline = allocated(kvm)
        for gmem_first in (False, True):
            g = self._guest(kvm, info)
            for page in range(RAM_PAGES):
                g.write(page, SECRET)
            if info.private and g.vmm.conversion_not_applicable() is None:
                g.convert(7, 2, private=False)
                g.ram.host_write(7, HOSTDATA)
                g.convert(8, private=True)
                g.write(8, SECRET, private=True)
            if gmem_first:
                g.close_files()
                g.vcpu.close()
                g.vm.close()
            else:
                g.close()
        self.released(kvm, ledger, baseline)

    # --- the deep kit: the stateful machine --------------------------------------------------------
    @classmethod
    def machine(
        cls, info: VmTypeInfo, on_step: Callable[[], None] | None = None, *, hostile: bool = False
    ) -> type[Any]:
        """The stateful machine of *info* configured as this kit is (observers, options);
        *on_step* is called after every step; *hostile* mixes in hostile calls
        (:mod:`guestmem.conformance.hostile`).  Needs Hypothesis."""
        from guestmem.conformance.machine import machine_for

        return machine_for(
            cls.backend,
            info,
            open_options=cls.open_options,
            observers=cls.observers if cls.invariants else (),
            invariants=cls.invariants,
            gmem_only_from_gmem=cls.gmem_only_from_gmem,
            private_unmap=cls.private_unmap,
            host_private_access=cls.host_private_access,
            on_step=on_step,
            hostile=hostile,
            hostile_ops=cls.hostile_ops,
            hostile_outcomes=cls.hostile_outcomes,
            leaks=cls.leaks,
        )

    def test_hostile_machine(self, info: VmTypeInfo, tmp_path: Path) -> None:
        """A bounded run of ``guestmem fuzz --hostile`` on this kit's machine: wrong types,
        edge integers, closed and foreign objects, reentrant hooks and the backend's arch
        face are counted by outcome class; the invariant, no-half-applied and leak checks
        run after every sequence; each finding class minimises to a reproducer that replays
        to the same class.  (The classes found are the run's result, not a failure here.)"""
        pytest.importorskip("hypothesis")
        from guestmem.fuzz.hostile import check_hostile_run

        check_hostile_run(self.machine(info, hostile=True), tmp_path, steps=self.hostile_steps)

    def test_stateful_machine(self, info: VmTypeInfo) -> None:
        """The core's stateful Hypothesis machine against this backend's own policy, with
        its reference model, the invariant observers and the leak check after every run."""
        pytest.importorskip("hypothesis")
        from guestmem.conformance.machine import run_machine

        run_machine(
            self.machine(info),
            examples=self.machine_examples,
            steps=self.machine_steps,
            shrink=self.machine_shrink,
        )
