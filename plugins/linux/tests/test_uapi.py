"""The real kernel through the uAPI face: errno-exact outcomes of the spec rules.

These tests run the real ioctls; they pin what guestmem_linux reports (the errno, the
exception class) and the kernel behaviours the model is compared against.
"""

from __future__ import annotations

import errno
import os

import pytest

import guestmem
from guestmem import HostSigbus, KvmError, uapi
from guestmem_linux.kvm import LinuxKvm, LinuxVm
from guestmem_linux.testing import kvm_unavailable

MMAP = uapi.GUEST_MEMFD_FLAG_MMAP
INIT_SHARED = uapi.GUEST_MEMFD_FLAG_INIT_SHARED
KEEP = uapi.FALLOC_FL_KEEP_SIZE
PUNCH = uapi.FALLOC_FL_KEEP_SIZE | uapi.FALLOC_FL_PUNCH_HOLE
GMEM = uapi.KVM_MEM_GUEST_MEMFD
PAGE = uapi.PAGE_SIZE
DIRTY = uapi.KVM_MEM_LOG_DIRTY_PAGES


def errno_of(exc: pytest.ExceptionInfo[KvmError]) -> int:
    assert isinstance(exc.value, KvmError)
    return int(exc.value.errno or 0)


# --- capabilities ---------------------------------------------------------------------------
def test_cap_guest_memfd_flags_system_and_default_vm(kvm: LinuxKvm, vm: LinuxVm) -> None:
    """CAP-1..CAP-3: gmem on every VM type; DEFAULT VM supports MMAP|INIT_SHARED."""
    assert kvm.check_extension(uapi.KVM_CAP_GUEST_MEMFD) == 1
    assert kvm.check_extension(uapi.KVM_CAP_GUEST_MEMFD_FLAGS) == MMAP | INIT_SHARED
    assert vm.check_extension(uapi.KVM_CAP_GUEST_MEMFD_FLAGS) == MMAP | INIT_SHARED


def test_set_memory_attributes_without_the_cap_is_enotty(kvm: LinuxKvm, vm: LinuxVm) -> None:
    """A-1 (ioctl not built) or A-4 (PRIVATE unsupported on a DEFAULT VM)."""
    with pytest.raises(KvmError) as info:
        vm.set_memory_attributes(0, PAGE, uapi.KVM_MEMORY_ATTRIBUTE_PRIVATE)
    if kvm.check_extension(uapi.KVM_CAP_MEMORY_ATTRIBUTES) == 0:
        assert errno_of(info) in (errno.ENOTTY, errno.EINVAL)
    else:
        assert errno_of(info) == errno.EINVAL
    assert "KVM_SET_MEMORY_ATTRIBUTES" in str(info.value)


# --- KVM_CREATE_GUEST_MEMFD and plain file operations ---------------------------------------
@pytest.mark.parametrize("size", [0, 100, PAGE + 1, 1 << 63])
def test_create_bad_size_is_einval(vm: LinuxVm, size: int) -> None:
    """C-4."""
    with pytest.raises(KvmError) as info:
        vm.create_guest_memfd(size)
    assert errno_of(info) == errno.EINVAL
    assert "KVM_CREATE_GUEST_MEMFD" in str(info.value)


def test_create_unknown_flag_is_einval_before_size(vm: LinuxVm) -> None:
    """C-3 is checked before C-4."""
    with pytest.raises(KvmError) as info:
        vm.create_guest_memfd(0, 1 << 2)
    assert errno_of(info) == errno.EINVAL


def test_file_operations(vm: LinuxVm) -> None:
    """F-1 read/write, F-2 fstat, F-3 truncate."""
    with vm.create_guest_memfd(4 * PAGE) as gmem, vm.create_guest_memfd(PAGE) as other:
        for call in (lambda: gmem.read(1), lambda: gmem.write(b"x"), lambda: gmem.truncate(0)):
            with pytest.raises(KvmError) as info:
                call()
            assert errno_of(info) == errno.EINVAL
        st = gmem.fstat()
        assert st.st_size == 4 * PAGE
        assert st.st_ino != other.fstat().st_ino


