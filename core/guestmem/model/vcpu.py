"""vCPUs of the model: guest loads/stores, pre-fault and hypercalls (spec 2.J, 2.M)."""

from __future__ import annotations

import errno
from typing import TYPE_CHECKING

from guestmem import api, uapi
from guestmem.errors import KvmError, MemoryFault, MmioExit
from guestmem.model.mmu import Fault

if TYPE_CHECKING:
    from guestmem.model.vm import ModelVm

PAGE_SHIFT = uapi.PAGE_SHIFT
PAGE_SIZE = uapi.PAGE_SIZE
KVM_ENOSYS = 1000  # include/uapi/linux/kvm_para.h


class ModelVcpu(api.Vcpu):
    """A vCPU: every access walks the simulated stage-2 and faults like KVM would."""

    def __init__(self, vm: ModelVm, vcpu_id: int) -> None:
        self.vm = vm
        self.vcpu_id = vcpu_id
        self._closed = False
        vm.get()

    def __repr__(self) -> str:
        return f"<ModelVcpu {self.vcpu_id} of VM {self.vm.vm_id}>"

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        # kvm_vcpu_release only drops the VM reference: the vCPU stays in the VM (its id
        # stays taken, KVM_CREATE_VCPU of it is EEXIST) until the VM is destroyed.
        self.vm.put()

    def _run(self) -> None:
        """The checks of KVM_RUN before entering the guest."""
        if self._closed:
            raise KvmError(errno.EBADF, "", "vCPU file descriptor is closed")
        self.vm.host.check_alive()
        if self.vm.dead:
            raise KvmError(errno.EIO, "CAP-9", f"VM is dead: {self.vm.dead_reason}")

    def translate(self, gpa: int, *, write: bool = False, private: bool | None = None) -> int:
        """The host pfn the guest reaches at *gpa*, faulting it in like a real access."""
        self._run()
        vm = self.vm
        gfn = gpa >> PAGE_SHIFT
        is_private = vm.is_private(gfn) if private is None else private
        hit = vm.mmu.lookup(gfn)
        if hit is not None:
            pfn, spte = hit
            if spte.private == is_private and (spte.writable or not write):
                return pfn
        from guestmem.model.vm import _Emulate

        try:
            return vm.page_fault(Fault(gpa=gpa, is_private=is_private, write=write, vcpu=self))
        except _Emulate:
            raise MmioExit(gpa, 0, write) from None

    def access(
        self,
        gpa: int,
        length: int = 1,
        *,
        write: bool = False,
        data: bytes | None = None,
        private: bool | None = None,
    ) -> bytes | None:
        """A guest load or store (G-1..G-12); see :meth:`guestmem.api.Vcpu.access`."""
        if write and data is None:
            raise ValueError("a store needs data")
        if data is not None:
            write = True
            length = len(data)
        if length <= 0 or gpa < 0:
            raise ValueError("length must be positive and gpa non-negative")
        pages = []
        pos = 0
        self.vm.had_memslot = True  # the guest entered (KernelProfile.pre_fault_enospc_before_first_memslot)
        while pos < length:
            cur = gpa + pos
            n = min(length - pos, PAGE_SIZE - (cur & (PAGE_SIZE - 1)))
            try:
                pfn = self.translate(cur, write=write, private=private)
            except MmioExit:
                raise MmioExit(cur, n, write) from None
            pages.append((pfn, cur & (PAGE_SIZE - 1), pos, n))
            pos += n
        host = self.vm.host
        self.vm.count("guest_accesses")
        if data is not None:
            for pfn, off, p, n in pages:
                host.write(pfn, off, data[p : p + n])
            return None
        return b"".join(host.read(pfn, off, n) for pfn, off, _, n in pages)

    def pre_fault_memory(self, gpa: int, size: int, flags: int = 0) -> int:
        """``KVM_PRE_FAULT_MEMORY`` (PF-1..PF-4); returns the size left unfaulted."""
        self._run()
        vm = self.vm
        if flags:
            raise KvmError(errno.EINVAL, "PF-1", f"flags must be 0, got {flags:#x}")
        if gpa % PAGE_SIZE or size % PAGE_SIZE or size == 0 or gpa + size > uapi.U64_MAX:
            raise KvmError(errno.EINVAL, "PF-1", "gpa/size unaligned, size zero, or gpa + size wraps")
        if not vm.pre_fault_allowed:
            raise KvmError(errno.EOPNOTSUPP, "PF-2", "KVM_PRE_FAULT_MEMORY is not allowed for this VM type")
        if vm.profile.pre_fault_enospc_before_first_memslot and not vm.had_memslot:
            raise KvmError(errno.ENOSPC, "PF-2", "no MMU root can be loaded before the first memslot")
        if not vm.profile.tdp_mmu:
            raise KvmError(errno.EOPNOTSUPP, "PF-2", "pre-faulting needs the TDP MMU")
        full = size
        from guestmem.model.vm import _Emulate

        while size:
            gfn = gpa >> PAGE_SHIFT
            private = vm.has_private_mem and vm.is_private(gfn)  # PF-3
            try:
                if vm.dead:  # kvm_tdp_map_page: KVM_REQ_VM_DEAD before each attempt
                    raise KvmError(errno.EIO, "PF-4", f"VM is dead: {vm.dead_reason}")
                vm.page_fault(Fault(gpa=gpa, is_private=private, write=False, prefetch=True, vcpu=self))
            except _Emulate:
                err: KvmError = KvmError(errno.ENOENT, "PF-4", f"no memslot at gpa {gpa:#x}")
            except MemoryFault as exc:  # pre-fault reports the errno, no exit
                err = KvmError(exc.errno or errno.EFAULT, exc.rule, f"pre-fault of gpa {gpa:#x} failed")
            except KvmError as exc:
                err = exc
            else:
                level = vm.mapping_level(gfn) or uapi.PG_LEVEL_4K
                span = PAGE_SIZE << (9 * (level - 1))
                step = min(size, (gpa & ~(span - 1)) + span - gpa)
                gpa += step
                size -= step
                continue
            if size == full:
                raise err
            break
        vm.count("pre_faulted_bytes", full - size)
        return size

    def hypercall(self, nr: int, *args: int) -> int:
        """The guest executes hypercall *nr*; the VM's backend answers (``-KVM_ENOSYS`` if none)."""
        self._run()
        self.vm.count("hypercalls")
        result = self.vm.hooks.hypercall(vcpu=self, nr=nr, args=tuple(args))
        return -KVM_ENOSYS if result is None else int(result)
