"""TensorBoard scalar events, written and flushed in the caller's thread: one `events.out.tfevents.*` file.

The file format TensorBoard reads: TFRecord framing (length, masked CRC-32C of the length, the record, masked
CRC-32C of the record) around `Event` protos (a file-version event, then one event per scalar holding a `Summary`
with one `simple_value`), the same records tensorboardX's SummaryWriter writes (tests/test_train.py reads them
back with tensorboardX's own proto definitions). Written here rather than through tensorboardX because:
- its SummaryWriter writes from a thread of its own: when that thread died of a full disk, every later row waited
  forever on its full queue, and the training run hung instead of stopping with the error;
- `import tensorboardX` imports torch (~4 s of every training run's start).
"""

from __future__ import annotations

import os
import re
import socket
import struct
import time
from typing import Iterable

import numpy as np

_INVALID_TAG = re.compile(r"[^-/\w\.]")  # tensorboardX's tag cleaning (summary._clean_tag)
FILE_VERSION = b"brain.Event:2"


def _crc32c_table() -> list[int]:
  table = []
  for n in range(256):
    c = n
    for _ in range(8):
      c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1  # the Castagnoli polynomial, reflected
    table.append(c)
  return table


_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
  crc = 0xFFFFFFFF
  for byte in data:
    crc = _TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
  return crc ^ 0xFFFFFFFF


def masked_crc32c(data: bytes) -> int:
  crc = crc32c(data)
  return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _varint(n: int) -> bytes:
  n &= 0xFFFFFFFFFFFFFFFF  # int64 as protobuf writes it (a negative value takes 10 bytes)
  out = bytearray()
  while n > 0x7F:
    out.append((n & 0x7F) | 0x80)
    n >>= 7
  out.append(n)
  return bytes(out)


def _field(number: int, payload: bytes) -> bytes:
  """A length-delimited protobuf field (wire type 2)."""
  return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def scalar_event(tag: str, value: float, step: int, wall_time: float) -> bytes:
  """Event{wall_time=1, step=2, summary=5: Summary{value=1: Value{tag=1, simple_value=2 (float32)}}}."""
  tag = _INVALID_TAG.sub("_", tag).lstrip("/")
  with np.errstate(over="ignore"):
    simple = np.asarray(value, "<f4").tobytes()
  summary_value = _field(1, tag.encode()) + b"\x15" + simple
  return b"\x09" + struct.pack("<d", wall_time) + b"\x10" + _varint(int(step)) + _field(5, _field(1, summary_value))


def record(data: bytes) -> bytes:
  """One TFRecord: length, its masked CRC-32C, the data, its masked CRC-32C."""
  header = struct.pack("<Q", len(data))
  return header + struct.pack("<I", masked_crc32c(header)) + data + struct.pack("<I", masked_crc32c(data))


class ScalarEvents:
  """Append scalars to a new events file in `directory`; each `write` is flushed before it returns."""

  def __init__(self, directory: str):
    os.makedirs(directory, exist_ok=True)
    self.path = os.path.join(directory, f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}")
    self._file = open(self.path, "ab")
    self._file.write(record(b"\x09" + struct.pack("<d", time.time()) + _field(3, FILE_VERSION)))
    self._file.flush()

  def write(self, step: int, scalars: Iterable[tuple[str, float]]) -> None:
    now = time.time()
    self._file.write(b"".join(record(scalar_event(tag, value, step, now)) for tag, value in scalars))
    self._file.flush()

  def close(self) -> None:
    self._file.close()
