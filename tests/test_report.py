"""report.py on hand-written result.json / metrics.jsonl files: table values and written figures."""

import json
import os

import pytest

from displacement_jax import report


def _write(path, obj):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w") as f:
    json.dump(obj, f)


def test_persona_report(tmp_path, capsys):
  for seed, (start, low, end, gain) in {1: (0.9, 0.2, 0.3, ["Yes", "Maybe"]), 2: (0.8, 0.4, 0.5, ["Yes"])}.items():
    d = tmp_path / "dpo" / f"seed_{seed}"
    _write(
        str(d / "result.json"),
        {
            "family": "persona",
            "phase": "dpo",
            "objective": "dpo",
            "model": "tiny",
            "preferred": "No",
            "dispreferred": "Never",
            "start": start,
            "min": low,
            "end": end,
            "largest_drop": start - low,
            "benign": [g for g in gain if g == "Maybe"],
            "catastrophic": [g for g in gain if g == "Yes"],
            "w_pos_norm_start": 1.0 * seed,
            "w_pos_norm_end": 2.0 * seed,
            **{f"{k}_{e}": 0.0 for k in report.UNEMBEDDING_KEYS[1:] for e in ("start", "end")},
        },
    )
    with open(d / "metrics.jsonl", "w") as f:
      for step, p in enumerate((start, low, end)):
        f.write(json.dumps({"step": step, "monitor/preferred_prob": p}) + "\n")
  _write(str(tmp_path / "sft" / "result.json"), {"family": "persona", "phase": "sft"})
  out = report.report("persona", [str(tmp_path)], str(tmp_path / "plots"))
  (row,) = out["rows"]
  assert row["n_seeds"] == 2 and row["largest_drop"] == pytest.approx(0.55)
  assert (row["start"], row["min"], row["end"]) == pytest.approx((0.85, 0.3, 0.4))
  assert row["catastrophic"] == ["Yes"] and row["benign"] == ["Maybe"]
  assert (row["w_pos_norm_start"], row["w_pos_norm_end"]) == (1.5, 3.0)
  text = capsys.readouterr().out
  assert "No/Never" in text and " 0.550 " in text and "0.850->0.300" in text and "Table 13" in text
  assert os.path.getsize(out["plots"][0]) > 1000


def test_quantiles_report(tmp_path):
  for m, q, s, v in [
      ("ches", 0.0, 0, -1.0),
      ("ches", 0.0, 1, -2.0),
      ("ches", 1.0, 0, -5.0),
      ("ches", 1.0, 1, -7.0),
      ("last_hidden_inner_product", 0.0, 0, -3.0),
      ("last_hidden_inner_product", 1.0, 0, -1.0),
  ]:
    _write(
        str(tmp_path / f"{m}_{q}_{s}" / "result.json"),
        {"family": "quantiles", "measure": m, "q": q, "seed": s, "preferred_logprob_change": v},
    )
  out = report.report("quantiles", [str(tmp_path)])
  assert [(r["measure"], r["q"], r["mean"], r["min"], r["max"]) for r in out["rows"]] == [
      ("ches", 0.0, -1.5, -2.0, -1.0),
      ("ches", 1.0, -6.0, -7.0, -5.0),
      ("last_hidden_inner_product", 0.0, -3.0, -3.0, -3.0),
      ("last_hidden_inner_product", 1.0, -1.0, -1.0, -1.0),
  ]
  assert out["plots"] == [str(tmp_path / "quantiles.png")] and os.path.getsize(out["plots"][0]) > 1000


def test_sorry_report(tmp_path, capsys):
  rate = lambda r, u=0: {"refusal_rate": r, "n": 10, "n_parsed": 10 - u, "n_unparsable": u}
  _write(
      str(tmp_path / "result.json"),
      {
          "family": "sorry",
          "model": "meta-llama/Meta-Llama-3-8B-Instruct",
          "initial": {"train": rate(0.744), "test": rate(0.7)},
          "variants": {"dpo": {"train": rate(0.334), "test": rate(0.3, 2)}, "filtered": {"train": rate(0.7)}},
      },
  )
  out = report.report("sorry", [str(tmp_path)])
  assert [(r["method"], r["train"]) for r in out["rows"]] == [("initial", 0.744), ("dpo", 0.334), ("filtered", 0.7)]
  assert out["rows"][1]["test_unparsable"] == 2
  text = capsys.readouterr().out
  assert "74.4%" in text and "33.4%" in text and "n/a" in text
  assert os.path.getsize(out["plots"][0]) > 1000


def test_report_errors(tmp_path, capsys):
  assert report.main(["quantiles", str(tmp_path)]) == 1
  assert "no quantiles result.json" in capsys.readouterr().err
  with pytest.raises(ValueError, match="does not exist"):
    report.report("sorry", [str(tmp_path / "missing")])


@pytest.mark.parametrize(
    "value, message",
    [
        (None, "field 'largest_drop': missing (written by an unfinished or older pipeline?)"),
        ("0.5", "field 'largest_drop': must be a number, got '0.5'"),
    ],
)
def test_report_names_the_file_and_field_of_a_bad_result(tmp_path, capsys, value, message):
  row = {"family": "persona", "preferred": "No", "dispreferred": "Never", "start": 0.9, "min": 0.2, "end": 0.3}
  if value is not None:
    row["largest_drop"] = value
  _write(str(tmp_path / "seed_1" / "result.json"), row)
  assert report.main(["persona", str(tmp_path)]) == 1
  assert capsys.readouterr().err.strip().splitlines() == [
      f"error: file '{tmp_path / 'seed_1' / 'result.json'}', {message}"
  ]


def test_report_plot_is_written_atomically(tmp_path, monkeypatch):
  """A plot that fails while being written leaves no half PNG under its name."""
  import matplotlib.figure  # pylint: disable=g-import-not-at-top

  def half_then_fail(self, fname, **kwargs):
    with open(fname, "wb") as f:
      f.write(b"\x89PNG half")
    raise OSError(28, "No space left on device")

  monkeypatch.setattr(matplotlib.figure.Figure, "savefig", half_then_fail)
  rows = [{"measure": "ches", "q": 0.5, "mean": -1.0, "min": -2.0, "max": 0.0, "n_seeds": 2}]
  with pytest.raises(OSError):
    report.plot_quantiles(rows, str(tmp_path / "quantiles.png"))
  assert os.listdir(tmp_path) == []
