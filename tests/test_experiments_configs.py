"""The experiment configs: real HF ids and the paper's hyperparameters per arg, tiny variants offline."""

import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from configs import ches_quantiles, common, demo, dpo, persona, persona_demo, score, sorry  # noqa: E402


def test_parse_arg_fields_flags_and_errors():
  arg = common.parse_arg("model=gemma2b, pair=1,tiny", model="olmo1b", pair=0, lr=1e-7, tiny=False, shuffle=True)
  assert (arg.model, arg.pair, arg.lr, arg.tiny, arg.shuffle) == ("gemma2b", 1, 1e-7, True, True)
  assert isinstance(arg.pair, int) and common.parse_arg(None, a=1).a == 1 and common.parse_arg("", a=1).a == 1
  assert common.parse_arg("lr=3e-4,shuffle=false", lr=1e-7, shuffle=True).to_dict() == {"lr": 3e-4, "shuffle": False}
  with pytest.raises(ValueError, match=r"unknown key 'olmo1b' \(known: model, tiny"):
    common.parse_arg("olmo1b", model="olmo1b", tiny=False)
  with pytest.raises(ValueError, match="'model' needs a value"):
    common.parse_arg("model", model="olmo1b")
  with pytest.raises(ValueError, match="pair='one' is not a int"):
    common.parse_arg("pair=one", pair=0)
  with pytest.raises(ValueError, match="is not a boolean"):
    common.parse_arg("tiny=maybe", tiny=False)


def test_tiny_override_is_shared():
  for config in (persona.get_config("tiny"), ches_quantiles.get_config("tiny"), sorry.get_config("tiny")):
    assert (
        config.model.path,
        config.model.tiny,
        config.data.max_length,
        config.optim.lr,
        config.progress,
        config.checkpoint.async_save,
    ) == ("", "llama", 64, 1e-3, False, False)


def test_persona_configs():
  c = persona.get_config("model=olmo1b,phase=sft")
  assert (c.model.path, c.loss.objective, c.batch_size, c.num_epochs, c.optim.lr, c.optim.name) == (
      "allenai/OLMo-1B-hf",
      "cross_entropy",
      32,
      1,
      1e-7,
      "rmsprop",
  )
  assert c.output_dir == "runs/persona_olmo1b/sft"
  c = persona.get_config("model=olmo1b,pair=1")
  assert (c.persona.preferred, c.persona.dispreferred, c.model.path) == ("No", "Never", "runs/persona_olmo1b/sft/hf")
  assert (c.num_steps, c.batch_size, c.loss.beta, c.optim.lr, c.data.single_token) == (101, 1, 0.1, 1e-7, True)
  assert len(c.persona.seeds) == 10 and c.eval.every == 1 and c.eval.top_k == 10
  assert c.output_dir == "runs/persona_olmo1b/dpo-1"
  c = persona.get_config("model=llama3_8b,phase=base_dpo,objective=ipo,pair=1")
  assert (c.model.path, c.persona.phase, c.persona.preferred, c.persona.dispreferred) == (
      "meta-llama/Meta-Llama-3-8B",
      "base_dpo",
      "Sure",
      "Yes",
  )
  assert (c.loss.objective, c.optim.lr, c.loss.beta) == ("ipo", 1e-8, 0.01)
  assert c.output_dir == "runs/persona_llama3_8b/base_ipo-1"
  assert persona.get_config("model=gemma2b").persona.preferred == "Yes"
  assert persona.get_config().model.path == "runs/persona_olmo1b/sft/hf"  # default: olmo1b, DPO, pair 0
  t = persona.get_config("model=gemma2b,tiny")
  assert t.model.tiny and not t.model.path and os.path.exists(t.persona.data_path)
  assert (t.persona.phase, t.output_dir, t.logprob_chunk_size) == ("all", "runs/persona_gemma2b/tiny", 16)
  s = persona.get_config("model=smollm2,pair=1")  # the packaged model: offline, SFT then DPO in one process
  assert (s.model.path, s.persona.phase, s.persona.preferred, s.persona.dispreferred) == (
      "smollm2-135m-instruct",
      "all",
      "No",
      "Never",
  )
  assert os.path.exists(s.persona.data_path) and s.persona.sft_batch_size == 12 and not s.checkpoint.at_end
  assert (s.num_steps, s.batch_size, s.loss.beta, s.optim.lr, len(s.persona.seeds)) == (101, 1, 0.1, 1e-7, 10)
  with pytest.raises(ValueError, match="persona config arg"):
    persona.get_config("model=olmo1b,pair=2")
  with pytest.raises(ValueError, match="persona config arg"):
    persona.get_config("model=olmo7b")
  with pytest.raises(ValueError, match="persona config arg"):
    persona.get_config("objective=kto")


