"""The benchmark scripts run (tiny shapes, CPU) and measure the same computation as their PyTorch baselines."""

import jax
import numpy as np
import pytest

from benchmarks import cpu_vs_torch, flops, gpu_mfu, memory_plan, shapes


def test_flops_per_token_by_hand():
  # d=4, f=8, 1 layer, 2 heads of 2, 1 kv head, V=10, seq 3:
  # projections 2*4*4 + 2*2*4*2 + 2*4*4 = 96; attention 2*2*3*4 = 48; mlp 3*2*4*8 = 192; head 2*4*10 = 80.
  shape = dict(
      hidden_size=4,
      intermediate_size=8,
      num_layers=1,
      num_heads=2,
      num_kv_heads=1,
      head_dim=2,
      vocab_size=10,
      seq_len=3,
  )
  assert flops.forward_flops_per_token(**shape) == 96 + 48 + 192 + 80
  assert flops.forward_flops_per_token(lm_head=False, **shape) == 96 + 48 + 192
  assert flops.train_flops_per_token(**shape) == 3 * (96 + 48 + 192 + 80)
  assert flops.mfu(2e12, 2.0, 1.0) == pytest.approx(1.0)
  # a step laid out as 5 slots, 9 attention pairs, the head on 2 positions and recomputed once:
  # per slot 96 + 192; attention 2*2*2*2 = 16 per pair; head 80 per position.
  layout = {k: v for k, v in shape.items() if k != "seq_len"}
  got = flops.step_flops(slots=5, head_positions=2, attention_pairs=9, head_recomputed=True, **layout)
  assert got == 3 * (5 * (96 + 192) + 9 * 16 + 2 * 80) + 2 * 80
  # the attention's backward recomputing QK^T (half of the 16 forward FLOPs per pair) adds 9 * 8
  got = flops.step_flops(slots=5, head_positions=2, attention_pairs=9, scores_recomputed=True, **layout)
  assert got == 3 * (5 * (96 + 192) + 9 * 16 + 2 * 80) + 9 * 8


def test_cpu_vs_torch_same_scores_and_updates():
  out = cpu_vs_torch.main(
      [
          "--shape=tiny",
          "--rows=6",
          "--dpo_rows=3",
          "--steps=1",
          "--batch_size=4",
          "--prompt_len",
          "4",
          "12",
          "--response_len",
          "3",
          "20",
      ]
  )
  # Same weights, same rows: our CHES equals the official one-row-at-a-time PyTorch CHES.
  np.testing.assert_allclose(out["ches_ours"], out["ches_torch"], rtol=1e-4)
  np.testing.assert_allclose(out["ches_two_side"], out["ches_torch"], rtol=1e-4)  # the ablation layout too
  assert out["dpo_logp_max_abs_diff"] < 1e-3 and out["dpo_two_side_logp_max_abs_diff"] < 1e-3
  assert np.isfinite(out["dpo_flops_ratio"]) and out["dpo_flops_ratio"] > 0
  assert out["score_ratio_two_side"] > 0 and out["dpo_ratio_two_side"] > 0
  assert out["score_ratio"] > 0 and out["dpo_ratio"] > 0
  assert "| CHES scoring" in out["table"] and "| DPO step" in out["table"]


@pytest.mark.parametrize("task", ["dpo", "score"])
def test_gpu_mfu_script_runs_on_cpu(task, tmp_path):
  res = gpu_mfu.main(
      [
          f"--task={task}",
          "--shape=tiny",
          "--seq=16",
          "--batch=2",
          "--steps=1",
          "--peak_tflops=1.0",
          f'--json={tmp_path / "r.json"}',
      ]
  )
  per_token = (
      flops.train_flops_per_token(seq_len=16, **shapes.flops_shape("tiny"))
      if task == "dpo"
      else flops.forward_flops_per_token(seq_len=16, lm_head=False, **shapes.flops_shape("tiny"))
  )
  assert res["model_flops"] == per_token * 2 * 2 * 16
  assert res["mfu"] == pytest.approx(res["model_flops"] / res["seconds"] / 1e12)
  assert (tmp_path / "r.json").exists()


@pytest.mark.parametrize("task", ["dpo", "score"])
def test_gpu_mfu_packed_layout_runs_and_counts_flops(task):
  res = gpu_mfu.main(
      [f"--task={task}", "--shape=tiny", "--seq=16", "--batch=2", "--steps=1", "--packing=1", "--peak_tflops=1.0"]
  )
  s = shapes.flops_shape("tiny")
  # 2 rows of 8 prompt + 8 chosen + 8 rejected slots; the LM head (training only) on 2 x 16 response slots.
  body = flops.forward_flops_per_token(seq_len=24, lm_head=False, **s) * 2 * 24
  want = 3 * (body + 2 * s["hidden_size"] * s["vocab_size"] * 2 * 16) if task == "dpo" else body
  assert res["packing"] and res["model_flops"] == pytest.approx(want)
  assert res["mfu"] == pytest.approx(res["model_flops"] / res["seconds"] / 1e12)


