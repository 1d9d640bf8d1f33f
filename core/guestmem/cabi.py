"""How a Python argument becomes the C value the kernel reads: the uAPI's C types.

Every integer argument of the uAPI face (:mod:`guestmem.api`) and of a backend's arch face
goes through one converter of this module before anything changes, on the model and on
the real kernel (``guestmem-linux``) alike, so both see the same value:

1. :func:`operator.index`: an ``int`` (or an object with ``__index__``, ``bool``
   included) passes; a ``float``, ``str``, ``None``, NaN... is a :class:`TypeError` naming
   the parameter.
2. The C type the real uAPI carries for that parameter, converted as C converts a wider
   value into it: modulo ``2**bits`` for an unsigned type (``__u32``, ``__u64``,
   ``unsigned long``, ``size_t``), two's-complement wrap for a signed one (``int``,
   ``long``, ``loff_t``).  The kernel's own checks then see exactly what the real ioctl
   would see (``-1`` in a ``__u64`` field is ``0xffff_ffff_ffff_ffff``; ``2**64 + 4096``
   in a ``size_t`` is ``4096``) and answer with their errno.

Bytes-like data (:func:`buffer`) and file arguments (:func:`fd`) are checked the same way.
Each converter costs a type check and a comparison for an argument that already fits.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from typing import Final

U8_MAX: Final = 0xFF
U16_MAX: Final = 0xFFFF
U32_MAX: Final = 0xFFFF_FFFF
U64_MAX: Final = (1 << 64) - 1
S32_MAX: Final = (1 << 31) - 1
S64_MAX: Final = (1 << 63) - 1


class ArgumentTypeError(TypeError):
    """An argument of the wrong type, named in the message: a non-integer where the uAPI
    carries an integer, data that is not bytes-like, a file argument that is no file.

    It is the caller's error, raised before the call changes anything, so it passes
    through the hook machinery unchanged (not a :class:`guestmem.errors.BackendError`)
    when a backend's command converts its struct inside ``guestmem_vm_ioctl``.
    """


def index(value: object, name: str) -> int:
    """*value* as a Python ``int`` (``operator.index``), or TypeError naming *name*."""
    if value.__class__ is int:
        return value
    try:
        return operator.index(value)  # type: ignore[arg-type]
    except TypeError:
        raise ArgumentTypeError(f"{name} must be an integer, not {type(value).__name__}") from None


def u8(value: object, name: str) -> int:
    """A ``__u8`` field: the value modulo ``2**8``."""
    return index(value, name) & U8_MAX


def u16(value: object, name: str) -> int:
    """A ``__u16`` field: the value modulo ``2**16``."""
    return index(value, name) & U16_MAX


def u32(value: object, name: str) -> int:
    """A ``__u32`` field or an ``unsigned int`` argument: the value modulo ``2**32``."""
    if value.__class__ is int and 0 <= value <= U32_MAX:
        return value
    return index(value, name) & U32_MAX


def u64(value: object, name: str) -> int:
    """A ``__u64`` field, an ``unsigned long`` or a ``size_t``: the value modulo ``2**64``."""
    if value.__class__ is int and 0 <= value <= U64_MAX:
        return value
    return index(value, name) & U64_MAX


def s32(value: object, name: str) -> int:
    """A C ``int``: the value wrapped into ``[-2**31, 2**31)`` (two's complement)."""
    value = index(value, name)
    if -S32_MAX - 1 <= value <= S32_MAX:
        return value
    return ((value + (1 << 31)) & U32_MAX) - (1 << 31)


def s64(value: object, name: str) -> int:
    """A ``long``, ``loff_t`` or ``off_t``: the value wrapped into ``[-2**63, 2**63)``."""
    value = index(value, name)
    if -S64_MAX - 1 <= value <= S64_MAX:
        return value
    return ((value + (1 << 63)) & U64_MAX) - (1 << 63)


# The kernel's names for the same widths (x86-64 and arm64 are LP64).
ulong = u64
size_t = u64
long = s64
loff_t = s64
off_t = s64
c_int = s32
c_uint = u32


def fields(struct: object, **ctypes: Callable[[object, str], int]) -> None:
    """Store each named field of a backend's command *struct* as its C type, in place:
    ``cabi.fields(params, gfn_start=cabi.u64, len=cabi.u64, type=cabi.u8)`` is what the
    kernel's ``copy_from_user`` of the struct reads (a non-integer: TypeError naming the
    field, before the command does anything)."""
    for name, ctype in ctypes.items():
        setattr(struct, name, ctype(getattr(struct, name), name))


def buffer(value: object, name: str) -> bytes:
    """Bytes-like data (``bytes``, ``bytearray``, ``memoryview`` or any other object with
    the buffer protocol, as ``write(2)`` through :func:`os.write` takes) as ``bytes``;
    anything else (a ``str``, an ``int``, ``None``...) is a TypeError naming *name*."""
    if value.__class__ is bytes:
        return value
    try:
        return memoryview(value).tobytes()  # type: ignore[arg-type]
    except TypeError:
        raise ArgumentTypeError(f"{name} must be a bytes-like object, not {type(value).__name__}") from None


#: What an fd field reads for a file that is no longer open (``-1``): ``fget`` fails (EBADF).
CLOSED_FD: Final = U32_MAX


def fd(value: object, name: str) -> int:
    """The ``__u32`` an fd field carries for *value*.

    A file object of the uAPI face (or any object with ``fileno()``) gives its descriptor,
    :data:`CLOSED_FD` once it is closed (a closed Python file answers ``fileno()`` with
    ValueError; the kernel's ``fget`` of a stale number fails with EBADF); an integer is a
    descriptor number, converted as :func:`u32`; ``None`` is descriptor 0, what a zeroed
    field holds.  Anything else is a TypeError naming *name*.
    """
    if value is None:
        return 0
    if hasattr(type(value), "__index__"):
        return u32(value, name)
    fileno = getattr(value, "fileno", None)
    if not callable(fileno):
        raise ArgumentTypeError(
            f"{name} must be a file object, a file descriptor number or None, not {type(value).__name__}"
        )
    if getattr(value, "closed", False):
        return CLOSED_FD
    try:
        number = fileno()
    except ValueError:  # a closed file object
        return CLOSED_FD
    return u32(number, f"{name}.fileno()")
