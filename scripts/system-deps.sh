#!/usr/bin/env bash
# System packages the offline default needs, installed when missing:
#   wordnet-base  WordNet (an offline retention benchmark is built from its definitions),
#   bubblewrap    /usr/bin/bwrap, the OS-level sandbox that runs model-generated code (HumanEval).
# SLURM/munge are installed by the SLURM integration test itself.
set -euo pipefail
missing=()
[ -f /usr/share/wordnet/data.noun ] || missing+=(wordnet-base)
[ -x /usr/bin/bwrap ] || missing+=(bubblewrap)
if [ "${#missing[@]}" -eq 0 ]; then exit 0; fi
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  apt-get update -qq >/dev/null
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
  exit 0
fi
for package in "${missing[@]}"; do
  case "$package" in
    wordnet-base)
      echo "note: Debian package wordnet-base is not installed and this user cannot install it;" \
           "the offline WordNet benchmark needs /usr/share/wordnet (install it, or point" \
           "params.yaml eval.wordnet_dir elsewhere)." >&2 ;;
    bubblewrap)
      echo "note: Debian package bubblewrap (/usr/bin/bwrap) is not installed and this user cannot" \
           "install it; HumanEval refuses to execute generated code without it (install it, or set" \
           "params.yaml eval.sandbox: guard for the weaker in-process guard)." >&2 ;;
  esac
done