def test_synthetic_batch_follows_contract():
  b = gpu_mfu.synthetic_batch(2, 8, 50)
  assert b["chosen_loss_mask_BT"][0].tolist() == [False] * 3 + [True] * 4 + [False]
  np.testing.assert_array_equal(b["chosen_labels_BT"][:, :-1], b["chosen_input_ids_BT"][:, 1:])


def test_device_peak_lookup():
  class Dev:
    device_kind = "NVIDIA H100 80GB HBM3"

  assert gpu_mfu.device_peak_tflops(Dev()) == flops.BF16_PEAK_TFLOPS["H100"]
  Dev.device_kind = "cpu"
  assert gpu_mfu.device_peak_tflops(Dev()) is None


def test_categorize_op_names():
  from benchmarks import profile_ops

  assert profile_ops.categorize("jit(f)/jvp(Transformer)/layers_0/mlp/gate_proj/dot_general") == "dense layers"
  assert profile_ops.categorize("jit(f)/Transformer/layers_1/self_attn/vmap()/div") == "attention"
  assert profile_ops.categorize("jit(f)/Transformer/layers_1/input_layernorm/mul") == "other model ops"
  assert profile_ops.categorize("jit(f)/transpose(jvp())/while/body/closed_call/bcd,dv->bcv/dot") == (
      "LM head + log-softmax"
  )
  assert profile_ops.categorize("jit(f)/rmsprop/sqrt") == "optimizer / rest"
  names = profile_ops.hlo_op_names(
      '  %fusion.3 = f32[2]{0} fusion(%a), metadata={op_name="jit(f)/x/add"}\n'
      '  ROOT %dot.1 = f32[2]{0} dot(%b), metadata={op_name="jit(f)/q_proj/dot"}'
  )
  assert names == {"fusion.3": "jit(f)/x/add", "dot.1": "jit(f)/q_proj/dot"}


@pytest.mark.parametrize("task", ["dpo", "score"])
def test_profile_ops_accounts_for_the_step(task):
  from benchmarks import profile_ops

  out = profile_ops.main([f"--task={task}", "--shape=tiny", "--pairs=2", "--steps=1", "--top=3"])
  cats = out["categories"]
  assert set(cats) == set(profile_ops.CATEGORIES)
  assert cats["dense layers"] > 0 and cats["attention"] > 0  # trace events matched HLO instructions
  assert (cats["LM head + log-softmax"] > 0) == (task == "dpo")  # scoring never runs the LM head
  assert sum(cats.values()) == pytest.approx(sum(out["ops"].values()))
  assert "| dense layers |" in out["table"]


def test_attention_benchmark_runs_and_agrees(tmp_path, capsys):
  """benchmarks/attention.py at the tiny shape: a row per implementation, each equal to the full square."""
  from benchmarks import attention  # pylint: disable=g-import-not-at-top

  out = tmp_path / "table.md"
  assert attention.main(["--shape=tiny", "--pairs=4", "--blocks=16,64", f"--append={out}"]) == 0
  rows = [line for line in out.read_text().splitlines() if line.startswith("| ") and " ms |" in line]
  names = ["reference", "xla", "blocked (16 queries)", "blocked (64 queries)"]
  assert [r.split("|")[1].strip() for r in rows] == names
  for r in rows:
    out_diff, grad_diff = (float(x) for x in r.split("|")[5].split("/"))
    assert out_diff < 1e-5 and grad_diff < 1e-4, r


def test_guard_benchmark_runs(tmp_path):
  """benchmarks/guard.py at the tiny shape: a row per guard and the unguarded floor, each with a compile time."""
  from benchmarks import guard  # pylint: disable=g-import-not-at-top

  out = tmp_path / "table.md"
  assert guard.main(["--shape=tiny", "--prompt_len=8", "--rounds=1", "--steps=1", f"--append={out}"]) == 0
  rows = [line for line in out.read_text().splitlines() if line.startswith("| ") and "x |" in line]
  assert [r.split("|")[1].strip() for r in rows] == ["guard='state'", "guard='gradients'", "no guard (floor)"]
  assert rows[-1].split("|")[4].strip() == "1.00x"


def test_step_ablation_benchmark_runs_and_the_variants_agree(tmp_path):
  """benchmarks/step_ablation.py at the tiny shape: the three variants, each compiled, computing the same step."""
  from benchmarks import step_ablation  # pylint: disable=g-import-not-at-top

  out = tmp_path / "table.md"
  assert step_ablation.main(["--shape=tiny", "--pairs=4", "--rounds=1", "--steps=1", f"--append={out}"]) == 0
  rows = [line.split("|") for line in out.read_text().splitlines() if line.startswith("| ") and "GiB" in line]
  assert [r[1].strip() for r in rows] == list(step_ablation.VARIANTS)
  assert rows[0][5].strip() == "1.00x"
  assert all(float(r[6]) < 1e-4 for r in rows)