# --- fallocate -------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("mode", "offset", "length", "err"),
    [
        (0, 0, PAGE, errno.EOPNOTSUPP),  # FA-2
        (KEEP | 0x4, 0, PAGE, errno.EOPNOTSUPP),  # FA-3
        (KEEP, 1, PAGE, errno.EINVAL),  # FA-4
        (PUNCH, 0, 1, errno.EINVAL),  # FA-4
        (KEEP, 4 * PAGE, PAGE, errno.EINVAL),  # FA-5
        (KEEP, 3 * PAGE, 2 * PAGE, errno.EINVAL),  # FA-5
        (KEEP, -PAGE, PAGE, errno.EINVAL),  # FA-1
        (KEEP, 0, 0, errno.EINVAL),  # FA-1
    ],
)
def test_fallocate_errors(vm: LinuxVm, mode: int, offset: int, length: int, err: int) -> None:
    with vm.create_guest_memfd(4 * PAGE) as gmem, pytest.raises(KvmError) as info:
        gmem.fallocate(mode, offset, length)
    assert errno_of(info) == err


def test_fallocate_allocate_and_punch_beyond_eof(vm: LinuxVm) -> None:
    """FA-6 allocate in range; FA-7 punch beyond EOF succeeds."""
    with vm.create_guest_memfd(4 * PAGE) as gmem:
        gmem.fallocate(KEEP, 0, 4 * PAGE)
        gmem.fallocate(PUNCH, 16 * PAGE, PAGE)
        gmem.fallocate(PUNCH, 0, 64 * PAGE)


# --- mmap and host faults --------------------------------------------------------------------
def test_mmap_without_flag_is_enodev(vm: LinuxVm) -> None:
    """M-1."""
    with vm.create_guest_memfd(PAGE) as gmem, pytest.raises(KvmError) as info:
        gmem.mmap(PAGE)
    assert errno_of(info) == errno.ENODEV


def test_mmap_private_is_einval(vm: LinuxVm) -> None:
    """M-2."""
    with vm.create_guest_memfd(PAGE, MMAP | INIT_SHARED) as gmem, pytest.raises(KvmError) as info:
        gmem.mmap(PAGE, shared=False)
    assert errno_of(info) == errno.EINVAL


def test_host_access_to_private_file_is_sigbus_not_death(vm: LinuxVm) -> None:
    """M-4: every offset of a file without INIT_SHARED; the process survives."""
    with vm.create_guest_memfd(2 * PAGE, MMAP) as gmem, gmem.mmap(2 * PAGE) as mapping:
        for call in (lambda: mapping.read(PAGE, 8), lambda: mapping.write(0, b"x")):
            with pytest.raises(HostSigbus) as info:
                call()
            assert info.value.rule == "M-4"


def test_host_access_beyond_eof_is_sigbus(vm: LinuxVm) -> None:
    """M-3: mmap longer than the file succeeds; a fault beyond i_size is SIGBUS."""
    with vm.create_guest_memfd(PAGE, MMAP | INIT_SHARED) as gmem, gmem.mmap(3 * PAGE) as mapping:
        assert mapping.read(0, 4) == bytes(4)
        with pytest.raises(HostSigbus) as info:
            mapping.read(PAGE - 2, 4)  # straddles EOF
        assert info.value.rule == "M-3"
        assert info.value.address == mapping.address + PAGE


def test_shared_mapping_round_trip_and_punch_zeroes(vm: LinuxVm) -> None:
    """M-5 zero-filled first touch; M-10 punch unmaps and the next touch reads zeroes."""
    with (
        vm.create_guest_memfd(2 * PAGE, MMAP | INIT_SHARED) as gmem,
        gmem.mmap(2 * PAGE) as a,
        gmem.mmap(PAGE, offset=PAGE) as b,
    ):
        a.write(PAGE + 5, b"guestmem")
        assert b.read(5, 8) == b"guestmem"
        gmem.fallocate(PUNCH, PAGE, PAGE)
        assert b.read(5, 8) == bytes(8)
        assert a.read(PAGE + 5, 8) == bytes(8)


