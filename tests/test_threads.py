"""Threads: operations of several threads on one host, serialised as the kernel's locks do
(docs/model.md, "Locking"), and a stage-2 fault that races an invalidation retrying on
``mmu_invalidate_seq`` (``kvm_tdp_mmu_page_fault``: ``kvm_mmu_faultin_pfn`` runs without
``mmu_lock``, ``is_page_fault_stale`` is checked under it).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
from gmem_helpers import PAGE, PRIVATE, MiB, gmem_slot, plugin

import guestmem
from guestmem import ObserverError, uapi
from guestmem.backend import view
from guestmem.conformance.stress import run_together, stress
from guestmem.invariants import check_vm

PUNCH = uapi.FALLOC_FL_KEEP_SIZE | uapi.FALLOC_FL_PUNCH_HOLE


def waiting_for_the_lock(kvm: Any, n: int = 1, timeout: float = 10.0) -> None:
    """Return once *n* threads wait for *kvm*'s host lock."""
    deadline = time.monotonic() + timeout
    while len(kvm.lock_waiters) < n:
        assert time.monotonic() < deadline, "the other thread never waited for the host lock"
        time.sleep(0.001)


class RunDuringPrepare:
    """Observer: while a vCPU's fault prepares its folio (``kvm_gmem_get_pfn``, before the
    fault takes ``mmu_lock``), another thread starts *action* and waits for the host lock."""

    def __init__(self, kvm: Any, action: Callable[[], None]) -> None:
        self.kvm, self.action = kvm, action
        self.thread: threading.Thread | None = None
        self.errors: list[BaseException] = []

    @guestmem.hookimpl
    def guestmem_gmem_prepare(self) -> None:
        if self.thread is not None:
            return

        def run() -> None:
            try:
                self.action()
            except BaseException as exc:  # noqa: BLE001 - the test looks at it
                self.errors.append(exc)

        self.thread = threading.Thread(target=run)
        self.thread.start()
        waiting_for_the_lock(self.kvm)


@pytest.fixture
def guest(kvm: Any, protected_vm: Any) -> tuple[Any, Any]:
    """A private MiB at gpa 0 and a vCPU."""
    gmem = gmem_slot(protected_vm, MiB)
    protected_vm.set_memory_attributes(0, MiB, PRIVATE)
    return gmem, protected_vm.create_vcpu(0)


def test_a_fault_racing_a_punch_of_its_page_retries_and_maps_the_new_folio(
    kvm: Any, protected_vm: Any, guest: tuple[Any, Any]
) -> None:
    """3.3: the punch runs in the fault's window (after ``kvm_gmem_get_pfn``, before
    ``mmu_lock``); the fault finds ``mmu_invalidate_seq`` moved, retries, and maps the folio
    guest_memfd holds now, never the freed one."""
    gmem, vcpu = guest
    racer = RunDuringPrepare(kvm, lambda: gmem.fallocate(PUNCH, 0x5000, PAGE))
    with plugin(racer):
        vcpu.access(0x5000, data=b"after the punch")
    assert racer.thread is not None
    racer.thread.join()
    assert not racer.errors
    counters = protected_vm.counters
    assert counters["fault_races"] == 1 and counters["fault_retries"] == 1
    assert counters["punch_hole"] == 1 and counters["gmem_pages_freed"] == 1
    leaf = view(protected_vm).leaf(5)
    assert leaf is not None and leaf.pfn == view(protected_vm).gmem_pfn(5)
    assert vcpu.access(0x5000, 15) == b"after the punch"


def test_a_fault_racing_a_conversion_exits_to_userspace(
    kvm: Any, protected_vm: Any, guest: tuple[Any, Any]
) -> None:
    """A conversion to shared completing in the fault's window: the retry finds the gfn
    shared, and the private access leaves as a memory-fault exit (G-2), no private leaf."""
    _, vcpu = guest
    racer = RunDuringPrepare(kvm, lambda: protected_vm.set_memory_attributes(0x5000, PAGE, 0))
    with plugin(racer), pytest.raises(guestmem.MemoryFault) as exit_:
        vcpu.access(0x5000, data=b"x", private=True)
    assert racer.thread is not None
    racer.thread.join()
    assert exit_.value.gpa == 0x5000 and exit_.value.rule == "G-2"
    assert view(protected_vm).leaf(5) is None
    assert protected_vm.counters["fault_races"] == 1


def test_a_fault_racing_another_vcpu_on_the_same_page_is_spurious(
    kvm: Any, protected_vm: Any, guest: tuple[Any, Any]
) -> None:
    """Another vCPU maps the page in the fault's window: ``RET_PF_SPURIOUS``, one leaf, both
    stores land in the same folio."""
    _, vcpu = guest
    other = protected_vm.create_vcpu(1)
    racer = RunDuringPrepare(kvm, lambda: other.access(0x5008, data=b"other"))
    with plugin(racer):
        vcpu.access(0x5000, data=b"first")
    assert racer.thread is not None
    racer.thread.join()
    assert not racer.errors
    assert vcpu.access(0x5000, 13) == b"first\0\0\0other"
    assert protected_vm.counters["faults"] == 1 and protected_vm.counters["fault_races"] == 1


class FailOnPunch:
    """Observer that raises on the punch's trace event."""

    @guestmem.hookimpl
    def guestmem_trace(self, event: Any) -> None:
        if event.kind == "punch_hole":
            raise RuntimeError("observer failed on punch_hole")


