#!/usr/bin/env bash
# The CPU path against PyTorch CPU in one run, same threads, same cases (names join the two).
#   PYTHON=/path/to/venv/bin/python benches/cpu_vs_pytorch.sh [threads]
# Run it on a quiet machine: a build beside it makes both sides several times slower.
set -euo pipefail
cd "$(dirname "$0")/.."
threads="${1:-$(nproc)}"
python="${PYTHON:-python3}"
mkdir -p target/bench
cargo build --release --quiet
"$python" benches/pytorch_ops.py --threads "$threads" --json > target/bench/pytorch_cpu.json
RAYON_NUM_THREADS="$threads" target/release/vipo --device cpu bench --peer target/bench/pytorch_cpu.json --json > target/bench/vipo_cpu.json
python3 - <<'PY'
import json
rows = json.load(open("target/bench/vipo_cpu.json"))
print(f"{'case':<34} {'vipo ms':>9} {'torch ms':>9} {'vipo/torch':>10}")
for r in rows:
    print(f"{r['name']:<34} {r['ms']:>9.2f} {r.get('peer_ms') or float('nan'):>9.2f} {r.get('ratio') or float('nan'):>10.2f}")
PY
