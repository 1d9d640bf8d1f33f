"""The conformance kit: importable pytest base classes every backend can run.

* :class:`GmemConformance`: the guest_memfd uAPI rules;
* :class:`ScenarioConformance`: the built-in scenarios, every applicable step run and
  meeting what it asserts.

Subclass :class:`GmemConformance` in your backend's test suite, name the backend and VM
type, and declare what your backend supports with the capability flags; pytest collects
the inherited tests.  They use only the uAPI face (:mod:`guestmem.api`), so the same kit
runs against the model backends and against the real kernel::

    from guestmem.conformance import GmemConformance

    class TestMyBackend(GmemConformance):
        backend = "mybackend"
        vm_type = MY_VM_TYPE
        private_access = True

What a backend *reports* (``KVM_CHECK_EXTENSION``) decides which rules apply: a backend
that reports ``GUEST_MEMFD_FLAG_MMAP`` is held to the mmap rules, one that reports
``KVM_CAP_MEMORY_ATTRIBUTES`` to the attribute rules.  The flags declare the rest.
Requires pytest.
"""

from __future__ import annotations

import errno
from collections.abc import Iterator
from typing import Any, ClassVar

import pytest

import guestmem
from guestmem import uapi
from guestmem.errors import HostSigbus, KvmError, MemoryFault, MmioExit

PAGE = uapi.PAGE_SIZE
MiB = 1 << 20
KEEP = uapi.FALLOC_FL_KEEP_SIZE
PUNCH = uapi.FALLOC_FL_KEEP_SIZE | uapi.FALLOC_FL_PUNCH_HOLE
MMAP = uapi.GUEST_MEMFD_FLAG_MMAP
INIT_SHARED = uapi.GUEST_MEMFD_FLAG_INIT_SHARED
GMEM = uapi.KVM_MEM_GUEST_MEMFD
#: Where the kit puts guest memory: low, below 4 GiB, clear of x86 legacy holes.
BASE_GPA = 0x10000000


def _builtin_names() -> list[str]:
    from guestmem.scenario import builtins

    return builtins.names()


def expect_errno(err: int, fn: Any, *args: Any, **kwargs: Any) -> KvmError:
    """Call *fn* and assert it fails with *err*; returns the exception."""
    with pytest.raises(OSError) as info:
        fn(*args, **kwargs)
    assert info.value.errno == err, f"expected {errno.errorcode[err]}, got {info.value!r}"
    return info.value  # type: ignore[return-value]


class GmemConformance:
    """guest_memfd uAPI rules every backend must follow (spec 2.B-2.I)."""

    #: Backend name for :func:`guestmem.open`.
    backend: ClassVar[str] = "sw"
    #: Options for :func:`guestmem.open` (e.g. ``{"profile": ...}``).
    open_options: ClassVar[dict[str, Any]] = {}
    #: VM type the kit creates.
    vm_type: ClassVar[int] = uapi.KVM_X86_DEFAULT_VM
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

    # --- fixtures ----------------------------------------------------------------------------
    @pytest.fixture
    def kvm(self) -> Iterator[Any]:
        with guestmem.open(self.backend, **self.open_options) as k:
            yield k

    @pytest.fixture
    def vm(self, kvm: Any) -> Iterator[Any]:
        vm = kvm.create_vm(self.vm_type)
        yield vm
        vm.close()

    @pytest.fixture
    def gmem_flags(self, vm: Any) -> int:
        flags: int = vm.check_extension(uapi.KVM_CAP_GUEST_MEMFD_FLAGS)
        return flags

    def _slot_gmem(self, vm: Any, size: int) -> Any:
        """A guest_memfd this backend accepts in a memslot."""
        return vm.create_guest_memfd(size, self.slot_gmem_flags)

    def _attributes(self, vm: Any) -> int:
        value: int = vm.check_extension(uapi.KVM_CAP_MEMORY_ATTRIBUTES)
        return value

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
            other = kvm.create_vm(self.vm_type)
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

    def test_no_memslot_shared_access_is_mmio(self, vm: Any) -> None:
        if not self.guest_access:
            pytest.skip("backend declares no guest access")
        with vm.create_vcpu(0) as vcpu, pytest.raises(MmioExit):
            vcpu.access(BASE_GPA + 0x1000, 4)

    def test_private_round_trip_and_mismatch_exit(self, vm: Any) -> None:
        if not (self.private_access and self._attributes(vm)):
            pytest.skip("needs private guest access and memory attributes")
        with self._slot_gmem(vm, MiB) as gmem:
            vm.set_user_memory_region2(0, GMEM, BASE_GPA, MiB, 0, gmem, 0)
            vm.set_memory_attributes(BASE_GPA, MiB, uapi.KVM_MEMORY_ATTRIBUTE_PRIVATE)
            with vm.create_vcpu(0) as vcpu:
                vcpu.access(BASE_GPA + 0x2010, data=b"secret", private=True)
                assert vcpu.access(BASE_GPA + 0x2010, 6, private=True) == b"secret"
                with pytest.raises(MemoryFault) as info:
                    vcpu.access(BASE_GPA + 0x2010, 1, private=False)
                exit_ = info.value
                assert (exit_.errno, exit_.gpa, exit_.size, exit_.flags) == (
                    errno.EFAULT,
                    BASE_GPA + 0x2000,
                    PAGE,
                    0,
                )
                gmem.fallocate(PUNCH, 0x2000, PAGE)
                assert vcpu.access(BASE_GPA + 0x2010, 6, private=True) == bytes(6)