def test_mapping_outlives_the_file(vm: LinuxVm) -> None:
    """L-6: closing the fd leaves the mapping usable."""
    gmem = vm.create_guest_memfd(PAGE, MMAP | INIT_SHARED)
    with gmem.mmap(PAGE) as mapping:
        mapping.write(0, b"kept")
        gmem.close()
        assert mapping.read(0, 4) == b"kept"


def test_host_access_outside_the_mapping_is_efault(kvm: LinuxKvm) -> None:
    with kvm.mmap_anonymous(PAGE) as mapping, pytest.raises(KvmError) as info:
        mapping.read(PAGE - 1, 2)
    assert errno_of(info) == errno.EFAULT


# --- memslots --------------------------------------------------------------------------------
def test_v1_rejects_guest_memfd_flag(vm: LinuxVm) -> None:
    """S-2."""
    with pytest.raises(KvmError) as info:
        vm.set_user_memory_region(0, GMEM, 0, PAGE, 0)
    assert errno_of(info) == errno.EINVAL
    assert "KVM_SET_USER_MEMORY_REGION" in str(info.value)


def test_gmem_slot_rules(kvm: LinuxKvm, vm: LinuxVm) -> None:
    """S-14 GPA overlap EEXIST, B-5 offset overlap EINVAL, S-11 re-issue EINVAL, B-11 rebind."""
    with vm.create_guest_memfd(4 * PAGE) as gmem:
        vm.set_user_memory_region2(0, GMEM, 0, 2 * PAGE, 0, gmem, 0)
        cases = [
            ((1, GMEM, PAGE, PAGE, 0, gmem, 2 * PAGE), errno.EEXIST),  # S-14
            ((1, GMEM, 8 * PAGE, PAGE, 0, gmem, PAGE), errno.EINVAL),  # B-5
            ((0, GMEM, 0, 2 * PAGE, 0, gmem, 0), errno.EINVAL),  # S-11
            ((1, GMEM, 8 * PAGE, PAGE, 0, gmem, 4 * PAGE), errno.EINVAL),  # B-4
            ((1, GMEM | DIRTY, 8 * PAGE, PAGE, 0, gmem, 2 * PAGE), errno.EINVAL),  # S-4
        ]
        for args, err in cases:
            with pytest.raises(KvmError) as info:
                vm.set_user_memory_region2(*args)
            assert errno_of(info) == err, args
        vm.set_user_memory_region2(0, 0, 0, 0, 0)  # S-9 delete
        vm.set_user_memory_region2(1, GMEM, 8 * PAGE, 2 * PAGE, 0, gmem.fileno(), 0)  # B-11


def test_bind_foreign_closed_and_non_gmem_files(kvm: LinuxKvm, vm: LinuxVm) -> None:
    """B-1 closed fd EBADF, B-2 not a guest_memfd EINVAL, B-3 another VM's gmem EINVAL."""
    with kvm.create_vm() as other, other.create_guest_memfd(PAGE) as foreign:
        with pytest.raises(KvmError) as info:
            vm.set_user_memory_region2(0, GMEM, 0, PAGE, 0, foreign, 0)
        assert errno_of(info) == errno.EINVAL
    with pytest.raises(KvmError) as info:
        vm.set_user_memory_region2(0, GMEM, 0, PAGE, 0, kvm, 0)
    assert errno_of(info) == errno.EINVAL
    closed = vm.create_guest_memfd(PAGE)
    fd = closed.fileno()
    closed.close()
    with pytest.raises(KvmError) as info:
        vm.set_user_memory_region2(0, GMEM, 0, PAGE, 0, fd, 0)
    assert errno_of(info) == errno.EBADF


