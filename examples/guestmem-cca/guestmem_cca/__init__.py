"""guestmem-cca: a guestmem backend.

The entry point :mod:`guestmem_cca.plugin` registers the ``cca`` backend; its arch policy
is :mod:`guestmem_cca.policy`.
"""

from __future__ import annotations

from guestmem_cca.plugin import DEFAULT_VM, CCA_VM

__all__ = ["DEFAULT_VM", "CCA_VM"]
