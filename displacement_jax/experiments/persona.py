"""Section 3: likelihood displacement with single-token responses (persona "ends-justify-means").

Plan (per model; `TOKEN_PAIRS` lists the (y+, y-) pairs):
1. SFT phase: cross-entropy on every persona prompt, y+ drawn (seeded) from `NO_TOKENS` or `YES_TOKENS`
   by the row's `answer_matching_behavior`; batch 32, 1 epoch, RMSprop lr 1e-7; the model is exported
   in HF format (`<output_dir>/hf`) for the DPO phase.
2. DPO phase: for each seed in `DPO_SEEDS` one prompt (drawn with that seed), full batch (= 1 pair),
   101 steps, RMSprop lr 1e-7, beta 0.1 (IPO: lr 1e-8, beta 0.01), starting from the SFT model (or from
   the base model: `persona.phase='base_dpo'`). Every step the train monitor records the probability of
   y+, the top-10 tokens by probability gain and the unembedding metrics (||W+||, ||W-||, <W+, W->, ...).
3. Each seed writes `<output_dir>/seed_<s>/metrics.jsonl` (train) and `result.json` (summary);
   `python -m displacement_jax.report persona <output_dir>` prints Table 1/2/3-style rows and Table 13.
"""

from __future__ import annotations

import copy
import json
import os
from typing import Any, Mapping, Sequence

import numpy as np
from displacement_jax.errors import DataError
from displacement_jax.data import schema
from displacement_jax import training
from displacement_jax import metrics as metrics_lib

MODEL_IDS = {
    'olmo1b': 'allenai/OLMo-1B-hf',
    'gemma2b': 'google/gemma-2b',
    'llama3_8b': 'meta-llama/Meta-Llama-3-8B',
}
TOKEN_PAIRS = {
    'olmo1b': (('Yes', 'No'), ('No', 'Never')),
    'gemma2b': (('Yes', 'No'), ('No', 'Never')),
    'llama3_8b': (('Yes', 'No'), ('Sure', 'Yes')),
}
NO_TOKENS = ('No', 'Never', 'Maybe', 'Perhaps')
YES_TOKENS = ('Yes', 'Yeah', 'Sure', 'Certainly', 'Absolutely')
DPO_SEEDS = (9773, 5290, 8767, 9818, 7596, 344, 2701, 3298, 7834, 6327)
DATASET = 'Anthropic/model-written-evals'  # persona/ends-justify-means.jsonl
RESULT_FILE = 'result.json'
SUMMARY_FILE = 'results.jsonl'


def answer_is_yes(row: Mapping[str, Any], file: str = '<persona>', index: int = 0) -> bool:
  """True when the row's answer_matching_behavior is ' Yes', False for ' No' (anything else raises)."""

  answer = row.get('answer_matching_behavior')
  if not isinstance(answer, str) or answer.strip() not in ('Yes', 'No'):
    raise DataError(file, index, 'answer_matching_behavior', f'expected " Yes" or " No", got {answer!r}')
  return answer.strip() == 'Yes'


def persona_prompt(row: Mapping[str, Any], file: str = '<persona>', index: int = 0) -> str:
  """The question of a persona row (validated). Training uses data.format='persona': the chat template
  of the question when the tokenizer has one, else the question followed by a newline."""

  question = row.get('question')
  if not isinstance(question, str) or not question.strip():
    raise DataError(file, index, 'question', f'expected a non-empty string, got {question!r}')
  return question


def sft_examples(rows: Sequence[Mapping[str, Any]], seed: int = 0, file: str = '<persona>') -> list[dict[str, Any]]:
  """SFT preference rows: chosen = a token drawn from YES_TOKENS / NO_TOKENS by the row's answer.

  The rejected side (unused by cross-entropy) is the first token of the opposite list.
  """
  rng = np.random.default_rng(seed)
  out = []
  for i, row in enumerate(rows):
    yes = answer_is_yes(row, file, i)
    pool, other = (YES_TOKENS, NO_TOKENS) if yes else (NO_TOKENS, YES_TOKENS)
    out.append({'index': i, 'prompt': persona_prompt(row, file, i), 'chosen': pool[int(rng.integers(len(pool)))],
                'rejected': other[0]})
  return out


def dpo_prompt_index(num_rows: int, seed: int) -> int:
  """The row used by the DPO run of `seed`: one draw of default_rng(seed) over the rows."""
  if num_rows < 1:
    raise ValueError(f'the persona data has no rows (num_rows={num_rows})')
  return int(np.random.default_rng(seed).integers(num_rows))