def test_close_gmem_while_bound(vm: LinuxVm) -> None:
    """L-2: closing a bound gmem is legal; the slot stays (delete still works, S-9)."""
    gmem = vm.create_guest_memfd(PAGE)
    vm.set_user_memory_region2(3, GMEM, 0, PAGE, 0, gmem, 0)
    gmem.close()
    vm.set_user_memory_region2(3, GMEM, 0, 0, 0, None, 0)


# --- lifetime and descriptors ----------------------------------------------------------------
def test_vm_close_releases_vcpus_and_runner(kvm: LinuxKvm) -> None:
    before = len(os.listdir("/proc/self/fd"))
    vm = kvm.create_vm()
    vcpus = [vm.create_vcpu(i) for i in range(3)]
    vm.close()
    assert all(v.closed for v in vcpus)
    assert len(os.listdir("/proc/self/fd")) == before
    with pytest.raises(KvmError) as info:
        vm.create_guest_memfd(PAGE)
    assert errno_of(info) == errno.EBADF


def test_gmem_pins_the_vm(kvm: LinuxKvm) -> None:
    """L-1/FA-11: fallocate works after the VM fd is closed."""
    vm = kvm.create_vm()
    with vm.create_guest_memfd(PAGE) as gmem:
        vm.close()
        gmem.fallocate(KEEP, 0, PAGE)


def test_closed_guest_memfd_object_is_ebadf_after_the_flag_checks(vm: LinuxVm) -> None:
    """S-4 is evaluated before the bind's fget (B-1); a closed object reads as fd 0xffffffff."""
    gmem = vm.create_guest_memfd(PAGE)
    gmem.close()
    with pytest.raises(KvmError) as info:
        vm.set_user_memory_region2(0, GMEM | DIRTY, 0, PAGE, 0, gmem, 0)
    assert errno_of(info) == errno.EINVAL
    with pytest.raises(KvmError) as info:
        vm.set_user_memory_region2(0, GMEM, 0, PAGE, 0, gmem, 0)
    assert errno_of(info) == errno.EBADF


def test_host_access_after_munmap_is_efault(kvm: LinuxKvm) -> None:
    mapping = kvm.mmap_anonymous(PAGE)
    mapping.close()
    with pytest.raises(KvmError) as info:
        mapping.read(0, 1)
    assert errno_of(info) == errno.EFAULT


# --- host mappings ------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["linux", "sw"])
def test_a_mapping_is_as_long_as_what_the_kernel_mapped(backend: str) -> None:
    """``mmap(2)`` reads its length as a ``size_t``: 2**64 + one page maps one page
    (``ksys_mmap_pgoff`` -> ``do_mmap`` gets ``PAGE_ALIGN(len)`` of the truncated value).
    The mapping records that length and every host access is bounded by it: past it, at an
    offset of 2**63 or more too, EFAULT and nothing read or written elsewhere; the model
    answers the same."""
    if backend == "linux" and kvm_unavailable():
        pytest.skip(kvm_unavailable() or "")
    with guestmem.open(backend) as kvm, kvm.mmap_anonymous((1 << 64) + PAGE) as mapping:
        assert mapping.length == PAGE
        mapping.write(PAGE - 2, b"ok")
        assert mapping.read(PAGE - 2, 2) == b"ok"
        for access in (
            lambda: mapping.read(PAGE, 8),
            lambda: mapping.read(PAGE - 2, 3),
            lambda: mapping.read(1 << 63, 1),
            lambda: mapping.write(1 << 63, b"x"),
            lambda: mapping.write((1 << 64) - 1, b"x"),
        ):
            with pytest.raises(KvmError) as info:
                access()
            assert errno_of(info) == errno.EFAULT


def test_snapshot_is_not_implemented_on_the_real_kernel(kvm: LinuxKvm, vm: LinuxVm) -> None:
    """Userspace cannot read the kernel's memslots, attributes, stage-2 or hardware tables:
    ``kvm.snapshot()`` and ``vm.snapshot()`` say so (NotImplementedError), they never guess."""
    with pytest.raises(NotImplementedError, match="not readable from userspace"):
        kvm.snapshot()
    with pytest.raises(NotImplementedError, match="not readable from userspace"):
        vm.snapshot()