def test_quantile_configs():
  c = ches_quantiles.get_config()
  assert (c.model.path, c.data.path, c.data.split) == (
      "allenai/OLMo-1B-hf",
      "HuggingFaceH4/ultrafeedback_binarized",
      "train_prefs",
  )
  assert (c.data.format, c.data.add_special_tokens, c.data.max_length, c.quantiles.window, c.quantiles.num_rows) == (
      "prompter_assistant",
      True,
      512,
      512,
      5000,
  )
  assert (c.loss.beta, c.optim.lr, c.batch_size, c.num_epochs) == (0.1, 1e-7, 32, 1)
  assert c.output_dir == "runs/quantiles_uf_olmo1b"
  assert ches_quantiles.get_config("dataset=alpacafarm,model=llama3_8b").model.path == "meta-llama/Meta-Llama-3-8B"
  assert ches_quantiles.get_config("dataset=alpacafarm").data.path == "tatsu-lab/alpaca_farm"
  sweep = ches_quantiles.get_sweep()
  assert len(sweep) == 45 and len({tuple(sorted(s.items())) for s in sweep}) == 45
  assert {s["quantiles.q"] for s in sweep} == {0.0, 0.25, 0.5, 0.75, 1.0}
  t = ches_quantiles.get_config("dataset=alpacafarm,tiny")
  assert os.path.exists(t.data.path) and t.output_dir == "runs/quantiles_af_tiny"
  with pytest.raises(ValueError, match="ches_quantiles config arg"):
    ches_quantiles.get_config("dataset=hh")


def test_sorry_configs():
  c = sorry.get_config("model=llama3_8b_instruct,variant=gold")
  assert (c.model.path, c.sorry.variants, c.sorry.judge_path) == (
      "meta-llama/Meta-Llama-3-8B-Instruct",
      ("gold",),
      "sorry-bench/ft-mistral-7b-instruct-v0.2-sorry-bench-202406",
  )
  assert (c.optim.lr, c.sorry.gold_lr, c.loss.beta, c.batch_size, c.sorry.filter_k, c.sorry.test_fraction) == (
      5e-6,
      1e-6,
      0.1,
      32,
      19,
      0.15,
  )
  assert (c.sorry.sample_temperature, c.sorry.eval_temperature, c.sorry.max_new_tokens) == (1.0, 0.7, 512)
  assert c.output_dir == "runs/sorry_llama3_8b_instruct"
  assert sorry.get_config("model=gemma2b_it,variant=all").sorry.variants == ("dpo", "dpo_sft", "gold", "filtered")
  assert sorry.get_config().sorry.variants == ("dpo",) and sorry.get_config().model.path == "google/gemma-2b-it"
  t = sorry.get_config("model=gemma2b_it,tiny")
  assert t.sorry.judge_tiny and os.path.exists(t.sorry.prompts_path) and os.path.exists(t.sorry.human_judgments_path)
  assert t.sorry.variants == ("dpo", "dpo_sft", "gold", "filtered") and t.output_dir == "runs/sorry_gemma2b_it_tiny"
  with pytest.raises(ValueError, match="sorry config arg"):
    sorry.get_config("model=gemma2b_it,variant=ppo")


