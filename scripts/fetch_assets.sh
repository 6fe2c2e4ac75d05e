#!/usr/bin/env bash
# Fetch the offline datasets that ship inside Debian packages into data/raw/.
# Idempotent: a dataset already unpacked is left alone. Needs no root for dpkg -x;
# `apt-get download` needs the package lists, so we refresh them once if it fails.
set -euo pipefail
cd "$(dirname "$0")/.."
raw=data/raw
mkdir -p "$raw"

fetch_deb() {  # fetch_deb PACKAGE SOURCE_DIR_IN_PACKAGE TARGET_DIR
  local package=$1 source=$2 target=$3
  if [ -d "$target" ] && [ -n "$(ls -A "$target" 2>/dev/null)" ]; then
    return 0
  fi
  local work
  work=$(mktemp -d)
  trap 'rm -rf "$work"' RETURN
  if ! (cd "$work" && apt-get download "$package" >/dev/null 2>&1); then
    if [ "$(id -u)" = 0 ]; then apt-get update -qq >/dev/null 2>&1 || true; fi
    if ! (cd "$work" && apt-get download "$package" >/dev/null 2>&1); then
      echo "error: could not download the Debian package '$package' (needed for $target)." >&2
      echo "       Check that Debian's package registry is reachable, or place the files in $target yourself." >&2
      return 1
    fi
  fi
  dpkg -x "$work"/"$package"_*.deb "$work/unpacked"
  # Unpack beside the target, then rename, so an interrupted fetch never leaves a half-filled folder.
  mkdir -p "$target.partial"
  cp -r "$work/unpacked/$source/." "$target.partial/"
  rm -rf "$target"
  mv "$target.partial" "$target"
  echo "fetched $package -> $target"
}

fetch_deb dataset-fashion-mnist usr/share/datasets/fashion-mnist "$raw/fashion-mnist"
fetch_deb r-cran-modeldata usr/lib/R/site-library/modeldata/data "$raw/modeldata"
# Voice prompts (spoken_language: one folder per language, 8 kHz WAV, CC-BY-SA-3.0) and
# drum one-shots (Hydrogen's drum kits: WAV, FLAC, AIFF) for the audio experiments.
sounds=usr/share/asterisk/sounds
fetch_deb asterisk-core-sounds-en-wav "$sounds/en_US_f_Allison" "$raw/asterisk/en"
fetch_deb asterisk-core-sounds-es-wav "$sounds/es_MX_f_Allison" "$raw/asterisk/es"
fetch_deb asterisk-core-sounds-fr-wav "$sounds/fr_CA_f_June" "$raw/asterisk/fr"
fetch_deb asterisk-core-sounds-it-wav "$sounds/it_IT_m_Carlo" "$raw/asterisk/it"
fetch_deb asterisk-core-sounds-ru-wav "$sounds/ru_RU_f_IvrvoiceRU" "$raw/asterisk/ru"
fetch_deb hydrogen-drumkits usr/share/hydrogen/data/drumkits "$raw/hydrogen-drumkits"