def test_an_operation_run_in_a_faults_window_reports_its_own_observer_failures(
    kvm: Any, protected_vm: Any, guest: tuple[Any, Any]
) -> None:
    """The operations that run in another's window are operations of their own: what an
    observer raised during the punch is reported to the punching thread when the punch
    ends, not to the vCPU whose access goes on."""
    gmem, vcpu = guest
    racer = RunDuringPrepare(kvm, lambda: gmem.fallocate(PUNCH, 0x5000, PAGE))
    with plugin(racer), plugin(FailOnPunch()):
        vcpu.access(0x5000, data=b"x")
    assert racer.thread is not None
    racer.thread.join()
    assert len(racer.errors) == 1 and isinstance(racer.errors[0], ObserverError)
    assert not kvm.op_depth and not kvm.observer_failures


class CloseThenWait(RunDuringPrepare):
    """Observer: during a vCPU's fault a hook closes a file (its release is deferred to the
    end of the vCPU's operation), then another thread starts *action*."""

    def __init__(self, kvm: Any, doomed: Any, action: Callable[[], None]) -> None:
        super().__init__(kvm, action)
        self.doomed = doomed

    @guestmem.hookimpl
    def guestmem_gmem_prepare(self) -> None:
        if self.thread is None:
            self.doomed.close()
        super().guestmem_gmem_prepare()


def test_another_threads_operation_does_not_run_the_releases_a_fault_deferred(
    kvm: Any, protected_vm: Any, guest: tuple[Any, Any]
) -> None:
    """task_work is per task: a release a vCPU's operation deferred (a file a hook closed)
    runs when that operation ends, not when another thread's operation, run in the
    fault's window, ends."""
    _, vcpu = guest
    doomed = protected_vm.create_guest_memfd(MiB)
    inode = doomed.inode
    seen: list[bool] = []

    def other() -> None:
        kvm.check_extension(uapi.KVM_CAP_GUEST_MEMFD)  # an operation of its own, in the window
        seen.append(inode.evicted)

    racer = CloseThenWait(kvm, doomed, other)
    with plugin(racer):
        vcpu.access(0x5000, data=b"x")
        assert inode.evicted  # the vCPU's operation ended: its task_work ran
    assert racer.thread is not None
    racer.thread.join()
    assert not racer.errors and seen == [False]
    assert protected_vm.counters["fault_races"] == 0  # the other thread changed nothing


def test_a_fault_nested_in_a_hook_never_lets_the_lock_go(
    kvm: Any, protected_vm: Any, guest: tuple[Any, Any]
) -> None:
    """Only a thread's outermost operation opens the window: a fault inside a hook runs in
    its caller's critical section, whatever waits for the lock."""
    gmem, vcpu = guest
    done: list[str] = []

    class Nested:
        @guestmem.hookimpl
        def guestmem_unmap_gfn_range(self) -> None:
            if done:
                return
            done.append("nested")
            racer = threading.Thread(target=lambda: done.append(f"punch {gmem.fallocate(PUNCH, 0, PAGE)}"))
            racer.start()
            waiting_for_the_lock(kvm)
            vcpu.access(0x7000, data=b"in the hook")  # depth 2: no window
            done.append("access")
            self.racer = racer

    nested = Nested()
    vcpu.access(0x6000, data=b"mapped")
    with plugin(nested):
        gmem.fallocate(PUNCH, 0x6000, PAGE)
    nested.racer.join()
    assert done == ["nested", "access", "punch None"]
    assert protected_vm.counters["fault_races"] == 0


def test_threads_of_one_host_never_corrupt_it(kvm: Any, protected_vm: Any, guest: tuple[Any, Any]) -> None:
    """Two vCPUs and a punching thread for a moment: only the uAPI's outcomes, every
    invalidation ended, the invariants hold (the model's structures stay whole)."""
    gmem, vcpu = guest
    vcpus = [vcpu, protected_vm.create_vcpu(1)]
    deadline = time.monotonic() + 0.5
    errors: list[BaseException] = []

    def loop(step: Callable[[int], None]) -> None:
        i = 0
        while time.monotonic() < deadline:
            i += 1
            try:
                step(i)
            except guestmem.KvmError:
                pass
            except BaseException as exc:  # noqa: BLE001 - the test looks at it
                errors.append(exc)
                return

    def vcpu_step(v: Any) -> Callable[[int], None]:
        def step(i: int) -> None:
            gpa = (i % 64) * PAGE
            if i % 2:
                v.access(gpa, data=b"x")
            else:
                v.access(gpa, 8)

        return step

    steps = [vcpu_step(v) for v in vcpus]
    steps.append(lambda i: gmem.fallocate(PUNCH, (i % 64) * PAGE, (i % 3 + 1) * PAGE))
    run_together(threading.Thread(target=loop, args=(step,)) for step in steps)
    assert not errors, errors[0]
    assert view(protected_vm).mmu_invalidate_in_progress == 0
    check_vm(protected_vm)
    vcpu.access(0, data=b"usable")
    assert vcpu.access(0, 6) == b"usable"


@pytest.mark.parametrize("backend", ["sw", "snp", "tdx", "pkvm", "gunyah", "cca"])
def test_stress(backend: str, stress_seconds: float) -> None:
    """vCPU threads storing and loading, the guest converting, the VMM punching, the host
    mapping guest_memfd, all at once for a bounded time (``--guestmem-stress-seconds``):
    only documented outcomes, no foreign, crossed or stale load, the invariants after every
    operation, no invalidation left open, the VM usable afterwards, nothing leaked
    (:mod:`guestmem.conformance.stress`)."""
    if backend not in guestmem.backends():
        pytest.skip(f"backend {backend!r} is not installed")
    report = stress(backend, stress_seconds)
    print(report.summary())
    assert not report.violations, "\n".join(report.violations[:5])
    assert report.counters["faults"] > 0