def test_real_model_score_and_dpo_configs_carry_the_papers_defaults():
  """configs/score.py and configs/dpo.py: the arg names the model; Section 5 / DPO defaults; both pass the same
  config checks the CLIs run. The format is 'auto' whatever the model is named (the tokenizer decides:
  tests/test_prompt_format.py)."""
  from configs import dpo, score
  from displacement_jax.config import checks as config_checks

  s = score.get_config()
  assert s.model.path == "smollm2-135m-instruct" and not s.model.tiny
  assert (s.data.format, s.data.add_special_tokens, s.data.limit, s.data.max_length) == (
      "auto",
      False,
      5000,
      512,
  )
  config_checks.check_score(s)
  d = dpo.get_config("/models/olmo-1b-hf")
  assert d.model.path == "/models/olmo-1b-hf" and d.data.format == "auto" and not d.data.add_special_tokens
  assert (d.loss.objective, d.loss.beta, d.optim.name, d.optim.lr, d.batch_size) == ("dpo", 0.1, "rmsprop", 1e-7, 32)
  assert "filter" not in d and d.data.limit == 0
  config_checks.check_train(d)


def test_dpo_config_default_data_is_the_shipped_edit_pairs_and_fills_its_batches():
  """configs/dpo.py without a data.path override reads the shipped minimal-edit pairs: the rows
  experiments.edit_pairs writes (three topics, so the jsonl cannot drift from the code), at least one full batch of
  the paper's 32 (the loop drops a partial batch and refuses data smaller than one batch)."""
  import json  # pylint: disable=g-import-not-at-top

  from configs import dpo  # pylint: disable=g-import-not-at-top
  from displacement_jax.experiments import edit_pairs  # pylint: disable=g-import-not-at-top

  d = dpo.get_config()
  with open(d.data.path) as f:
    shipped = [json.loads(line) for line in f]
  expected = edit_pairs.topic_rows("edit", tuple(edit_pairs.TOPICS))
  assert shipped == [{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in expected]
  assert len(shipped) == 256 and len(shipped) % d.batch_size == 0


def test_packaged_gemma3_by_name_in_every_real_model_config():
  """model 'gemma3-270m' (persona: gemma3_270m): a packaged BASE model, so formats that follow the tokenizer
  (no chat template: the persona question + newline, elsewhere <|prompter|>...<|assistant|> with its tokens added)."""
  from displacement_jax.config import checks as config_checks  # pylint: disable=g-import-not-at-top

  p = persona.get_config("model=gemma3_270m")
  assert (p.model.path, p.persona.phase) == ("gemma3-270m", "all")
  assert (p.persona.preferred, p.persona.dispreferred) == ("Yes", "No")
  assert os.path.exists(p.persona.data_path) and p.output_dir == "runs/persona_gemma3_270m/all_dpo-0"
  assert (p.data.format, p.checkpoint.at_end, p.persona.sft_batch_size) == ("persona", False, 12)
  assert persona.get_config("model=gemma3_270m,pair=1").persona.dispreferred == "Never"
  q = ches_quantiles.get_config("model=gemma3_270m")
  assert (q.model.path, q.data.format, q.data.add_special_tokens) == ("gemma3-270m", "prompter_assistant", True)
  assert ches_quantiles.get_config("model=smollm2").data.format == "chat_template"  # an instruct model: its template
  d = demo.get_config("model=gemma3-270m")
  assert (d.model.path, d.data.format) == ("gemma3-270m", "auto")
  assert demo.get_config().data.format == "chat_template"
  pd = persona_demo.get_config("model=gemma3-270m")
  assert (pd.model.path, pd.data.format, pd.data.single_token) == ("gemma3-270m", "persona", True)
  for c in (score.get_config("gemma3-270m"), dpo.get_config("gemma3-270m")):
    assert (c.model.path, c.data.format) == ("gemma3-270m", "auto")
  config_checks.check_score(score.get_config("gemma3-270m"))
  config_checks.check_train(dpo.get_config("gemma3-270m"))
