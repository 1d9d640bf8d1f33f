"""The Arm CCA interfaces the model speaks, with their values.

- RMI (Realm Management Interface, host -> RMM): status codes and the return code packing
  of ``arch/arm64/include/asm/rmi_smc.h`` (``RMI_RETURN_STATUS``/``RMI_RETURN_INDEX``),
  RIPAS and RTT entry states, measurement flags (TF-RMM ``smc-rmi.h``);
- RSI (Realm Services Interface, realm -> RMM): ``RSI_IPA_STATE_SET`` and its answers
  (``arch/arm64/include/asm/rsi_smc.h``);
- the KVM uAPI of the CCA host series (gwshan/linux, Steven Price's series):
  ``KVM_VM_TYPE_ARM_REALM``, ``KVM_CAP_ARM_RME`` and its sub-commands;
- the granule and realm states of the RMM (TF-RMM ``lib/granule/include/granule.h``,
  ``runtime/include/realm.h``).
"""

from __future__ import annotations

import enum
from typing import Final

# --- RMI status codes (RmiStatusCode) -------------------------------------------------------
RMI_SUCCESS: Final = 0
#: A command input value is wrong (alignment, a granule in the wrong state...).
RMI_ERROR_INPUT: Final = 1
#: An attribute of the realm does not match (its state).
RMI_ERROR_REALM: Final = 2
#: An attribute of a REC does not match.
RMI_ERROR_REC: Final = 3
#: An RTT walk ended before the target level, or reached an entry of the wrong state; the
#: index is the level where the walk ended.
RMI_ERROR_RTT: Final = 4

STATUS_NAMES: Final = {
    RMI_SUCCESS: "RMI_SUCCESS",
    RMI_ERROR_INPUT: "RMI_ERROR_INPUT",
    RMI_ERROR_REALM: "RMI_ERROR_REALM",
    RMI_ERROR_REC: "RMI_ERROR_REC",
    RMI_ERROR_RTT: "RMI_ERROR_RTT",
}


def pack_return_code(status: int, index: int = 0) -> int:
    """TF-RMM ``pack_return_code``: the status in bits 7:0, the index in bits 15:8."""
    return (index << 8) | status


def return_status(code: int) -> int:
    """``RMI_RETURN_STATUS``."""
    return code & 0xFF


def return_index(code: int) -> int:
    """``RMI_RETURN_INDEX``."""
    return (code >> 8) & 0xFF


# --- measurement (RmiDataMeasureContent) ------------------------------------------------------
RMI_NO_MEASURE_CONTENT: Final = 0
RMI_MEASURE_CONTENT: Final = 1

# --- RTT geometry (4 KiB granules) ---------------------------------------------------------------
GRANULE_SHIFT: Final = 12
GRANULE_SIZE: Final = 1 << GRANULE_SHIFT
#: The level of 4 KiB entries (``RTT_PAGE_LEVEL``) and the smallest block level.
RTT_PAGE_LEVEL: Final = 3
RTT_MIN_BLOCK_LEVEL: Final = 2
#: The realm's starting level: its root tables (given at REALM_CREATE) are level 1.
RTT_START_LEVEL: Final = 1
#: Entries per table.
S2TTES_PER_S2TT: Final = 512


def level_shift(level: int) -> int:
    """``RMM_RTT_LEVEL_SHIFT``: 12 at level 3, 21 at level 2, 30 at level 1."""
    return (GRANULE_SHIFT - 3) * (4 - level) + 3


def map_size(level: int) -> int:
    """``s2tte_map_size``: the bytes one entry of *level* maps."""
    return 1 << level_shift(level)


# --- RIPAS and RTT entry states ----------------------------------------------------------------------
class Ripas(enum.IntEnum):
    """The realm IPA state (``enum ripas``): what the realm was promised at an IPA."""

    EMPTY = 0
    RAM = 1
    DESTROYED = 2


class RttEntryState(enum.IntEnum):
    """``RmiRttEntryState``, as ``RMI_RTT_READ_ENTRY`` reports it."""

    UNASSIGNED = 0
    ASSIGNED = 1
    TABLE = 2


# --- RSI (realm -> RMM) --------------------------------------------------------------------------------
#: ``SMC_RSI_IPA_STATE_SET``: x1 base, x2 top, x3 RIPAS, x4 flags; x0 status, x1 new base,
#: x2 the host's response.
SMC_RSI_IPA_STATE_SET: Final = 0xC4000197
#: ``SMC_RSI_IPA_STATE_GET``: x1 base, x2 top; x0 status, x1 top, x2 RIPAS.
SMC_RSI_IPA_STATE_GET: Final = 0xC4000198
RSI_SUCCESS: Final = 0
RSI_ERROR_INPUT: Final = 1
RSI_ERROR_STATE: Final = 2
RSI_INCOMPLETE: Final = 3
#: The host's answer to a RIPAS change (``enum ripas_change_response``).
RSI_ACCEPT: Final = 0
RSI_REJECT: Final = 1
#: Flags of ``RSI_IPA_STATE_SET``: may a DESTROYED IPA change (Linux guests pass
#: ``RSI_CHANGE_DESTROYED`` both ways, ``rsi_set_memory_range_shared/_protected``).
RSI_NO_CHANGE_DESTROYED: Final = 0
RSI_CHANGE_DESTROYED: Final = 1
#: PSCI ``SYSTEM_OFF`` (the realm powers itself off).
PSCI_SYSTEM_OFF: Final = 0x84000008

# --- the KVM uAPI of the CCA series --------------------------------------------------------------------
KVM_VM_TYPE_ARM_SHIFT: Final = 8
#: ``KVM_VM_TYPE_ARM(1)``.
KVM_VM_TYPE_ARM_REALM: Final = 1 << KVM_VM_TYPE_ARM_SHIFT
KVM_VM_TYPE_ARM_NORMAL: Final = 0
#: "FIXME: Large number to prevent conflicts" in the series.
KVM_CAP_ARM_RME: Final = 300
KVM_CAP_ARM_RME_CONFIG_REALM: Final = 0
KVM_CAP_ARM_RME_CREATE_REALM: Final = 1
KVM_CAP_ARM_RME_INIT_RIPAS_REALM: Final = 2
KVM_CAP_ARM_RME_POPULATE_REALM: Final = 3
KVM_CAP_ARM_RME_ACTIVATE_REALM: Final = 4


class GranuleState(enum.Enum):
    """``enum granule_state``: what the RMM uses a 4 KiB granule of physical memory for."""

    #: Non-secure (undelegated): the host's; the GPT gives it to the Non-secure PAS.
    NS = "NS"
    #: Delegated to the Realm PAS and unused.
    DELEGATED = "DELEGATED"
    #: A Realm Descriptor.
    RD = "RD"
    #: A Realm Execution Context (a vCPU).
    REC = "REC"
    #: An auxiliary granule of a REC.
    REC_AUX = "REC_AUX"
    #: Realm data (a guest-private page).
    DATA = "DATA"
    #: A Realm Translation Table.
    RTT = "RTT"


class RealmState(enum.Enum):
    """The realm's state in the RMM (``enum realm_state``)."""

    NEW = "NEW"
    ACTIVE = "ACTIVE"
    SYSTEM_OFF = "SYSTEM_OFF"
