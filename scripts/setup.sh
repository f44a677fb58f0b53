#!/usr/bin/env bash
# One-command, idempotent set-up: Debian fonts (kanji data) + Chromium (report check), then a virtual
# environment in .venv with torch pinned by constraints.txt and recallk installed editable with its dev extras.
# Quick when everything is already there: each step checks before it acts.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
FONTS_TSV=src/recallk/data/kanji/fonts.tsv

missing_pkgs=()
while IFS=$'\t' read -r pkg file; do
  [[ -z "$pkg" || "$pkg" == \#* ]] && continue
  [[ -f "$file" ]] || missing_pkgs+=("$pkg")
done < "$FONTS_TSV"
command -v chromium >/dev/null 2>&1 || missing_pkgs+=(chromium)

if ((${#missing_pkgs[@]})); then
  mapfile -t missing_pkgs < <(printf '%s\n' "${missing_pkgs[@]}" | sort -u)
  echo "setup: installing Debian packages: ${missing_pkgs[*]}"
  SUDO=""; [[ $(id -u) -ne 0 ]] && SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing_pkgs[@]}" >/dev/null
else
  echo "setup: fonts and chromium already installed"
fi

stamp="$VENV/.recallk-setup-stamp"
want=$(cat pyproject.toml constraints.txt | sha256sum | cut -d' ' -f1)
if [[ -x "$VENV/bin/python" && -f "$stamp" && "$(cat "$stamp")" == "$want" ]] \
   && "$VENV/bin/python" -c "import recallk, torch, torchvision, timm, faiss" 2>/dev/null; then
  echo "setup: $VENV up to date"
else
  echo "setup: building $VENV (torch from constraints.txt; first time takes a few minutes)"
  # torch's CUDA build needs about 6 GB in the venv plus room to unpack: say so before pip fails half-way.
  need_kb=$((8 * 1024 * 1024))
  free_kb=$(df -Pk "$(dirname "$(realpath -m "$VENV")")" | awk 'NR==2 {print $4}')
  if [[ -n "$free_kb" && "$free_kb" -lt "$need_kb" && ! -x "$VENV/bin/python" ]]; then
    echo "setup: only $((free_kb / 1024)) MB free where $VENV goes; building it needs about 8 GB." >&2
    echo "setup: free some disk (old clones' .venv folders, /tmp/pytest-of-$(id -un)) or set VENV=/path/with/room." >&2
    exit 1
  fi
  [[ -x "$VENV/bin/python" ]] || "$PYTHON" -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip
  "$VENV/bin/python" -m pip install -q -c constraints.txt torch torchvision
  "$VENV/bin/python" -m pip install -q -c constraints.txt -e ".[dev]"
  echo "$want" > "$stamp"
fi
