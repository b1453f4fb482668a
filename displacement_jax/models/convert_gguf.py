r"""Convert a GGUF file (or a packaged model name) into an HF checkpoint directory that transformers opens.

    python -m displacement_jax.models.convert_gguf smollm2-135m-instruct /tmp/smollm2
    python -m displacement_jax.models.convert_gguf model.Q8_0.gguf OUT_DIR --dtype=bfloat16 --overwrite

Writes config.json, model.safetensors (dequantized; float32 by default), generation_config.json (the GGUF's
bos/eos/pad ids) and the tokenizer files with the chat template (when the GGUF carries a tokenizer). The directory is assembled under a temporary
name and renamed at the end, so OUT_DIR is either complete or absent. Exit status: 0, 1 (unreadable or
unsupported GGUF: one line naming it), 2 (usage).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from typing import Sequence

from displacement_jax import rundir
from displacement_jax.models import gguf, loading, packaged, tokenizer
from displacement_jax.models import io as io_lib


def convert(source: str, out_dir: str, *, dtype: str = "float32", overwrite: bool = False) -> str:
  """Write the HF directory of GGUF `source` to `out_dir` (see the module docstring); returns `out_dir`."""
  if os.path.exists(out_dir) and not overwrite:
    raise FileExistsError(f"{out_dir} exists; pass --overwrite to replace it")
  path = packaged.resolve_gguf(source)
  _, params, config = gguf.from_gguf(path, dtype="float32")
  tok = tokenizer.load_tokenizer(path) if gguf.has_tokenizer(path) else None
  tmp = f"{os.path.normpath(out_dir)}.partial"
  shutil.rmtree(tmp, ignore_errors=True)
  io_lib.save_pretrained(params, config, tmp, dtype=dtype, progress=False)
  if tok is not None:
    tok.save_pretrained(tmp)
  else:
    print(f"note: {path} carries no tokenizer; {out_dir} holds the model only", file=sys.stderr)
  rundir.write_json(os.path.join(tmp, "generation_config.json"), loading.generation_config(path, config), indent=2)
  return rundir.replace_dir(tmp, out_dir)


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(
      prog="python -m displacement_jax.models.convert_gguf",
      description=__doc__,
      formatter_class=argparse.RawDescriptionHelpFormatter,
  )
  parser.add_argument("source", help=f'a .gguf file or a packaged model name ({", ".join(sorted(packaged.PACKAGED))})')
  parser.add_argument("out_dir", help="the HF checkpoint directory to write")
  parser.add_argument(
      "--dtype",
      default="float32",
      choices=("float32", "bfloat16", "float16"),
      help="stored dtype of the weights (default float32)",
  )
  parser.add_argument("--overwrite", action="store_true", help="replace an existing out_dir")
  args = parser.parse_args(argv)
  if not packaged.is_gguf(args.source):
    parser.error(f"{args.source!r} is neither a .gguf file nor a packaged model name")
  try:
    convert(args.source, args.out_dir, dtype=args.dtype, overwrite=args.overwrite)
  except FileExistsError as e:
    parser.error(str(e))
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  print(f"wrote {args.out_dir} (transformers: AutoModelForCausalLM.from_pretrained({args.out_dir!r}))")
  return 0


if __name__ == "__main__":
  sys.exit(main())
