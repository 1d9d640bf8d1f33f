"""What a realm's accesses may end in besides the core's exits."""

from __future__ import annotations

from guestmem.errors import GuestExit


class RealmAbort(GuestExit):
    """The RMM injected a synchronous external abort into the realm: it touched a protected
    IPA whose RIPAS is not RAM (EMPTY, or DESTROYED after the host took the page away).
    The host never sees the access; the realm's own exception handler does."""

    def __init__(self, gpa: int, ripas: str) -> None:
        self.gpa = gpa
        self.ripas = ripas
        super().__init__(f"SEA injected into the realm: access to gpa {gpa:#x} whose RIPAS is {ripas}")
