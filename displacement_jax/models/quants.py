"""llama.cpp block quantizations -> float32, in numpy (the scalar formulas of ggml-quants.c, vectorised).

`dequantize(raw, type_name, n)` takes a tensor's raw bytes (any shape of uint8 whose total is a whole number of
blocks) and returns its `n` values, flat. Types: Q5_0 (blocks of 32) and the K-quants Q4_K, Q5_K, Q6_K
(super-blocks of 256 values with 6-bit or 8-bit sub-block scales). Q8_K is left out: llama.cpp uses it only for
activations inside its dot products, never for stored weights, and the `gguf` package has no reference for it. tests/test_gguf.py checks each against the `gguf`
package's `gguf.quants.dequantize` on real tensors of the packaged Gemma-3 270M file.
"""

from __future__ import annotations

import numpy as np

QK_K = 256  # values per K-quant super-block

# type name -> (values per block, bytes per block)
BLOCKS: dict[str, tuple[int, int]] = {
    "Q5_0": (32, 22),  # d f16, qh u32 (the 5th bits), qs[16] (two 4-bit values a byte)
    "Q4_K": (QK_K, 144),  # d f16, dmin f16, scales[12] (8 x 6-bit scale + 6-bit min), qs[128]
    "Q5_K": (QK_K, 176),  # d f16, dmin f16, scales[12], qh[32], qs[128]
    "Q6_K": (QK_K, 210),  # ql[128], qh[64], scales[16] int8, d f16
}


def _f16(b_NX: np.ndarray) -> np.ndarray:
  """[N, 2] bytes -> [N, 1] float32 of the little-endian float16 they hold."""
  return np.ascontiguousarray(b_NX).view("<f2").astype(np.float32)


def _k4_scales(s_N12: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """The 8 six-bit scales and mins of a Q4_K / Q5_K block (llama.cpp's get_scale_min_k4), each [N, 8] float32."""
  q = s_N12.astype(np.uint8)
  lo_sc, lo_m = q[:, 0:4] & 63, q[:, 4:8] & 63  # j < 4
  hi_sc = (q[:, 8:12] & 0xF) | ((q[:, 0:4] >> 6) << 4)  # j >= 4
  hi_m = (q[:, 8:12] >> 4) | ((q[:, 4:8] >> 6) << 4)
  return (
      np.concatenate([lo_sc, hi_sc], axis=1).astype(np.float32),
      np.concatenate([lo_m, hi_m], axis=1).astype(np.float32),
  )


def _nibbles(qs_NC: np.ndarray) -> np.ndarray:
  """[N, C*32] bytes -> [N, C, 2, 32]: each 32-byte group's low nibbles, then its high nibbles."""
  q = qs_NC.reshape(qs_NC.shape[0], -1, 1, 32)
  return np.concatenate([q & 0xF, q >> 4], axis=2)


def _q5_0(b: np.ndarray) -> np.ndarray:
  d = _f16(b[:, 0:2])
  qh = np.ascontiguousarray(b[:, 2:6]).view("<u4")  # [N, 1]
  qs = b[:, 6:22]
  bits = (qh >> np.arange(32, dtype=np.uint32)) & 1  # [N, 32]: the 5th bit of value j
  q = np.concatenate([qs & 0xF, qs >> 4], axis=1).astype(np.int32) | (bits.astype(np.int32) << 4)
  return (q - 16).astype(np.float32) * d


def _q4_k(b: np.ndarray) -> np.ndarray:
  n = b.shape[0]
  d, dmin = _f16(b[:, 0:2]), _f16(b[:, 2:4])
  sc, m = _k4_scales(b[:, 4:16])
  q = _nibbles(b[:, 16:144]).reshape(n, 8, 32).astype(np.float32)  # sub-block 2j: low nibbles of bytes 32j..
  return ((d * sc)[..., None] * q - (dmin * m)[..., None]).reshape(n, QK_K)


def _q5_k(b: np.ndarray) -> np.ndarray:
  n = b.shape[0]
  d, dmin = _f16(b[:, 0:2]), _f16(b[:, 2:4])
  sc, m = _k4_scales(b[:, 4:16])
  qh = b[:, 16:48]  # bit i of qh[l] is the 5th bit of sub-block i's value l
  high = (qh[:, None, :] >> np.arange(8, dtype=np.uint8)[None, :, None]) & 1  # [N, 8, 32]
  q = (_nibbles(b[:, 48:176]).reshape(n, 8, 32) | (high << 4)).astype(np.float32)
  return ((d * sc)[..., None] * q - (dmin * m)[..., None]).reshape(n, QK_K)


def _q6_k(b: np.ndarray) -> np.ndarray:
  n = b.shape[0]
  ql, qh = b[:, 0:128].reshape(n, 2, 64), b[:, 128:192].reshape(n, 2, 32)
  sc = b[:, 192:208].view(np.int8).astype(np.float32).reshape(n, 16)
  d = _f16(b[:, 208:210])
  # per half of 128: values l, l+32, l+64, l+96 take ql[l] low, ql[l+32] low, ql[l] high, ql[l+32] high nibbles
  low = np.stack([ql[:, :, :32] & 0xF, ql[:, :, 32:] & 0xF, ql[:, :, :32] >> 4, ql[:, :, 32:] >> 4], axis=2)
  high = (qh[:, :, None, :] >> np.array([0, 2, 4, 6], np.uint8)[None, None, :, None]) & 3  # [N, 2, 4, 32]
  q = ((low | (high << 4)).astype(np.int32) - 32).astype(np.float32).reshape(n, 16, 16)  # 16 sub-blocks of 16
  return ((d * sc)[..., None] * q).reshape(n, QK_K)


_KERNELS = {"Q5_0": _q5_0, "Q4_K": _q4_k, "Q5_K": _q5_k, "Q6_K": _q6_k}


def dequantize(raw: np.ndarray, type_name: str, n: int) -> np.ndarray:
  """The `n` float32 values (flat) of a tensor of quantization `type_name` stored as bytes `raw`."""
  if type_name not in BLOCKS:
    raise ValueError(f"no dequantizer for GGUF type {type_name} (here: {', '.join(BLOCKS)})")
  per_block, nbytes = BLOCKS[type_name]
  if n % per_block:
    raise ValueError(f"{type_name}: {n} values is not a whole number of {per_block}-value blocks")
  blocks = np.ascontiguousarray(raw, dtype=np.uint8).reshape(-1)
  if blocks.size != n // per_block * nbytes:
    raise ValueError(f"{type_name}: {blocks.size} bytes for {n} values (expected {n // per_block * nbytes})")
  return _KERNELS[type_name](blocks.reshape(-1, nbytes)).reshape(n)
