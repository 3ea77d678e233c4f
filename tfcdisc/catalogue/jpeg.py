"""JPEG facts read from the marker segments alone, without decoding a pixel.

Every image is checked this way first (a few microseconds each), before
`tfcdisc.catalogue.screen` decodes it once, so that bytes that are not a JPEG, or frames of the
wrong size, cost nothing more; the bytes kept are moved untouched. Grayscale (1 component), YCbCr (3) and CMYK/YCCK (4) baseline,
extended and progressive JPEGs are legal; the input pipeline turns them all into
RGB.
"""

from __future__ import annotations

import dataclasses

# Start-of-frame markers: C0-C3, C5-C7, C9-CB, CD-CF (C4 DHT, C8 JPG, CC DAC are not).
_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
_PROGRESSIVE = frozenset({0xC2, 0xC6, 0xCA, 0xCE})
_STANDALONE = frozenset(range(0xD0, 0xD8)) | {0x01}
_EOI_TAIL = 64  # the end-of-image marker must be within this many final bytes
# A 1x1 grey JPEG: decoded in place of padding, so padded slots cost almost nothing.
BLANK = bytes.fromhex(
    "ffd8ffe000104a46494600010100000100010000ffdb004300100b0c0e0c0a100e0d0e1211101318281a"
    "181616183123251d283a333d3c3933383740485c4e404457453738506d51575f626768673e4d71797064"
    "785c656763ffdb0043011112121815182f1a1a2f63423842636363636363636363636363636363636363"
    "6363636363636363636363636363636363636363636363636363636363636363ffc00011080001000103"
    "012200021101031101ffc4001f0000010501010101010100000000000000000102030405060708090a0b"
    "ffc400b5100002010303020403050504040000017d010203000411051221314106135161072271143281"
    "91a1082342b1c11552d1f02433627282090a161718191a25262728292a3435363738393a434445464748"
    "494a535455565758595a636465666768696a737475767778797a838485868788898a9293949596979899"
    "9aa2a3a4a5a6a7a8a9aab2b3b4b5b6b7b8b9bac2c3c4c5c6c7c8c9cad2d3d4d5d6d7d8d9dae1e2e3e4e5"
    "e6e7e8e9eaf1f2f3f4f5f6f7f8f9faffc4001f0100030101010101010101010000000000000102030405"
    "060708090a0bffc400b51100020102040403040705040400010277000102031104052131061241510761"
    "711322328108144291a1b1c109233352f0156272d10a162434e125f11718191a262728292a3536373839"
    "3a434445464748494a535455565758595a636465666768696a737475767778797a82838485868788898a"
    "92939495969798999aa2a3a4a5a6a7a8a9aab2b3b4b5b6b7b8b9bac2c3c4c5c6c7c8c9cad2d3d4d5d6d7"
    "d8d9dae2e3e4e5e6e7e8e9eaf2f3f4f5f6f7f8f9faffda000c03010002110311003f0028a28a00ffd9")


@dataclasses.dataclass(frozen=True)
class JpegInfo:
    height: int
    width: int
    channels: int
    progressive: bool


class JpegError(ValueError):
    """The bytes are not a usable JPEG; ``kind`` names the class of problem for counts."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


def read_header(data: bytes) -> JpegInfo:
    """Returns the frame header of a JPEG, or raises `JpegError` saying what is wrong."""
    n = len(data)
    if n < 4 or data[0] != 0xFF or data[1] != 0xD8:
        raise JpegError("not_jpeg", "not a JPEG (no start-of-image marker)")
    if data.rfind(b"\xff\xd9", max(0, n - _EOI_TAIL)) < 0:
        raise JpegError("truncated", "truncated JPEG (no end-of-image marker)")
    p = 2
    while p + 4 <= n:
        if data[p] != 0xFF:
            raise JpegError("corrupt", f"corrupt JPEG (expected a marker at byte {p})")
        marker = data[p + 1]
        if marker == 0xFF:  # fill byte
            p += 1
            continue
        if marker in _STANDALONE:
            p += 2
            continue
        length = (data[p + 2] << 8) | data[p + 3]
        if length < 2 or p + 2 + length > n:
            raise JpegError("corrupt", f"corrupt JPEG (segment at byte {p} overruns the data)")
        if marker in _SOF:
            if length < 8:
                raise JpegError("corrupt", "corrupt JPEG (short frame header)")
            height = (data[p + 5] << 8) | data[p + 6]
            width = (data[p + 7] << 8) | data[p + 8]
            channels = data[p + 9]
            if not height or not width:
                raise JpegError("empty_frame", f"JPEG with an empty frame ({width}x{height})")
            if channels not in (1, 3, 4):
                raise JpegError("components", f"JPEG with {channels} colour components (1, 3 or 4 expected)")
            return JpegInfo(height, width, channels, marker in _PROGRESSIVE)
        if marker == 0xDA:  # start of scan before any frame header
            break
        p += 2 + length
    raise JpegError("corrupt", "corrupt JPEG (no frame header)")


def check(data: bytes, size: tuple[int, int] | None = None,
          max_pixels: int | None = None) -> JpegInfo:
    """`read_header`, also requiring the frame to be ``size`` (height, width) if given,
    and to hold at most ``max_pixels`` (a header may claim 60000x60000: refuse it before
    a decoder allocates for it)."""
    info = read_header(data)
    if max_pixels is not None and info.height * info.width > max_pixels:
        raise JpegError("too_large", f"JPEG of {info.width}x{info.height} declares more than "
                        f"the {max_pixels} pixels allowed")
    if size is not None and (info.height, info.width) != tuple(size):
        raise JpegError("wrong_size", f"JPEG of {info.width}x{info.height}, expected "
                        f"{size[1]}x{size[0]}")
    return info