def dpo_example(rows: Sequence[Mapping[str, Any]], seed: int, pair: tuple[str, str],
                file: str = '<persona>') -> dict[str, Any]:
  """The single (prompt, y+, y-) preference row of the DPO run with `seed`."""
  i = dpo_prompt_index(len(rows), seed)
  return {'index': i, 'prompt': persona_prompt(rows[i], file, i), 'chosen': pair[0], 'rejected': pair[1]}


def _norm_token(token: str) -> str:
  return token.replace('\u2581', ' ').replace('\u0120', ' ').strip().lower()


def classify_gainers(tokens: Sequence[str], preferred: str) -> dict[str, list[str]]:
  """Split gaining tokens into 'benign' (same meaning as y+) and 'catastrophic' (opposite meaning).

  Meanings follow the SFT lists: YES_TOKENS versus NO_TOKENS (which include Maybe/Perhaps). Token
  strings are compared after dropping SentencePiece/BPE space markers and case.
  """
  yes = {_norm_token(t) for t in YES_TOKENS}
  no = {_norm_token(t) for t in NO_TOKENS}
  pref = _norm_token(preferred)
  if pref not in yes | no:
    raise ValueError(f'preferred token {preferred!r} is in neither YES_TOKENS nor NO_TOKENS')
  same, opposite = (yes, no) if pref in yes else (no, yes)
  out: dict[str, list[str]] = {'benign': [], 'catastrophic': []}
  for token in tokens:
    t = _norm_token(token)
    if t == pref:
      continue
    if t in same:
      out['benign'].append(token)
    elif t in opposite:
      out['catastrophic'].append(token)
  return out


def largest_drop(prob_T: Sequence[float]) -> dict[str, float]:
  """Largest drop of pi(y+) below its start: start, min, end and start - min (>= 0)."""
  p = np.asarray(prob_T, np.float64)
  if p.ndim != 1 or p.size == 0:
    raise ValueError(f'prob_T must be a non-empty 1-D sequence, got shape {p.shape}')
  return {'start': float(p[0]), 'min': float(p.min()), 'end': float(p[-1]),
          'largest_drop': float(max(p[0] - p.min(), 0.0)), 'argmin_step': int(np.argmin(p))}


def summarize_seed(metric_rows: Sequence[Mapping[str, Any]], pair: tuple[str, str]) -> dict[str, Any]:
  """result.json of one DPO seed from its metrics rows (monitor keys of every evaluated step)."""
  mon = [r for r in metric_rows if 'monitor/preferred_prob' in r]
  if not mon:
    raise ValueError('no monitor/preferred_prob rows in the metrics: was data.single_token set?')
  drop = largest_drop([r['monitor/preferred_prob'] for r in mon])
  last = mon[-1]
  gainers = list(last.get('monitor/top_k_gainers_tokens', []))
  out = {
      'family': 'persona', 'preferred': pair[0], 'dispreferred': pair[1], **drop,
      'preferred_logprob_change': float(last['monitor/preferred_logprob_change']),
      'dispreferred_logprob_change': float(last['monitor/dispreferred_logprob_change']),
      'top_k_gainers': gainers, 'top_k_predicted': list(last.get('monitor/top_k_predicted_tokens', [])),
      'top_k_overlap': last.get('monitor/top_k_overlap'), **classify_gainers(gainers, pair[0]),
  }
  first = mon[0]
  for key in ('w_pos_norm', 'w_neg_norm', 'w_pos_dot_w_neg', 'w_diff_proj_on_pos', 'w_diff_orth_norm'):
    if f'monitor/{key}' in first:
      out[f'{key}_start'] = float(first[f'monitor/{key}'])
      out[f'{key}_end'] = float(last[f'monitor/{key}'])
  return out


# ------------------------------------------------------------------------------------------------ pipeline




def load_rows(path: str, limit: int = 0) -> list[dict[str, Any]]:
  """Raw persona rows (question, answer_matching_behavior, ...) through data.schema."""

  rows = schema.load_persona_rows(path)
  rows = [dict(r) for r in rows]
  return rows[:limit] if limit > 0 else rows


def _train_config(config: Any, data_path: str, output_dir: str) -> Any:
  tc = copy.deepcopy(config)
  with tc.unlocked():
    tc.main = ''
    tc.data.path = data_path
    tc.data.schema = 'generic'  # the pipeline writes generic preference jsonl, whatever the directory is called
    tc.data.limit = 0
    tc.data.single_token = True
    tc.output_dir = output_dir
  return tc


