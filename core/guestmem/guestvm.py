"""A VM as a VMM launches it, on any backend: the launch boilerplate done once.

:meth:`GuestVm.launch` creates the backend's VM type for a kind of VM (``"private"`` or
``"default"``), lays out guest RAM, creates the vCPUs and starts the launch, each step
through the backend's :class:`~guestmem.intents.Intents`.  The portable intents
(:meth:`populate`, :meth:`finish_launch`, :meth:`convert`, :meth:`accept`,
:meth:`read`, :meth:`write`, :meth:`touch`) then do what the guest or the VMM means in the
backend's own mechanism, raising :class:`~guestmem.intents.NotApplicable` where it has
none.  Exits go through :meth:`run`: with a VMM loop (``handle_exits="qemu"``, a
:class:`guestmem.vmm.QemuVmm`) they are handled and the guest re-entered; without one they
reach the caller.

This is what scenario files run on and what the pytest fixture ``guestmem_vm`` returns::

    import guestmem
    from guestmem.guestvm import GuestVm

    with guestmem.open("sw") as kvm, GuestVm.launch(kvm, size=16 << 20) as guest:
        guest.write(0x1000, b"secret")
        guest.convert(0x1000, 0x1000, private=False)     # KVM_HC_MAP_GPA_RANGE on sw
        assert guest.read(0x1000, 6) == bytes(6)          # QEMU discarded the private copy
"""

from __future__ import annotations

import contextlib
import copy
from collections import Counter
from collections.abc import Callable, Iterable
from types import TracebackType
from typing import TYPE_CHECKING, Any, Literal, TypeVar

from guestmem import api, uapi
from guestmem.errors import HypercallExit, MemoryFault
from guestmem.intents import Intents, NotApplicable, RamRegion, VmKind, require_aligned
from guestmem.vmm import ExitHandler, QemuVmm

if TYPE_CHECKING:
    from guestmem.backend import Backend, VmTypeInfo

__all__ = ["GuestVm", "HandleExits"]

T = TypeVar("T")
#: ``"qemu"``: exits are handled by :class:`~guestmem.vmm.QemuVmm`; ``"none"``: they
#: reach the caller (a scenario asserts on them); or a callable making the
#: :class:`~guestmem.vmm.ExitHandler` of the guest (a VMM's own handler under test).
HandleExits = Literal["qemu", "none"] | Callable[["GuestVm"], ExitHandler]
#: How often a single guest operation may take the same exit before the VMM gives up (the
#: kernel would re-enter forever; a conversion that never sticks is a bug worth seeing).
#: Exits that make progress (TDX MapGPA leaves a 1 GiB range in 512 exits, one per 2 MiB
#: chunk) are not bounded.
_MAX_EXITS = 64