class ScenarioConformance:
    """The built-in scenarios (``guestmem scenarios``) on a backend's rows.

    A backend that registers :class:`~guestmem.backend.Intents` subclasses this and names
    its backends; every applicable step of every built-in scenario must then run and meet
    what the scenario asserts for it (steps the backend cannot express are n/a, which is
    fine)::

        class TestMyScenarios(ScenarioConformance):
            backends = ("mybackend",)
    """

    #: The backends (columns) to run.
    backends: ClassVar[tuple[str, ...]] = ("sw",)

    @pytest.mark.parametrize("name", _builtin_names())
    def test_builtin_scenario(self, name: str) -> None:
        from guestmem.scenario import builtins
        from guestmem.scenario.run import run_scenario

        run = run_scenario(builtins.load(name), self.backends)
        assert [b.reason for b in run.backends if b.reason == "backend not installed"] == []
        assert run.unasserted() == []


# --- conversions never lose data -----------------------------------------------------------------
#: The guest pages conversion programs use: both ends and the middle of two 2 MiB frames, so
#: that a backend with large folios (hugepage gmem) sees partial conversions and punches.
CONVERSION_PAGES: tuple[int, ...] = tuple(
    frame * 512 + offset for frame in (0, 1) for offset in (0, 1, 2, 511)
)
#: Pages a conversion program's memslot covers (two 2 MiB frames at gpa 0).
CONVERSION_SLOT_PAGES = 1024
_CHUNK = 16  # a store writes 16 bytes at one of the first four 16-byte chunks of its page
_LOAD = 4 * _CHUNK


