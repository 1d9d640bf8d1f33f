"""guestmem-gunyah: the Qualcomm Gunyah hypervisor, its resource manager and the Linux
Gunyah VM manager with guest_memfd-backed VMs, modelled on guestmem.

* :mod:`guestmem_gunyah.hyp`: the hypervisor's memory database, memextents and addrspaces;
* :mod:`guestmem_gunyah.rm`: the resource manager (VMIDs, VM states, memory parcels);
* :mod:`guestmem_gunyah.driver`: the Linux driver (``struct gunyah_vm``: bindings, demand
  paging, reclaim, start and teardown);
* :mod:`guestmem_gunyah.policy`: the hooks that plug them into the guestmem core;
* :mod:`guestmem_gunyah.face`: Gunyah's own calls (:func:`gunyah`, :func:`rm`,
  :func:`create_guest_mem`, :func:`set_driver`);
* :mod:`guestmem_gunyah.invariants`: an observer checking Gunyah's isolation invariants.
"""

from __future__ import annotations

from guestmem_gunyah.abi import GUNYAH_VM_TYPE, VMID_HLOS, RmError, TransType, VmStatus
from guestmem_gunyah.driver import Binding, Driver, GunyahHost, GunyahVm, VmParcel
from guestmem_gunyah.exits import PageFaultExit, SyncExternalAbort, VmStatusExit
from guestmem_gunyah.face import GunyahFace, create_guest_mem, gunyah, rm, set_driver
from guestmem_gunyah.hyp import HypCallError, Hypervisor
from guestmem_gunyah.policy import GunyahIoctl, gunyah_host, gunyah_state
from guestmem_gunyah.rm import ParcelState, ResourceManager, RmCallError

__all__ = [
    "GUNYAH_VM_TYPE",
    "VMID_HLOS",
    "Binding",
    "Driver",
    "GunyahFace",
    "GunyahHost",
    "GunyahIoctl",
    "GunyahVm",
    "HypCallError",
    "Hypervisor",
    "PageFaultExit",
    "ParcelState",
    "ResourceManager",
    "RmCallError",
    "RmError",
    "SyncExternalAbort",
    "TransType",
    "VmParcel",
    "VmStatus",
    "VmStatusExit",
    "create_guest_mem",
    "gunyah",
    "gunyah_host",
    "gunyah_state",
    "rm",
    "set_driver",
]