class GuestVm(contextlib.AbstractContextManager["GuestVm"]):
    """One launched VM: its ``Kvm``, ``Vm``, RAM regions, vCPUs and the backend's intents."""

    def __init__(
        self,
        kvm: api.Kvm,
        backend: Backend,
        intents: Intents,
        vm: api.Vm,
        vm_type: VmTypeInfo,
        kind: VmKind,
        handle_exits: HandleExits = "qemu",
        prefault: bool = False,
        accept_on_fault: bool = False,
    ) -> None:
        self.kvm = kvm
        self.backend = backend
        self.intents = intents
        self.vm = vm
        self.vm_type = vm_type
        self.kind = kind
        self.regions: list[RamRegion] = []
        self.vcpus: list[api.Vcpu] = []
        #: The VMM loop (a :class:`QemuVmm` or the caller's handler), or None when exits
        #: reach the caller.
        self.vmm: ExitHandler | None = None
        if handle_exits == "qemu":
            self.vmm = QemuVmm(self, prefault=prefault)
        elif callable(handle_exits):
            self.vmm = handle_exits(self)
        #: The guest accepts a private page its load or store stopped at for want of
        #: acceptance (:meth:`~guestmem.intents.Intents.unaccepted`) and runs the access
        #: again.  A Linux guest does not: an SNP guest terminates at that #VC, and a TD
        #: is launched with ``SEPT_VE_DISABLE`` and killed instead of taking #VE.  The
        #: conformance kit's guest does, so that it can go on once the host took a page
        #: away (a punch, a memslot change): a backend whose guests need it launches them
        #: so (TDX: no ``SEPT_VE_DISABLE``).
        self.accept_on_fault = accept_on_fault
        #: True once :meth:`finish_launch` ran.
        self.launched = False
        #: What the backend said while launching (the VM type chosen, a measurement...).
        self.notes: list[str] = []
        #: Anything a backend's intents keep per VM (an SEV command helper, guest state).
        self.arch: dict[str, Any] = {}
        self._capabilities: frozenset[str] | None = None

    def __repr__(self) -> str:
        return f"<GuestVm {self.vm_type.name} on {self.backend.name}>"

    # --- creation ---------------------------------------------------------------------------------
    @classmethod
    def launch(
        cls,
        kvm: api.Kvm,
        *,
        kind: VmKind = "private",
        size: int | None = None,
        memory: Iterable[tuple[int, int]] | None = None,
        vcpus: int = 1,
        handle_exits: HandleExits = "qemu",
        prefault: bool = False,
        vm_type: int | None = None,
        accept_on_fault: bool = False,
    ) -> GuestVm:
        """Create and launch a VM of *kind* on *kvm*'s backend, up to the populate stage.

        Guest RAM is *memory* (``(gpa, size)`` regions) or one region of *size* bytes at
        gpa 0 (16 MiB by default).  *vm_type* overrides the backend's choice for *kind*;
        *accept_on_fault* makes a guest that accepts what it has not (:attr:`accept_on_fault`).
        :class:`NotApplicable` if the backend offers no VM of that kind.  The launch is
        finished by :meth:`finish_launch`, or on the first guest intent.
        """
        from guestmem.registry import get_registry

        backend = get_registry().backend(kvm.backend)
        intents = backend.intents if backend.intents is not None else Intents()
        if vm_type is None:
            info, note = intents.vm_type(backend, kind)
        else:
            found = backend.vm_type(vm_type)
            if found is None:
                raise NotApplicable(f"backend {backend.name!r} has no VM type {vm_type}")
            info, note = found, ""
        vm = kvm.create_vm(info.type)
        guest = cls(kvm, backend, intents, vm, info, kind, handle_exits, prefault, accept_on_fault)
        if note:
            guest.notes.append(note)
        try:
            intents.vm_init(guest)
            layout = list(memory) if memory is not None else [(0, size if size is not None else 16 << 20)]
            for slot, (gpa, length) in enumerate(layout):
                guest.regions.append(intents.add_region(guest, gpa, length, slot))
            intents.initial_attributes(guest)
            for vcpu_id in range(vcpus):
                guest.vcpus.append(vm.create_vcpu(vcpu_id))
            note = intents.launch_start(guest)
            if note:
                guest.notes.append(note)
            # The VMM probes the VM once it is set up (KVM_CHECK_EXTENSION), before the guest
            # runs: a guest that later kills its VM (every ioctl EIO) does not change them.
            guest._capabilities = intents.capabilities(guest)
        except BaseException:
            guest.close()
            raise
        return guest

    # --- lifetime ---------------------------------------------------------------------------------
    def close(self) -> None:
        """Close everything the launch created: host mappings, guest_memfds, the VM."""
        for region in self.regions:
            if region.shared is not None:
                region.shared.close()
            if region.gmem is not None:
                region.gmem.close()
        for vcpu in self.vcpus:
            vcpu.close()
        self.vm.close()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    # --- what it is ---------------------------------------------------------------------------------
    @property
    def capabilities(self) -> frozenset[str]:
        """:data:`guestmem.intents.CAPABILITIES` this VM has on its backend, as the launch
        found them."""
        if self._capabilities is None:
            self._capabilities = self.intents.capabilities(self)
        return self._capabilities

    def vcpu(self, index: int = 0) -> api.Vcpu:
        """vCPU *index*."""
        return self.vcpus[index]

    def on_vcpu(self, index: int) -> GuestVm:
        """This launched VM with its guest intents running on vCPU *index* instead of the
        first: the same VM, RAM, intents, per-VM state and VMM loop.  An SMP guest's vCPUs
        in threads of their own each use one (the model serialises them as the kernel's
        locks do, docs/model.md)."""
        other = copy.copy(self)
        other.vcpus = [self.vcpus[index], *(v for i, v in enumerate(self.vcpus) if i != index)]
        return other

    def region(self, gpa: int) -> RamRegion:
        """The RAM region holding *gpa* (``LookupError`` if none)."""
        for region in self.regions:
            if region.gpa <= gpa < region.end:
                return region
        raise LookupError(f"no guest RAM at gpa {gpa:#x}")

    # --- the VMM loop ---------------------------------------------------------------------------------
    def run(self, op: Callable[[], T], vcpu: api.Vcpu | None = None) -> T:
        """Run guest operation *op* on *vcpu*, handling its exits with the VMM loop.

        A ``KVM_EXIT_HYPERCALL`` is handled and the vCPU re-entered through the backend's
        :meth:`~guestmem.intents.Intents.resume` (whose value is the operation's); a
        ``KVM_EXIT_MEMORY_FAULT`` is handled and *op* run again, as the guest re-executes
        the access.  Without a VMM loop exits propagate.
        """
        vcpu = vcpu if vcpu is not None else self.vcpu()
        vmm = self.vmm
        seen: Counter[tuple[Any, ...]] = Counter()

        def again(exc: HypercallExit | MemoryFault) -> None:
            key = _exit_key(exc)
            seen[key] += 1
            if seen[key] > _MAX_EXITS:
                raise RuntimeError(f"guest operation still exiting after {_MAX_EXITS} times the same exit")

        while True:
            try:
                return op()
            except MemoryFault as exc:
                if vmm is None:
                    raise
                again(exc)
                vmm.handle_memory_fault(exc, vcpu)
                continue
            except HypercallExit as exc:
                if vmm is None:
                    raise
                pending = exc
            while True:
                again(pending)
                ret = vmm.handle_hypercall(pending, vcpu)
                try:
                    result: T = self.intents.resume(self, vcpu, pending, ret)
                    return result
                except HypercallExit as exc:
                    pending = exc

    # --- the portable intents ---------------------------------------------------------------------
    def populate(self, gpa: int, data: bytes, *, measure: bool | None = None) -> str:
        """``launch.populate``: put *data* at *gpa* before the guest runs; returns a note."""
        if self.launched:
            raise NotApplicable("the launch is finished: populating is a pre-boot step")
        return self.intents.populate(self, gpa, data, measure)

    def finish_launch(self) -> str:
        """End the launch (idempotent); returns the backend's note (a measurement)."""
        if self.launched:
            return ""
        note = self.intents.launch_finish(self)
        self.launched = True
        if note:
            self.notes.append(note)
        return note

    def _guest(self) -> None:
        if not self.launched:
            self.finish_launch()

    def convert(
        self, gpa: int, size: int, *, private: bool, page_size: int = uapi.PAGE_SIZE, coalesce: bool = True
    ) -> str:
        """``guest.convert``: the guest turns ``[gpa, gpa + size)`` private or shared."""
        require_aligned(gpa, size, page_size)
        self._guest()
        return self.intents.convert(self, gpa, size, private=private, page_size=page_size, coalesce=coalesce)

    def accept(
        self,
        gpa: int,
        size: int,
        *,
        page_size: int = uapi.PAGE_SIZE,
        coalesce: bool = True,
        entries: int = 64,
    ) -> str:
        """``guest.accept``: the guest accepts ``[gpa, gpa + size)`` as private memory."""
        require_aligned(gpa, size, page_size)
        self._guest()
        return self.intents.accept(
            self, gpa, size, page_size=page_size, coalesce=coalesce, entries=max(1, entries)
        )

    def read(self, gpa: int, length: int, *, private: bool | None = None) -> bytes:
        """``guest.read``: a guest load; *private* None lets the VM decide."""
        self._guest()
        return self._accepting(lambda: self.intents.read(self, gpa, length, private=private))

    def write(self, gpa: int, data: bytes, *, private: bool | None = None) -> None:
        """``guest.write``: a guest store."""
        self._guest()
        self._accepting(lambda: self.intents.write(self, gpa, data, private=private))

    def _accepting(self, access: Callable[[], T]) -> T:
        """Run the guest's *access*; with :attr:`accept_on_fault`, a page it stops at for
        want of acceptance is accepted (one 4 KiB page) and the access runs again."""
        accepted: set[int] = set()
        while True:
            try:
                return access()
            except Exception as exc:
                gpa = self.intents.unaccepted(self, exc) if self.accept_on_fault else None
                page = None if gpa is None else gpa & ~(uapi.PAGE_SIZE - 1)
                if page is None or page in accepted:
                    raise  # not for want of acceptance, or accepting did not help
                accepted.add(page)
                self.intents.accept(
                    self, page, uapi.PAGE_SIZE, page_size=uapi.PAGE_SIZE, coalesce=True, entries=1
                )

    def touch(self, gpa: int, size: int) -> int:
        """``guest.touch``: fault every page of the range in as the guest's first stores
        would; returns the pages touched."""
        require_aligned(gpa, size, uapi.PAGE_SIZE)
        self._guest()
        return self.intents.touch(self, gpa, size)

    # --- costs --------------------------------------------------------------------------------------
    def counters(self) -> dict[str, int]:
        """The VM's cost counters (empty on a backend without them, the real kernel)."""
        found = getattr(self.vm, "counters", None)
        return dict(found) if found is not None else {}

    def costs(self) -> dict[str, int]:
        """:data:`guestmem.intents.COST_CATEGORIES` of the VM so far."""
        return self.intents.costs(self.counters())


def _exit_key(exc: HypercallExit | MemoryFault) -> tuple[Any, ...]:
    """What makes two exits the same one: a hypercall's number and arguments, a memory
    fault's range, flags and errno."""
    if isinstance(exc, HypercallExit):
        return ("hypercall", exc.nr, tuple(exc.args))
    return ("memory_fault", exc.gpa, exc.size, exc.flags, exc.errno)
