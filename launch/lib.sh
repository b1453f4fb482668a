# Shared by the launch scripts (sourced, not run): print each command shell-readably, run it unless DRY_RUN=1.
# shellcheck shell=bash

quote_args() {  # shell-readable: plain words as-is, others in single quotes
  local out=() a
  for a in "$@"; do
    if [[ "$a" =~ ^[A-Za-z0-9_./:=@%+,~-]+$ ]]; then out+=("$a"); else out+=("'${a//\'/\'\\\'\'}'"); fi
  done
  echo "${out[*]}"
}

run() {  # print ('+ cmd'), and run unless --dry-run (DRY_RUN=1)
  echo "+ $(quote_args "$@")"
  if [[ ${DRY_RUN:-0} -eq 0 ]]; then "$@"; fi
}