class ConversionReference:
    """What a guest must read back after conversions, punches and accesses, page by page.

    The destructive-conversion semantics of guest_memfd in Linux 6.18 (spec 0.2, 2.3; G-1..G-4,
    A-10, FA-8), for a memslot bound to guest_memfd whose ``userspace_addr`` is ordinary
    anonymous memory:

    * a private access reaches the page's guest_memfd folio, a shared access the memslot's
      ``userspace_addr``; a page never written reads zeros on either side;
    * an access whose privateness differs from the page's attribute is a
      ``KVM_EXIT_MEMORY_FAULT`` (:class:`~guestmem.errors.MemoryFault`) and changes nothing;
    * ``KVM_SET_MEMORY_ATTRIBUTES`` changes the attribute and nothing else: the kernel frees no
      folio and touches no byte on a conversion (it zaps stage-2 leaves only), so a page
      converted away and back without a punch reads what it held;
    * ``FALLOC_FL_PUNCH_HOLE`` frees the folios of its range: their private bytes read zero
      from then on (the next fault allocates a zeroed folio), and nothing else changes: not
      the shared bytes, not the other pages of a large folio the hole splits;
    * the destructive conversion a VMM such as QEMU makes (attribute to shared, then punch)
      is those two steps in that order.

    The VM has one memslot of :data:`CONVERSION_SLOT_PAGES` pages at gpa 0, bound to *gmem*
    from offset 0, every page private at the start (*private*).  Each step of a program is a
    tuple: ``("store", page, tag)`` and ``("load", page)`` with the
    page's own privateness, ``("mismatch", page)`` with the other one, ``("convert", page,
    npages, private)``, ``("punch", page, npages)``.  :meth:`run` applies the steps to a VM
    and checks every load and, at the end, every page of :data:`CONVERSION_PAGES`.
    """

    def __init__(self, vm: Any, vcpu: Any, gmem: Any, *, private: bool = True) -> None:
        self.vm, self.vcpu, self.gmem = vm, vcpu, gmem
        self.private: dict[int, bool] = {}
        self.default_private = private
        self.bytes: dict[tuple[int, bool], bytes] = {}

    def _private(self, page: int) -> bool:
        return self.private.get(page, self.default_private)

    def expected(self, page: int, private: bool) -> bytes:
        """The first bytes a *private* (or shared) load of *page* must return."""
        return self.bytes.get((page, private), bytes(_LOAD))

    def step(self, op: tuple[Any, ...]) -> None:
        """Apply one step to the VM and to the reference; check what it returned."""
        kind, page = op[0], op[1]
        gpa = page * PAGE
        private = self._private(page)
        if kind == "store":
            offset = op[2] % 4 * _CHUNK
            data = bytes((op[2] * 31 + i) % 251 + 1 for i in range(_CHUNK))
            self.vcpu.access(gpa + offset, data=data, private=private)
            old = bytearray(self.expected(page, private))
            old[offset : offset + _CHUNK] = data
            self.bytes[(page, private)] = bytes(old)
        elif kind == "load":
            got = self.vcpu.access(gpa, _LOAD, private=private)
            assert got == self.expected(page, private), (
                f"page {page:#x} ({'private' if private else 'shared'})"
            )
        elif kind == "mismatch":
            with pytest.raises(MemoryFault) as info:
                self.vcpu.access(gpa, 1, private=not private)
            assert (info.value.gpa, info.value.size) == (gpa, PAGE)
        elif kind == "convert":
            npages, to_private = op[2], op[3]
            attributes = uapi.KVM_MEMORY_ATTRIBUTE_PRIVATE if to_private else 0
            self.vm.set_memory_attributes(gpa, npages * PAGE, attributes)
            for p in range(page, page + npages):
                self.private[p] = to_private
        elif kind == "punch":
            npages = op[2]
            self.gmem.fallocate(PUNCH, gpa, npages * PAGE)
            for p in range(page, page + npages):
                self.bytes.pop((p, True), None)
        else:
            raise ValueError(f"unknown step {op!r}")

    def run(self, program: list[tuple[Any, ...]]) -> None:
        """Every step, then a load of every page of :data:`CONVERSION_PAGES`."""
        for op in program:
            self.step(op)
        for page in CONVERSION_PAGES:
            self.step(("load", page))


def conversion_programs(min_steps: int = 4, max_steps: int = 40) -> Any:
    """A Hypothesis strategy for :meth:`ConversionReference.run` programs (needs hypothesis).

    Stores, loads and mismatched accesses of :data:`CONVERSION_PAGES`; conversions and punches
    of one page, a few pages or a whole 2 MiB frame starting at one of them.
    """
    from hypothesis import strategies as st

    pages = st.sampled_from(CONVERSION_PAGES)
    counts = st.sampled_from((1, 2, 3))
    frames = st.sampled_from((0, 512))

    def whole_frame(op: tuple[Any, ...]) -> tuple[Any, ...]:
        return (op[0], op[1], 512, *op[3:])

    step = st.one_of(
        st.tuples(st.just("store"), pages, st.integers(0, 255)),
        st.tuples(st.just("load"), pages),
        st.tuples(st.just("mismatch"), pages),
        st.tuples(st.just("convert"), pages, counts, st.booleans()),
        st.tuples(st.just("convert"), frames, st.just(0), st.booleans()).map(whole_frame),
        st.tuples(st.just("punch"), pages, counts),
        st.tuples(st.just("punch"), frames, st.just(0)).map(whole_frame),
    )
    return st.lists(step, min_size=min_steps, max_size=max_steps)
