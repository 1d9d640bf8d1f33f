"""The portable intents on an Arm CCA host (``Backend(intents=CcaIntents())``).

What a VMM (kvmtool's realm support, the order of the KVM CCA series) and a Linux realm do
for each intent (backends.md section 5):

* a ``"private"`` VM is a realm (``KVM_VM_TYPE_ARM_REALM``): right after
  ``KVM_CREATE_VM`` the VMM creates it in the RMM (``KVM_CAP_ARM_RME_CREATE_REALM``: the
  RD and its root RTT), before any vCPU, whose REC needs it; guest RAM is guest_memfd plus
  shared anonymous memory, all of it private; once the vCPUs exist every RAM region gets
  RIPAS RAM (``KVM_CAP_ARM_RME_INIT_RIPAS_REALM``);
* ``launch.populate`` is ``KVM_CAP_ARM_RME_POPULATE_REALM`` (``kvm_populate_realm``: each
  page delegated and DATA_CREATEd with its contents, measured into the RIM unless
  ``measure = false``); the launch ends with ``KVM_CAP_ARM_RME_ACTIVATE_REALM``;
* ``guest.convert`` is Linux's ``rsi_set_memory_range_protected`` / ``_shared``:
  ``RSI_IPA_STATE_SET`` with ``RSI_CHANGE_DESTROYED`` to RIPAS RAM or EMPTY; the REC exits
  and KVM hands the VMM a ``KVM_EXIT_MEMORY_FAULT`` (private iff RAM), which the VMM loop
  answers as QEMU converts (attributes, then the discard of the old side: the RMM destroys
  the private pages, DATA_DESTROY); the realm enters again and its call returns how far the
  change got, and it calls again from there until the range is done;
* there is no acceptance: INIT_RIPAS gives the RAM its RIPAS before the realm runs, and a
  later ``RSI_IPA_STATE_SET`` to RAM is the conversion above;
* a protected access to an IPA whose RIPAS is not RAM (EMPTY, or DESTROYED after the host
  took the page away) is a synchronous external abort the RMM injects into the realm
  (:class:`~guestmem_cca.exits.RealmAbort`).

The host's normal VMs (``KVM_VM_TYPE_ARM_NORMAL``) are arm64 KVM's: the generic base.
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import partial

from guestmem.backend import GuestVm, Intents, NotApplicable
from guestmem.errors import KvmError
from guestmem_cca.guest import RealmGuest, enable_rme
from guestmem_cca.policy import populate
from guestmem_cca.realm import RULE
from guestmem_cca.rmi import (
    GRANULE_SIZE,
    KVM_CAP_ARM_RME_ACTIVATE_REALM,
    KVM_CAP_ARM_RME_CREATE_REALM,
    KVM_CAP_ARM_RME_INIT_RIPAS_REALM,
    KVM_VM_TYPE_ARM_REALM,
    RSI_ACCEPT,
    RSI_SUCCESS,
    Ripas,
)

#: RMI commands that change granules or RTT entries (the RMM's ownership tables).
TABLE_RMI = (
    "granule_delegate",
    "granule_undelegate",
    "data_create",
    "data_create_unknown",
    "data_destroy",
    "rtt_create",
    "rtt_destroy",
    "rtt_init_ripas",
    "rtt_set_ripas",
)


class CcaIntents(Intents):
    """Arm CCA's translation of the portable intents (see the module docstring)."""

    #: ``"private"`` is a realm.
    private_vm_type = KVM_VM_TYPE_ARM_REALM

    @staticmethod
    def _realm(guest: GuestVm) -> bool:
        return guest.vm_type.type == KVM_VM_TYPE_ARM_REALM

    # --- the launch --------------------------------------------------------------------------------
    def vm_init(self, guest: GuestVm) -> None:
        """``KVM_CAP_ARM_RME_CREATE_REALM``: the RD and the root RTT, before any REC."""
        if self._realm(guest):
            enable_rme(guest.vm, KVM_CAP_ARM_RME_CREATE_REALM)

    def launch_start(self, guest: GuestVm) -> str:
        """``KVM_CAP_ARM_RME_INIT_RIPAS_REALM`` of every RAM region: RIPAS RAM."""
        if not self._realm(guest):
            return ""
        for region in guest.regions:
            enable_rme(guest.vm, KVM_CAP_ARM_RME_INIT_RIPAS_REALM, region.gpa, region.size)
        return f"realm created (RIPAS RAM over {len(guest.regions)} region(s))"

    def populate(self, guest: GuestVm, gpa: int, data: bytes, measure: bool | None) -> str:
        """``KVM_CAP_ARM_RME_POPULATE_REALM`` of *data* (padded to granules): DATA_CREATE,
        measured into the RIM unless *measure* is False."""
        if not self._realm(guest):
            return super().populate(guest, gpa, data, measure)
        pages = populate(guest.vm, gpa, data, measure=measure is not False)
        kind = "unmeasured" if measure is False else "measured"
        return f"DATA_CREATE of {pages} granule(s), {kind}"

    def launch_finish(self, guest: GuestVm) -> str:
        """``KVM_CAP_ARM_RME_ACTIVATE_REALM``: the realm ACTIVE, its RIM frozen."""
        if not self._realm(guest):
            return ""
        enable_rme(guest.vm, KVM_CAP_ARM_RME_ACTIVATE_REALM)
        return "realm activated"

    # --- the guest -----------------------------------------------------------------------------------
    def convert(
        self, guest: GuestVm, gpa: int, size: int, *, private: bool, page_size: int, coalesce: bool
    ) -> str:
        """``RSI_IPA_STATE_SET`` to RAM or EMPTY until the range is done (the VMM answers
        each exit); one call per 4 KiB page with *coalesce* False."""
        if not self._realm(guest):
            return super().convert(guest, gpa, size, private=private, page_size=page_size, coalesce=coalesce)
        vcpu = guest.vcpu()
        realm = RealmGuest(vcpu)
        ripas = Ripas.RAM if private else Ripas.EMPTY
        step = size if coalesce else GRANULE_SIZE
        calls = 0
        for start in range(gpa, gpa + size, step):
            at, top = start, start + step
            while at < top:
                guest.run(partial(realm.set_ipa_state, at, top, ripas), vcpu)
                calls += 1
                status, reached, response = realm.returned()
                if status != RSI_SUCCESS or response != RSI_ACCEPT or reached <= at:
                    answer = (status, reached, response)
                    raise KvmError(0, RULE, f"RSI_IPA_STATE_SET [{at:#x}, {top:#x}) returned {answer}")
                at = reached
        return f"{calls} RSI_IPA_STATE_SET call(s) to {ripas.name}"

    def accept(
        self, guest: GuestVm, gpa: int, size: int, *, page_size: int, coalesce: bool, entries: int
    ) -> str:
        """Not applicable: RIPAS is given before the realm runs (module docstring)."""
        raise NotApplicable(
            "a realm accepts nothing: its RAM has RIPAS RAM from INIT_RIPAS before it runs, and "
            "RSI_IPA_STATE_SET is its conversion"
        )

    # --- capabilities and costs ----------------------------------------------------------------------
    def capabilities(self, guest: GuestVm) -> frozenset[str]:
        """A realm converts, is populated and measured (the RIM)."""
        found = super().capabilities(guest)
        if self._realm(guest):
            found |= {"conversion", "populate", "launch_measurement"}
        return found

    def costs(self, counters: Mapping[str, int]) -> dict[str, int]:
        """RMI commands on granules and RTTs are table updates, the others (realms, RECs)
        firmware commands; each RSI_IPA_STATE_SET is the realm's instruction and an exit
        to the VMM (the memory-fault exit of ``rec_exit_ripas_change``, which reaches
        userspace from the REC's exit, not from a fault); the granules the RMM scrubs
        zeroed bytes."""
        found = super().costs(counters)
        get = counters.get
        found["exits"] += get("cca.ripas_change_exits", 0)
        rmi = sum(v for k, v in counters.items() if k.startswith("cca.rmi."))
        table = sum(get(f"cca.rmi.{name}", 0) for name in TABLE_RMI)
        found["hw_table_updates"] += table
        found["firmware_commands"] += rmi - table
        found["guest_instructions"] += get("cca.ripas_change_exits", 0)
        found["zeroed_bytes"] += get("cca.zeroed_bytes", 0)
        return found

    def cost_details(self, counters: Mapping[str, int]) -> dict[str, int]:
        """The RMM operations behind the categories."""
        get = counters.get
        return {
            "RMI calls": sum(v for k, v in counters.items() if k.startswith("cca.rmi.")),
            "DATA_CREATE": get("cca.rmi.data_create", 0) + get("cca.rmi.data_create_unknown", 0),
            "DATA_DESTROY": get("cca.rmi.data_destroy", 0),
            "RIPAS changes": get("cca.ripas_changes", 0),
        }
