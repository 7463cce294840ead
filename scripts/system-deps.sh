#!/usr/bin/env bash
# System packages the offline default needs: WordNet (an offline retention benchmark is built
# from its definitions). SLURM/munge are installed by the SLURM integration test itself.
set -euo pipefail
if [ -d /usr/share/wordnet ] || [ -f /usr/share/wordnet/data.noun ]; then exit 0; fi
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  apt-get update -qq >/dev/null
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wordnet-base >/dev/null
else
  echo "note: Debian package wordnet-base is not installed and this user cannot install it;" \
       "the offline WordNet benchmark needs /usr/share/wordnet (install it, or point" \
       "params.yaml eval.wordnet_dir elsewhere)." >&2
fi
