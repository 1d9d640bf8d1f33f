"""Guest accesses that really run a vCPU (guest program of guestmem_linux.guest)."""

from __future__ import annotations

import errno
import threading

import pytest

from guestmem import InternalErrorExit, KvmError, MmioExit, uapi
from guestmem_linux import guest
from guestmem_linux.kvm import LinuxKvm, LinuxVm
from guestmem_linux.testing import is_kvm_pvm, open_fds

PAGE = uapi.PAGE_SIZE
MMAP_SHARED = uapi.GUEST_MEMFD_FLAG_MMAP | uapi.GUEST_MEMFD_FLAG_INIT_SHARED
GMEM = uapi.KVM_MEM_GUEST_MEMFD


def test_load_and_store_through_an_anonymous_slot(kvm: LinuxKvm, vm: LinuxVm) -> None:
    with kvm.mmap_anonymous(4 * PAGE) as ram:
        ram.write(PAGE - 2, b"abcd")
        vm.set_user_memory_region(0, 0, 0x10_0000, 4 * PAGE, ram.address)
        vcpu = vm.create_vcpu(0)
        assert vcpu.access(0x10_0000 + PAGE - 2, 4) == b"abcd"  # crosses a page
        assert vcpu.access(0x10_0001, write=True, data=b"XYZ") is None
        assert ram.read(0, 4) == b"\0XYZ"


def test_access_without_memslot_is_mmio_exit(vm: LinuxVm) -> None:
    """G-4 (shared access, no slot): KVM_EXIT_MMIO at the first unbacked byte."""
    vcpu = vm.create_vcpu(0)
    for write in (False, True, False):
        with pytest.raises(MmioExit) as info:
            vcpu.access(0x2000, 2, write=write, data=b"ab" if write else None)
        assert (info.value.gpa, info.value.is_write) == (0x2000, write)


def test_access_running_off_the_end_of_a_slot(kvm: LinuxKvm, vm: LinuxVm) -> None:
    with kvm.mmap_anonymous(PAGE) as ram:
        vm.set_user_memory_region(0, 0, 0x10_0000, PAGE, ram.address)
        vcpu = vm.create_vcpu(0)
        with pytest.raises(MmioExit) as info:
            vcpu.access(0x10_0000 + PAGE - 1, 2)
        assert info.value.gpa == 0x10_0000 + PAGE
        assert vcpu.access(0x10_0000, 1) == b"\0"  # the vCPU is clean after the exit


def test_gmem_only_slot_follows_the_host_profile(vm: LinuxVm) -> None:
    """M-7 / G-5 on this host: which path a shared access to a gmem-only slot takes.

    Upstream 6.18 with the TDP MMU serves it from gmem whatever userspace_addr is; the
    kvm_pvm shadow MMU walks userspace_addr (0 there: no VMA -> KVM_EXIT_MMIO).  See
    docs/profiles.md.
    """
    with vm.create_guest_memfd(2 * PAGE, MMAP_SHARED) as gmem, gmem.mmap(2 * PAGE) as mapping:
        mapping.write(0, b"gmem")
        vm.set_user_memory_region2(1, GMEM, 0x20_0000, PAGE, 0, gmem, 0)
        vm.set_user_memory_region2(2, GMEM, 0x30_0000, PAGE, mapping.address, gmem, PAGE)
        vcpu = vm.create_vcpu(0)
        if is_kvm_pvm():
            with pytest.raises(MmioExit):
                vcpu.access(0x20_0000, 4)
            # served through userspace_addr (file offset 0), not guest_memfd_offset (PAGE)
            assert vcpu.access(0x30_0000, 4) == b"gmem"
        else:
            assert vcpu.access(0x20_0000, 4) == b"gmem"
            assert vcpu.access(0x30_0000, 4) == bytes(4)


def test_guest_sees_host_writes_and_punch(vm: LinuxVm) -> None:
    """M-7 coherence, FA-8 punch: the guest reads zeroes afterwards."""
    with vm.create_guest_memfd(PAGE, MMAP_SHARED) as gmem, gmem.mmap(PAGE) as mapping:
        vm.set_user_memory_region2(1, GMEM, 0x20_0000, PAGE, mapping.address, gmem, 0)
        vcpu = vm.create_vcpu(0)
        vcpu.access(0x20_0010, write=True, data=b"from guest")
        assert mapping.read(0x10, 10) == b"from guest"
        gmem.fallocate(uapi.FALLOC_FL_KEEP_SIZE | uapi.FALLOC_FL_PUNCH_HOLE, 0, PAGE)
        assert vcpu.access(0x20_0010, 10) == bytes(10)


def test_guest_access_to_private_gmem_mapping(vm: LinuxVm) -> None:
    """M-4 seen from the guest: the hva faults with SIGBUS; KVM reports an exit, never a crash."""
    with vm.create_guest_memfd(PAGE, uapi.GUEST_MEMFD_FLAG_MMAP) as gmem, gmem.mmap(PAGE) as mapping:
        vm.set_user_memory_region2(1, GMEM, 0x20_0000, PAGE, mapping.address, gmem, 0)
        vcpu = vm.create_vcpu(0)
        with pytest.raises((MmioExit, InternalErrorExit)):
            vcpu.access(0x20_0000, 4)


