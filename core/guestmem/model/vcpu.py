"""vCPUs of the model: guest loads/stores, pre-fault, hypercalls and vCPU ioctls (spec 2.J, 2.M)."""

from __future__ import annotations

import errno
from typing import TYPE_CHECKING, Any

from guestmem import api, cabi, uapi
from guestmem.backend import Fault, VcpuView
from guestmem.errors import KvmError, MemoryFault, MmioExit
from guestmem.model import fault as stage2
from guestmem.model import x86
from guestmem.model.operation import uapi_call

if TYPE_CHECKING:
    from guestmem.model.kvm import ModelKvm
    from guestmem.model.vm import ModelVm

PAGE_SHIFT = uapi.PAGE_SHIFT
PAGE_SIZE = uapi.PAGE_SIZE
TLB_ENTRIES = 4096  # bounds the cache; a full one is dropped at the next change
MAX_ACCESS = api.MAX_ACCESS
#: The most stage-2 faults one ``KVM_PRE_FAULT_MEMORY`` of the model makes before it returns
#: what is left, as the kernel's loop does when a signal is pending (PF-4): a model limit
#: that bounds the call's cost (docs/model.md).  Userspace loops until nothing is left.
PRE_FAULT_BATCH = 1 << 14


class ModelVcpu(api.Vcpu):
    """A vCPU: every access walks the simulated stage-2 and faults like KVM would."""

    def __init__(self, vm: ModelVm, vcpu_id: int) -> None:
        self.vm = vm
        self.kvm: ModelKvm = vm.kvm
        self.vcpu_id = vcpu_id
        self._closed = False
        # A translation cache (gfn -> (pfn, leaf, attribute privateness)), valid while the
        # VM's Mmu.gen is _tlb_gen: every leaf or attribute change bumps it.
        self._tlb: dict[int, tuple[int, Any, bool]] = {}
        self._tlb_gen = -1
        self.view = VcpuView(self)
        self.view.arch = vm.hooks.vcpu_init(self.view)
        vm.get()

    def __repr__(self) -> str:
        return f"<ModelVcpu {self.vcpu_id} of VM {self.vm.vm_id}>"

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def backend_view(self) -> VcpuView:
        """:func:`guestmem.backend.view` of this vCPU."""
        return self.view

    @uapi_call
    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        # kvm_vcpu_release only drops the VM reference: the vCPU stays in the VM (its id
        # stays taken, KVM_CREATE_VCPU of it is EEXIST) until the VM is destroyed.  It runs
        # when the operation under way ends (fput), so a KVM_RUN in progress finishes first.
        self.kvm.fput(self.vm.put, held=True)

    def _ioctl(self) -> None:
        """The checks of ``kvm_vcpu_ioctl`` before any command."""
        if self._closed:
            raise KvmError(errno.EBADF, "", "vCPU file descriptor is closed")
        self.vm.host.check_alive()
        if self.vm.dead:
            raise KvmError(errno.EIO, "CAP-9", f"VM is dead: {self.vm.dead_reason}")

    def _run(self) -> None:
        """The checks of KVM_RUN before entering the guest (the backend's ``vcpu_pre_run``)."""
        self._ioctl()
        self.vm.hooks.vcpu_pre_run(self.view)

    def check_run(self) -> None:
        """The checks of ``KVM_RUN`` before the guest is entered, for what runs inside it
        without a uAPI call of its own (:meth:`guestmem.backend.VcpuView.check_run`)."""
        self._run()

    def translate(self, gpa: int, *, write: bool = False, private: bool | None = None) -> int:
        """The host pfn the guest reaches at *gpa*, faulting it in like a real access; a
        negative *gpa* is EINVAL, as :func:`guestmem.api.access_arguments` answers an
        access there (no instruction reaches it)."""
        gpa = cabi.index(gpa, "gpa")
        if gpa < 0:
            raise KvmError(errno.EINVAL, "", f"a guest page walk at gpa {gpa:#x}: no such address")
        self._run()
        return self._translate(gpa, write, private, 0)

    def _translate(self, gpa: int, write: bool, private: bool | None, length: int) -> int:
        vm = self.vm
        gfn = gpa >> PAGE_SHIFT
        mmu = vm.mmu
        if self._tlb_gen != mmu.gen:
            self._tlb.clear()
            self._tlb_gen = mmu.gen
        cached = self._tlb.get(gfn)
        if cached is None:
            attr_private = vm.is_private(gfn)
            hit = mmu.lookup(gfn)
            if hit is not None and len(self._tlb) < TLB_ENTRIES:
                self._tlb[gfn] = (hit[0], hit[1], attr_private)
        else:
            attr_private = cached[2]
            hit = cached[0], cached[1]
        is_private = attr_private if private is None else private
        if hit is None or hit[1].private != is_private or not (hit[1].writable or not write):
            fault = Fault(gfn, is_private, write, vcpu=self.view)
            try:
                stage2.page_fault(vm, fault)
            except stage2.Emulate:
                raise MmioExit(gpa, 0, write) from None
            except MemoryFault as exc:
                stage2.memory_fault_exit(vm, exc)
                raise
            assert fault.pfn is not None, "a fault that returned resolved no pfn"
            pfn: int = fault.pfn
            if self.kvm.task_work and self.kvm.run_task_work(guest_entry=True):
                # KVM_RUN runs task_work before it enters the guest again (a file a hook
                # closed is released, its mappings zapped): the access is made anew.
                return self._translate(gpa, write, private, length)
        else:
            pfn = hit[0]
        if vm.hooks.implemented("guest_access"):
            vm.hooks.guest_access(self.view, gfn, pfn, write, is_private, gpa & (PAGE_SIZE - 1), length)
        return pfn

    @uapi_call
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
        # The arguments as every backend takes them (api.access_arguments), checked inline
        # for the common case: an int gpa and length, or bytes data.
        if data is None:
            if write or gpa.__class__ is not int or length.__class__ is not int or gpa < 0:
                gpa, length, data = api.access_arguments(gpa, length, write, data)
            elif not 0 < length <= MAX_ACCESS:
                api.access_arguments(gpa, length, write, data)
        elif gpa.__class__ is int and data.__class__ is bytes and gpa >= 0 and 0 < len(data) <= MAX_ACCESS:
            length = len(data)
        else:
            gpa, length, data = api.access_arguments(gpa, length, write, data)
        write = data is not None
        self._run()
        vm = self.vm
        vm.slots.ever_used = True  # the guest entered (KernelProfile.pre_fault_enospc_before_first_memslot)
        offset = gpa & (PAGE_SIZE - 1)
        if offset + length <= PAGE_SIZE:  # one page, the common case
            try:
                pfn = self._translate(gpa, write, private, length)
            except MmioExit:
                raise MmioExit(gpa, length, write) from None
            vm.counters["guest_accesses"] += 1
            if data is not None:
                vm.host.write(pfn, offset, data)
                return None
            return vm.host.read(pfn, offset, length)
        pages = []
        pos = 0
        while pos < length:
            if pos and self.vm.dead:  # a hook killed the VM in the middle of the access
                raise KvmError(errno.EIO, "CAP-9", f"VM is dead: {self.vm.dead_reason}")
            cur = gpa + pos
            n = min(length - pos, PAGE_SIZE - (cur & (PAGE_SIZE - 1)))
            try:
                pfn = self._translate(cur, write, private, n)
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

    @uapi_call
    def pre_fault_memory(self, gpa: int, size: int, flags: int = 0) -> int:
        """``KVM_PRE_FAULT_MEMORY`` (PF-1..PF-4); returns the size left unfaulted.

        The arguments are the fields of :class:`guestmem.uapi.KvmPreFaultMemory`.  One call
        makes at most :data:`PRE_FAULT_BATCH` faults, then returns what is left.
        """
        gpa, size, flags = uapi.KvmPreFaultMemory.of(gpa, size, flags)
        self._ioctl()
        vm = self.vm
        if flags:
            raise KvmError(errno.EINVAL, "PF-1", f"flags must be 0, got {flags:#x}")
        if gpa % PAGE_SIZE or size % PAGE_SIZE or size == 0 or gpa + size > uapi.U64_MAX:
            raise KvmError(errno.EINVAL, "PF-1", "gpa/size unaligned, size zero, or gpa + size wraps")
        if not vm.pre_fault_allowed:
            raise KvmError(errno.EOPNOTSUPP, "PF-2", "KVM_PRE_FAULT_MEMORY is not allowed for this VM type")
        if vm.profile.pre_fault_enospc_before_first_memslot and not vm.slots.ever_used:
            raise KvmError(errno.ENOSPC, "PF-2", "no MMU root can be loaded before the first memslot")
        if not vm.profile.tdp_mmu:
            raise KvmError(errno.EOPNOTSUPP, "PF-2", "pre-faulting needs the TDP MMU")
        full = size
        batch = PRE_FAULT_BATCH
        while size:
            if not batch:  # as a pending signal would: stop, report what is left
                break
            batch -= 1
            gfn = gpa >> PAGE_SHIFT
            private = vm.has_private_mem and vm.is_private(gfn)  # PF-3
            try:
                if vm.dead:  # kvm_tdp_map_page: KVM_REQ_VM_DEAD before each attempt
                    raise KvmError(errno.EIO, "PF-4", f"VM is dead: {vm.dead_reason}")
                leaf = vm.mmu.leaf(gfn)
                if leaf is None or leaf.private != private:
                    # one kvm_tdp_map_page per leaf; a run of uniform pages at once
                    fault = Fault(
                        gfn, private, False, prefetch=True, vcpu=self.view, npages=size >> PAGE_SHIFT
                    )
                    stage2.page_fault(vm, fault)
                    leaf = vm.mmu.leaf(gfn)
                    assert leaf is not None, "a pre-fault that returned installed no leaf"
            except stage2.Emulate:
                err: KvmError = KvmError(errno.ENOENT, "PF-4", f"no memslot at gpa {gpa:#x}")
            except MemoryFault as exc:  # pre-fault reports the errno, no exit
                err = KvmError(exc.errno or errno.EFAULT, exc.rule, f"pre-fault of gpa {gpa:#x} failed")
            except KvmError as exc:
                err = exc
            else:
                # the leaf's end (a present leaf is RET_PF_SPURIOUS: nothing changes)
                step = min(size, (leaf.end_gfn - gfn) << PAGE_SHIFT)
                gpa += step
                size -= step
                continue
            if size == full:
                raise err
            break
        vm.count("pre_faulted_bytes", full - size)
        return size

    @uapi_call
    def hypercall(self, nr: int, *args: int) -> int:
        """The guest executes hypercall *nr*: the backend answers, else the architecture's
        generic code (x86 ``__kvm_emulate_hypercall``), else ``-KVM_ENOSYS``.  *nr* and
        *args* are the guest's registers: ``unsigned long`` each."""
        nr = cabi.ulong(nr, "nr")
        args = tuple(cabi.ulong(arg, f"args[{i}]") for i, arg in enumerate(args))
        self._run()
        vm = self.vm
        vm.count("hypercalls")
        result = vm.hooks.hypercall(self.view, nr, tuple(args))
        if result is not None:
            return result
        if vm.type_info.arch == "x86":
            return x86.emulate_hypercall(self, nr, tuple(args))
        return -uapi.KVM_ENOSYS

    @uapi_call
    def memory_encrypt_op(self, cmd: Any) -> int:
        """``KVM_MEMORY_ENCRYPT_OP`` on the vCPU fd (``guestmem_vcpu_ioctl``); ENOTTY where
        the backend has none."""
        self._ioctl()
        result = self.vm.hooks.vcpu_ioctl(self.view, uapi.KVM_MEMORY_ENCRYPT_OP, cmd)
        if result is None:
            raise KvmError(errno.ENOTTY, "", "KVM_MEMORY_ENCRYPT_OP is not supported on this vCPU")
        return result