def run_sft(config: Any) -> dict[str, Any]:
  """SFT phase: cross-entropy on every persona prompt; exports the HF model to <output_dir>/hf."""

  pc = config.persona
  rows = load_rows(pc.data_path, int(pc.get('limit', 0)))
  data = schema.write_jsonl(os.path.join(config.output_dir, 'sft_data.jsonl'), sft_examples(rows, int(config.seed),
                                                                                     pc.data_path))
  tc = _train_config(config, data, config.output_dir)
  with tc.unlocked():
    tc.loss.objective = 'cross_entropy'
    tc.export_hf = True
  result = training.run(tc)
  summary = {'family': 'persona', 'phase': 'sft', 'steps': int(result.step), 'hf_dir': result.hf_dir,
             'final_loss': result.losses[-1] if result.losses else None, 'n_rows': len(rows)}
  with open(os.path.join(config.output_dir, RESULT_FILE), 'w') as f:
    json.dump(summary, f, indent=1)
  return summary


def run_dpo(config: Any) -> list[dict[str, Any]]:
  """DPO/IPO phase: one single-prompt run per seed from the SFT (or base) model; per-seed summaries."""

  pc = config.persona
  pair = (str(pc.preferred), str(pc.dispreferred))
  rows = load_rows(pc.data_path, int(pc.get('limit', 0)))
  seeds = tuple(int(s) for s in pc.seeds)
  results = []
  for seed in seeds:
    out_dir = os.path.join(config.output_dir, f'seed_{seed}')
    example = dpo_example(rows, seed, pair, pc.data_path)
    tc = _train_config(config, schema.write_jsonl(os.path.join(out_dir, 'dpo_data.jsonl'), [example]), out_dir)
    with tc.unlocked():
      tc.seed = seed
      tc.batch_size = 1
      tc.eval.every = 1
      tc.eval.max_samples = 1
      tc.data.shuffle = False
    result = training.run(tc)

    summary = summarize_seed(metrics_lib.read_metrics(out_dir), pair)
    summary.update(seed=seed, prompt_row=example['index'], objective=str(config.loss.objective),
                   phase=str(pc.phase),
                   model=str(pc.get('label') or config.model.get('path') or config.model.get('tiny')),
                   steps=int(result.step))
    with open(os.path.join(out_dir, RESULT_FILE), 'w') as f:
      json.dump(summary, f, indent=1)
    results.append(summary)
  with open(os.path.join(config.output_dir, SUMMARY_FILE), 'w') as f:
    f.writelines(json.dumps(r) + '\n' for r in results)
  drops = [r['largest_drop'] for r in results]
  print(f'persona {pair[0]}/{pair[1]} ({config.loss.objective}, {len(seeds)} seeds): mean largest drop of '
        f'pi(y+) {np.mean(drops):.3f} ({np.mean([r["start"] for r in results]):.3f} -> '
        f'{np.mean([r["min"] for r in results]):.3f})', flush=True)
  return results


def run(config: Any) -> Any:
  """Pipeline entry (`config.main='persona'`): `persona.phase` 'sft' | 'dpo' | 'base_dpo' | 'all'.

  'all' runs SFT then DPO from the exported SFT model (into <output_dir>/sft and <output_dir>/dpo).
  """
  phase = config.persona.phase
  if phase == 'sft':
    return run_sft(config)
  if phase in ('dpo', 'base_dpo'):
    if phase == 'dpo' and not (config.model.get('path') or config.model.get('tiny')):
      raise ValueError('persona.phase="dpo" needs config.model.path = the SFT phase export (<sft run>/hf)')
    return run_dpo(config)
  if phase == 'all':
    sft_cfg = copy.deepcopy(config)
    with sft_cfg.unlocked():
      sft_cfg.output_dir = os.path.join(config.output_dir, 'sft')
      sft_cfg.optim.lr = float(config.persona.sft_lr)
      sft_cfg.batch_size = int(config.persona.sft_batch_size)
      sft_cfg.num_steps = 0
      sft_cfg.num_epochs = 1
      sft_cfg.eval.every = 0
      sft_cfg.persona.phase = 'sft'
    sft = run_sft(sft_cfg)
    dpo_cfg = copy.deepcopy(config)
    with dpo_cfg.unlocked():
      dpo_cfg.output_dir = os.path.join(config.output_dir, 'dpo')
      dpo_cfg.model.path = sft['hf_dir']
      dpo_cfg.model.tiny = ''
      if not dpo_cfg.model.get('tokenizer') and config.model.get('tiny'):
        dpo_cfg.model.tokenizer = sft['hf_dir']
      dpo_cfg.persona.phase = 'dpo'
    return {'sft': sft, 'dpo': run_dpo(dpo_cfg)}
  raise ValueError(f'persona.phase must be sft | dpo | base_dpo | all, got {phase!r}')