def test_private_access_is_refused(vm: LinuxVm) -> None:
    vcpu = vm.create_vcpu(0)
    with pytest.raises(KvmError) as info:
        vcpu.access(0x1000, private=True)
    assert info.value.errno == errno.EINVAL


def test_runner_range_is_reserved(kvm: LinuxKvm, vm: LinuxVm) -> None:
    """The runner slot's GPA range may not be used by the program's own slots."""
    vcpu = vm.create_vcpu(0)
    with pytest.raises(KvmError) as info:
        vcpu.access(guest.RUNNER_GPA, 1)
    assert info.value.errno == errno.EINVAL
    with kvm.mmap_anonymous(PAGE) as ram:
        vm.set_user_memory_region(0, 0, guest.RUNNER_GPA, PAGE, ram.address)
        with pytest.raises(KvmError) as info:
            vcpu.access(0, 1)
        assert info.value.errno == errno.EEXIST
        assert "runner" in str(info.value)


def test_pre_fault_memory(kvm: LinuxKvm, vm: LinuxVm) -> None:
    """PF-1 bad flags/alignment EINVAL; without KVM_CAP_PRE_FAULT_MEMORY the ioctl fails."""
    vcpu = vm.create_vcpu(0)
    for args in ((0, PAGE, 1), (1, PAGE, 0), (0, 0, 0)):
        with pytest.raises(KvmError) as info:
            vcpu.pre_fault_memory(*args)
        assert info.value.errno == errno.EINVAL
    if kvm.check_extension(uapi.KVM_CAP_PRE_FAULT_MEMORY) == 0:
        with pytest.raises(KvmError) as info:
            vcpu.pre_fault_memory(0, PAGE)
        # PF-2: EOPNOTSUPP; kvm_pvm answers ENOSPC before the vCPU first ran.
        assert info.value.errno in (errno.EOPNOTSUPP, errno.ENOSPC)
        assert "KVM_PRE_FAULT_MEMORY" in str(info.value)


def test_many_accesses_leak_nothing(kvm: LinuxKvm) -> None:
    before = open_fds()
    for _ in range(3):
        with kvm.create_vm() as vm, kvm.mmap_anonymous(PAGE) as ram:
            vm.set_user_memory_region(0, 0, 0, PAGE, ram.address)
            vcpu = vm.create_vcpu(0)
            for i in range(50):
                vcpu.access(i, write=True, data=bytes([i]))
            assert vcpu.access(0, 50) == bytes(range(50))
    assert open_fds() == before


def test_memory_fault_exit_is_reported_as_memory_fault(vm: LinuxVm, monkeypatch: pytest.MonkeyPatch) -> None:
    """G-3/G-13: KVM_RUN -1/EFAULT with exit_reason 39 carries kvm_run.memory_fault.

    This host cannot produce the exit (no private memory), so KVM_RUN's failure is
    simulated and kvm_run is filled in as the kernel would.
    """
    import ctypes
    import struct

    from guestmem import MemoryFault
    from guestmem_linux import _sys
    from guestmem_linux import kvm as linux_kvm

    vcpu = vm.create_vcpu(0)
    run = vcpu._run
    ctypes.memmove(run + 8, struct.pack("<I", uapi.KVM_EXIT_MEMORY_FAULT), 4)
    fault = struct.pack("<QQQ", uapi.KVM_MEMORY_EXIT_FLAG_PRIVATE, 0x5000, PAGE)
    ctypes.memmove(run + _sys.RUN_UNION, fault, 24)

    def failing_run(fd: int, request: int, arg: int = 0) -> int:
        assert request == uapi.KVM_RUN
        raise KvmError(errno.EFAULT, "", "KVM_RUN")

    monkeypatch.setattr(linux_kvm._sys, "ioctl_int", failing_run)
    with pytest.raises(MemoryFault) as info:
        vcpu._kvm_run()
    assert (info.value.errno, info.value.gpa, info.value.size) == (errno.EFAULT, 0x5000, PAGE)
    assert info.value.is_private and info.value.rule == "G-3"


def test_vcpus_of_several_threads_read_what_they_stored(kvm: LinuxKvm, vm: LinuxVm) -> None:
    """The kernel runs vCPUs of several threads at once; the runner's one bounce buffer per
    VM is taken in turns, so no thread reads another's bytes."""
    with kvm.mmap_anonymous(4 * PAGE) as ram:
        vm.set_user_memory_region(0, 0, 0x10_0000, 4 * PAGE, ram.address)
        vcpus = [vm.create_vcpu(i) for i in range(4)]
        wrong: list[tuple[int, bytes]] = []

        def run(i: int) -> None:
            gpa = 0x10_0000 + i * PAGE
            for n in range(200):
                data = f"vcpu {i} store {n}".encode()
                vcpus[i].access(gpa, data=data)
                back = vcpus[i].access(gpa, len(data))
                if back != data:
                    wrong.append((i, back))

        threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not wrong, wrong[:3]
