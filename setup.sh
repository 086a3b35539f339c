#!/usr/bin/env bash
# Installs what the app needs (`./setup.sh`) or what the tests need too (`./setup.sh test`) on Debian/Ubuntu.
set -euo pipefail
cd "$(dirname "$0")"

system_packages=(ffmpeg libportaudio2)
python_requirements=requirements.txt
if [[ "${1:-}" == "test" ]]; then
  system_packages+=(chromium espeak-ng sox tmux)
  python_requirements=requirements-test.txt
fi

missing=()
for package in "${system_packages[@]}"; do
  dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed" || missing+=("$package")
done
# Debian's own python3 makes virtual environments only with python3-venv installed
python3 -c "import ensurepip" 2>/dev/null || missing+=(python3-venv)
if (( ${#missing[@]} )); then
  sudo_cmd=(); [[ $(id -u) -ne 0 ]] && sudo_cmd=(sudo)
  echo "Installing system packages: ${missing[*]}"
  "${sudo_cmd[@]}" apt-get update -qq
  DEBIAN_FRONTEND=noninteractive "${sudo_cmd[@]}" apt-get install -y -qq "${missing[@]}" >/dev/null
fi

if [[ ! -x .venv/bin/python ]]; then
  python3 -m venv .venv
fi
.venv/bin/pip install -q -r "$python_requirements"
