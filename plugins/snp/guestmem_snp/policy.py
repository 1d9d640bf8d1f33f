"""The SEV-SNP arch policy: the hook implementations a VM of the ``snp`` backends reaches."""

from __future__ import annotations


class SnpPolicy:
    """Hook implementations for SEV, SEV-ES and SNP VMs (filled in by the policy layer)."""
