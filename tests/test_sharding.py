"""Sharding rules on a 2x2x2 mesh, divisibility fallback, mesh construction, multi-device placement (8 CPU devices)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import jax
import pytest
from jax.sharding import AbstractMesh, PartitionSpec as P

from displacement_jax import sharding
from displacement_jax.models import convert
from displacement_jax.models.config import ModelConfig
from displacement_jax.models.transformer import init_params

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MESH_222 = AbstractMesh((2, 2, 2), sharding.AXES)


def _config(**kw) -> ModelConfig:
  base = dict(
      model_type="qwen2",
      vocab_size=96,
      hidden_size=32,
      intermediate_size=64,
      num_layers=2,
      num_heads=4,
      num_kv_heads=2,
      head_dim=8,
      qkv_bias=True,
      tie_word_embeddings=False,
  )
  base.update(kw)
  return ModelConfig(**base)


@pytest.mark.parametrize(
    "path, shape, want",
    [
        (("layers_0", "self_attn", "q_proj", "kernel"), (32, 32), P("fsdp", "tensor")),
        (("layers_0", "self_attn", "k_proj", "kernel"), (32, 16), P("fsdp", "tensor")),
        (("layers_1", "self_attn", "v_proj", "kernel"), (32, 16), P("fsdp", "tensor")),
        (("layers_0", "mlp", "gate_proj", "kernel"), (32, 64), P("fsdp", "tensor")),
        (("layers_0", "mlp", "up_proj", "kernel"), (32, 64), P("fsdp", "tensor")),
        (("layers_0", "self_attn", "o_proj", "kernel"), (32, 32), P("tensor", "fsdp")),
        (("layers_0", "mlp", "down_proj", "kernel"), (64, 32), P("tensor", "fsdp")),
        (("embed_tokens", "embedding"), (96, 32), P("tensor", "fsdp")),
        (("lm_head", "kernel"), (32, 96), P("fsdp", "tensor")),
        (("layers_0", "input_layernorm", "scale"), (32,), P()),
        (("layers_0", "self_attn", "q_proj", "bias"), (32,), P()),
        (("norm", "scale"), (32,), P()),
        (("params", "layers_0", "mlp", "up_proj", "kernel"), (32, 64), P("fsdp", "tensor")),  # 'params' wrapper
        (("something", "else"), (4, 4), P()),
        # Decoder-layer params of the model are stacked on a leading layer axis, which is never split.
        (("layers", "self_attn", "q_proj", "kernel"), (2, 32, 32), P(None, "fsdp", "tensor")),
        (("params", "layers", "mlp", "down_proj", "kernel"), (2, 64, 32), P(None, "tensor", "fsdp")),
        (("layers", "input_layernorm", "scale"), (2, 32), P()),
        # Fallback: a dim not divisible by its axis size is not split along that axis.
        (("embed_tokens", "embedding"), (97, 32), P(None, "fsdp")),
        (("lm_head", "kernel"), (32, 97), P("fsdp")),
        (("layers_0", "mlp", "down_proj", "kernel"), (64, 31), P("tensor")),
        (("layers_0", "self_attn", "k_proj", "kernel"), (33, 15), P()),
    ],
)
def test_param_partition_spec_rules(path, shape, want):
  assert sharding.param_partition_spec(path, shape, MESH_222) == want


def test_fallback_depends_on_axis_size():
  mesh = AbstractMesh((1, 3, 4), sharding.AXES)
  assert sharding.param_partition_spec(("lm_head", "kernel"), (30, 40), mesh) == P("fsdp", "tensor")
  assert sharding.param_partition_spec(("lm_head", "kernel"), (32, 40), mesh) == P(None, "tensor")
  assert sharding.param_partition_spec(("lm_head", "kernel"), (30, 42), mesh) == P("fsdp")


def test_param_shardings_on_eval_shape_tree_matches_real_tree():
  config = _config()
  abstract = jax.eval_shape(lambda k: init_params(config, k), jax.random.key(0))
  specs = jax.tree_util.tree_map(lambda s: s.spec, sharding.param_shardings(abstract, MESH_222))
  from_shapes = jax.tree_util.tree_map(
      lambda s: s.spec, sharding.param_shardings(convert.expected_param_shapes(config), MESH_222)
  )
  assert specs == from_shapes
  assert specs["layers"]["self_attn"]["q_proj"] == {"kernel": P(None, "fsdp", "tensor"), "bias": P()}
  assert specs["layers"]["mlp"]["down_proj"]["kernel"] == P(None, "tensor", "fsdp")
  assert specs["embed_tokens"]["embedding"] == P("tensor", "fsdp") and specs["lm_head"]["kernel"] == P("fsdp", "tensor")
  assert specs["norm"]["scale"] == P()
  n_leaves = len(jax.tree_util.tree_leaves(abstract))
  assert (
      len(jax.tree_util.tree_leaves(specs, is_leaf=lambda x: isinstance(x, P))) == n_leaves == 12 + 3
  )  # the stacked layers: 2 norms, q/k/v kernel+bias, o, 3 mlp; plus embedding, final norm, lm_head


def test_make_mesh_one_device_and_errors():
  mesh = sharding.make_mesh()
  assert mesh.axis_names == ("data", "fsdp", "tensor") and dict(mesh.shape) == {"data": 1, "fsdp": 1, "tensor": 1}
  with pytest.raises(ValueError, match=r"data=2 x fsdp=1 x tensor=1 = 2 != 1 available devices"):
    sharding.make_mesh(data=2)
  with pytest.raises(ValueError, match=r"fsdp=2 x tensor=1 = 2 does not divide the 1 available devices"):
    sharding.make_mesh(fsdp=2)
  with pytest.raises(ValueError, match="only one axis may be -1"):
    sharding.make_mesh(data=-1, fsdp=-1)
  with pytest.raises(ValueError, match=r"tensor=0 must be a positive int or -1"):
    sharding.make_mesh(tensor=0)


def test_distributed_env_detection(monkeypatch):
  for k in (
      "JAX_COORDINATOR_ADDRESS",
      "COORDINATOR_ADDRESS",
      "MEGASCALE_COORDINATOR_ADDRESS",
      "TPU_WORKER_HOSTNAMES",
      "JAX_NUM_PROCESSES",
      "SLURM_NTASKS",
      "OMPI_COMM_WORLD_SIZE",
  ):
    monkeypatch.delenv(k, raising=False)
  assert not sharding.multi_process_env()
  assert sharding.initialize_distributed_if_needed() is False  # one host: no-op
  monkeypatch.setenv("TPU_WORKER_HOSTNAMES", "host0")
  assert not sharding.multi_process_env()
  monkeypatch.setenv("TPU_WORKER_HOSTNAMES", "host0,host1")
  assert sharding.multi_process_env()
  monkeypatch.delenv("TPU_WORKER_HOSTNAMES")
  monkeypatch.setenv("SLURM_NTASKS", "4")
  assert sharding.multi_process_env()


_SCRIPT = textwrap.dedent("""
    import json, sys
    import jax, jax.numpy as jnp, numpy as np
    from displacement_jax import sharding
    from displacement_jax.models.config import ModelConfig
    from displacement_jax.models.transformer import Transformer, init_params
    out = {}
    mesh = sharding.make_mesh(data=-1, fsdp=2, tensor=2)
    out["mesh"] = dict(mesh.shape)
    try:
        sharding.make_mesh(data=3)
    except ValueError as e:
        out["err"] = str(e)
    config = ModelConfig(model_type="llama", vocab_size=96, hidden_size=32, intermediate_size=64, num_layers=1,
                         num_heads=4, num_kv_heads=2, head_dim=8)
    params = init_params(config, jax.random.key(0))
    sharded = sharding.shard_params(params, mesh)
    q = sharded["layers"]["self_attn"]["q_proj"]["kernel"]
    out["q_shard_shape"] = list(q.addressable_shards[0].data.shape)
    out["q_devices"] = len(q.sharding.device_set)
    out["norm_shard_shape"] = list(sharded["norm"]["scale"].addressable_shards[0].data.shape)
    ids = np.arange(8 * 5).reshape(8, 5) % 96
    batch = sharding.host_local_batch_to_global({"ids": ids, "mask": np.ones((8, 5), bool)}, mesh)
    out["batch_equal"] = bool((np.asarray(batch["ids"]) == ids).all())
    out["batch_shard_shape"] = list(batch["ids"].addressable_shards[0].data.shape)
    fn = lambda p, b: Transformer(config).apply({"params": p}, b["ids"], b["mask"]).logits_BTV
    sharded_logits = jax.jit(fn, in_shardings=(sharding.param_shardings(params, mesh), sharding.batch_sharding(mesh)),
                             out_shardings=sharding.replicated(mesh))(sharded, batch)
    ref = jax.jit(fn)(params, {"ids": jnp.asarray(ids), "mask": jnp.ones((8, 5), bool)})
    out["max_diff"] = float(jnp.abs(sharded_logits - jax.device_put(ref, sharding.replicated(mesh))).max())
    try:
        sharding.host_local_batch_to_global({"ids": ids[:3]}, mesh)
    except ValueError as e:
        out["batch_err"] = str(e)
    json.dump(out, open(sys.argv[1], "w"))
    """)


def test_eight_devices_placement_and_compute(tmp_path):
  script = tmp_path / "shard8.py"
  script.write_text(_SCRIPT)
  env = dict(
      os.environ,
      XLA_FLAGS="--xla_force_host_platform_device_count=8",
      JAX_PLATFORMS="cpu",
      PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
  )
  out_file = tmp_path / "out.json"
  proc = subprocess.run(
      [sys.executable, str(script), str(out_file)], env=env, capture_output=True, text=True, timeout=240
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  out = json.loads(out_file.read_text())
  assert out["mesh"] == {"data": 2, "fsdp": 2, "tensor": 2}
  assert "data=3 x fsdp=1 x tensor=1 = 3 != 8 available devices" in out["err"]
  assert out["q_shard_shape"] == [1, 16, 16] and out["q_devices"] == 8  # [1 layer, 32, 32], fsdp=2 x tensor=2
  assert out["norm_shard_shape"] == [32]
  assert out["batch_equal"] and out["batch_shard_shape"] == [2, 5]  # 8 rows over data x fsdp = 4
  assert out["max_diff"] < 1e-5
  assert "global batch 3 is not divisible by data x fsdp = 4" in out["batch_err"]