def test_our_step_flops_counts_the_layout_as_it_runs():
  """One packed row of 200 slots (128-query blocks: 128 x 128 + 72 x 200 query-key pairs), 130 real response
  slots of 300: with chunks of 128 positions the LM head runs 2 chunks = 256 positions, and once more backward,
  as do the attention scores QK^T (both recomputations counted by hand in test_flops_per_token_by_hand)."""
  side = np.zeros((1, 300), np.int32)
  side[0, :130] = 1
  batch = {"packed_input_ids_BT": np.zeros((1, 200), np.int32), "response_side_BR": side}
  want = flops.step_flops(
      slots=200,
      head_positions=256,
      attention_pairs=128 * 128 + 72 * 200,
      head_recomputed=True,
      scores_recomputed=True,
      **shapes.flops_shape("tiny"),
  )
  assert cpu_vs_torch.our_step_flops("tiny", batch, chunk_size=128) == want


def test_memory_plan_counts_the_train_state_and_scoring_params():
  """The compile-time plan of the real train step and scoring pass at the tiny shape (seq 32): its arguments hold
  exactly the params (as many as HF's model of the same config has) and one RMSprop accumulator per param plus the
  batch, and the donated state aliases its update."""
  hf = pytest.importorskip("transformers").LlamaForCausalLM(shapes.hf_config("tiny"))
  n_params = hf.num_parameters()
  fixed = dict(seq=32, prompt=16)
  cases = memory_plan.grid(["train", "score"], ["tiny"], ["full"], ["float32"], [False, True], [2], ["1"], **fixed)
  assert [(c.task, c.remat) for c in cases] == [("train", False), ("train", True), ("score", False)]
  train, remat, score = (memory_plan.plan_one(c) for c in cases)
  for r in (train, remat, score):
    assert min(r["arguments"], r["outputs"], r["temporaries"]) > 0
    assert r["total"] == r["arguments"] + r["outputs"] - r["aliased"] + r["temporaries"]
  batch = lambda case: sum(
      x.nbytes for x in memory_plan.host_batch(case, shapes.SHAPES["tiny"]["vocab_size"], 1).values()
  )
  # equal up to a few scalars: step, rng, the schedule's count; jit drops batch fields a function never reads
  near = lambda got, want: abs(got - want) <= 32
  assert near(train["arguments"], 2 * 4 * n_params + batch(cases[0]))
  assert near(train["aliased"], 2 * 4 * n_params)  # the donated state is updated in place
  assert remat["arguments"] == train["arguments"]
  # scoring reads the last hidden states only: jit prunes the (untied) lm_head and the batch fields it never reads
  lm_head = shapes.SHAPES["tiny"]["vocab_size"] * shapes.SHAPES["tiny"]["hidden_size"]
  assert 4 * (n_params - lm_head) < score["arguments"] <= 4 * (n_params - lm_head) + batch(cases[2])
  assert score["unused"] >= 4 * lm_head and near(train["unused"], 0)  # what a run holds beside the program's


def test_memory_plan_lora_counts_base_adapters_and_their_optimizer_state():
  """The LoRA plan (rank 8, all-linear, bf16 base) at the tiny shape: its arguments hold the bf16 base params (HF's
  count), the fp32 adapters (PEFT's trainable count for the same r and targets) and one fp32 RMSprop accumulator
  per adapter param, plus the batch; only the donated state (adapters + accumulators) aliases its update."""
  transformers = pytest.importorskip("transformers")
  peft = pytest.importorskip("peft")
  hf = transformers.LlamaForCausalLM(shapes.hf_config("tiny"))
  n_base = hf.num_parameters()
  lora_config = peft.LoraConfig(r=memory_plan.LORA_RANK, lora_alpha=16, target_modules="all-linear")
  n_adapters, _ = peft.get_peft_model(hf, lora_config).get_nb_trainable_parameters()
  case = memory_plan.Case("train", "tiny", "lora", "bfloat16", True, 2, "1", seq=32, prompt=16)
  r = memory_plan.plan_one(case)
  batch = sum(x.nbytes for x in memory_plan.host_batch(case, shapes.SHAPES["tiny"]["vocab_size"], 1).values())
  near = lambda got, want: abs(got - want) <= 32  # step, rng, the schedule's count
  assert n_adapters > 0
  assert near(r["arguments"], 2 * n_base + 2 * 4 * n_adapters + batch)
  assert near(r["aliased"], 2 * 4 * n_adapters)
  assert r["total"] == r["arguments"] + r["outputs"] - r["aliased"] + r["temporaries"]
  prepared = memory_plan.prepare(case)  # the measuring run's real arguments have the planned shapes and dtypes
  spec = lambda tree: jax.tree.map(lambda x: (tuple(x.shape), str(x.dtype)), tree)
  assert spec(prepared.make_args()) == spec(prepared.args)
