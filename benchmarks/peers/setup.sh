#!/usr/bin/env bash
# Creates benchmarks/peers/.venv, the peers' own environment: this project (editable), SUPREME 0.1.5 and what
# it imports, every version pinned in requirements.txt. Never the project's .venv: SUPREME pins old torch and
# Lightning, so everything is installed with --no-deps from the pinned list, and the CUDA-built torchvision is
# made importable against CPU torch by a start-up hook in this environment only (torchvision_cpu_shim.py).
#   bash benchmarks/peers/setup.sh        (PYTHON=python3.11 to choose the interpreter)
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
VENV="$HERE/.venv"
[ -x "$VENV/bin/python" ] || "${PYTHON:-python3}" -m venv "$VENV"
"$VENV/bin/python" -m pip install --quiet --no-deps -r "$HERE/requirements.txt"
"$VENV/bin/python" -m pip install --quiet --no-deps -e "$ROOT"
SITE="$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
printf '%s\n%s\n' "$HERE" "import torchvision_cpu_shim; torchvision_cpu_shim.install()" \
  > "$SITE/peers_torchvision_cpu_shim.pth"
OMP_NUM_THREADS=1 "$VENV/bin/python" -c '
import supreme_methods, torch, torchvision, supreme, lightning_unlearn
print(f"peers ready: torch {torch.__version__}, torchvision {torchvision.__version__}, SUPREME {supreme.__version__}:",
      ", ".join(supreme_methods.PEERS))'
