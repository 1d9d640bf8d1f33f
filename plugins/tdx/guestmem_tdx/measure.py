"""The TD launch measurement (MRTD), in the TDX module and offline as a verifier computes it.

``TDH.MNG.INIT`` starts a SHA-384 over a stream of 128-byte blocks; ``TDH.MEM.PAGE.ADD``
appends one block (the API name ``"MEM.PAGE.ADD"`` zero-padded to 16 bytes, the page's
gpa as a little-endian u64, zeros), ``TDH.MR.EXTEND`` one such block (``"MR.EXTEND"``)
and the 256 bytes of the chunk it measures; ``TDH.MR.FINALIZE`` finishes the hash
(``intel/tdx-module`` tdx_1.5 ``tdh_mem_page_add.c``, ``tdh_mr_extend.c``,
``tdh_mr_finalize.c``; ``sha384_128B_block_t``).  So MRTD depends on every added
page's gpa, on the contents of every measured chunk, and on their order.

:func:`expected_mrtd` recomputes it from a payload description, without a TD, as an
attestation verifier does; the tests compare it with what the modelled module froze.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from typing import Final

import attrs

from guestmem import uapi

#: ``SIZE_OF_SHA384_BLOCK_IN_BYTES``.
SHA384_BLOCK: Final = 128
#: ``TDX_EXTENDMR_CHUNKSIZE``: one TDH.MR.EXTEND measures this many bytes.
TDX_EXTENDMR_CHUNKSIZE: Final = 256
#: MR.EXTEND calls per 4 KiB page.
EXTENDS_PER_PAGE: Final = uapi.PAGE_SIZE // TDX_EXTENDMR_CHUNKSIZE
MRTD_SIZE: Final = 48


def _api_block(api_name: bytes, gpa: int) -> bytes:
    """``sha384_128B_block_t``: api_name (16 bytes, zero padded), gpa (u64), reserved zeros."""
    return api_name.ljust(16, b"\0") + gpa.to_bytes(8, "little") + bytes(SHA384_BLOCK - 24)


class MrtdChain:
    """The module's ``td_sha_ctx``: the running SHA-384 of the launch measurement."""

    __slots__ = ("_sha",)

    def __init__(self) -> None:
        self._sha = hashlib.sha384()

    def page_add(self, gpa: int) -> None:
        """TDH.MEM.PAGE.ADD of the page at *gpa* (the contents are not measured)."""
        self._sha.update(_api_block(b"MEM.PAGE.ADD", gpa))

    def mr_extend(self, gpa: int, chunk: bytes) -> None:
        """TDH.MR.EXTEND of the 256-byte *chunk* at *gpa*."""
        if len(chunk) != TDX_EXTENDMR_CHUNKSIZE:
            raise ValueError(f"an MR.EXTEND chunk is {TDX_EXTENDMR_CHUNKSIZE} bytes, not {len(chunk)}")
        self._sha.update(_api_block(b"MR.EXTEND", gpa))
        self._sha.update(chunk)

    def finalize(self) -> bytes:
        """TDH.MR.FINALIZE: the 48-byte MRTD (the chain itself is left as it is)."""
        return self._sha.copy().digest()


@attrs.frozen
class MeasuredRegion:
    """One ``KVM_TDX_INIT_MEM_REGION`` as a verifier knows it: pages of *data* at *gpa*
    (padded with zeros to whole pages), with or without ``KVM_TDX_MEASURE_MEMORY_REGION``."""

    gpa: int
    data: bytes
    measure: bool = True


def page_chain(chain: MrtdChain, gpa: int, page: bytes, measure: bool) -> None:
    """What ``tdx_gmem_post_populate`` feeds the chain for one page: ADD, then 16 EXTENDs."""
    chain.page_add(gpa)
    if measure:
        for off in range(0, uapi.PAGE_SIZE, TDX_EXTENDMR_CHUNKSIZE):
            chain.mr_extend(gpa + off, page[off : off + TDX_EXTENDMR_CHUNKSIZE])


def expected_mrtd(regions: Iterable[MeasuredRegion]) -> bytes:
    """The MRTD a TD built from *regions*, added in this order, reports after FINALIZE."""
    chain = MrtdChain()
    for region in regions:
        if region.gpa % uapi.PAGE_SIZE:
            raise ValueError(f"gpa {region.gpa:#x} is not page aligned")
        npages = max(1, -(-len(region.data) // uapi.PAGE_SIZE))
        data = region.data.ljust(npages * uapi.PAGE_SIZE, b"\0")
        for i in range(npages):
            page = data[i * uapi.PAGE_SIZE : (i + 1) * uapi.PAGE_SIZE]
            page_chain(chain, region.gpa + i * uapi.PAGE_SIZE, page, region.measure)
    return chain.finalize()
