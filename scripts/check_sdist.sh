#!/usr/bin/env bash
# Packaging check: build rnnkern's sdist, install it into a fresh virtual environment that has the CPU
# build of torch, and check that the install works. Steps:
#   1. a fresh venv with TORCH_SPEC (default torch==2.13.0, the CPU build) and the build tools;
#   2. `python -m build --sdist --no-isolation`; every tracked file under csrc/, docs/, rnnkern/ and the
#      top-level build files must be in it, and no build output;
#   3. RNNKERN_BUILD_CUDA=1 without a CUDA torch must stop with setup.py's message, not a traceback;
#   4. `pip install --no-build-isolation` of the sdist (RNNKERN_BUILD_CUDA=auto: says why no CUDA);
#   5. outside the source tree: build_info(), the version's single source, and the cpu and reference
#      backends against torch.nn (outputs, every gradient, grad norms) in float64.
# Takes a few minutes (it compiles the C++ kernels). Usage: scripts/check_sdist.sh [--keep]
# Environment: PYTHON (default python3), TORCH_SPEC, MAX_JOBS (default 2).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PYTHON=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
export MAX_JOBS=${MAX_JOBS:-2}
# shellcheck source=work_folder.sh
source "$ROOT/scripts/work_folder.sh"
make_work_folder sdist "$@"
fail() { echo "FAIL: $*" >&2; exit 1; }

step "fresh venv with $TORCH_SPEC"
"$PYTHON" -m venv "$WORK/venv"
VPY="$WORK/venv/bin/python"
"$VPY" -m pip install -q "$TORCH_SPEC" numpy setuptools wheel build ninja > "$WORK/venv.log" 2>&1 \
    || { tail -30 "$WORK/venv.log"; fail "installing $TORCH_SPEC and the build tools"; }
"$VPY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"

step "sdist"
# Run from $WORK: in the source tree, its build/ folder would shadow the `build` package.
(cd "$WORK" && "$VPY" -m build --sdist --no-isolation --outdir "$WORK/dist" "$ROOT") > "$WORK/sdist.log" 2>&1 \
    || { tail -30 "$WORK/sdist.log"; fail "python -m build --sdist"; }
SDIST=$(ls "$WORK"/dist/rnnkern-*.tar.gz)
echo "$(basename "$SDIST"): $(du -h "$SDIST" | cut -f1)"

step "sdist contents"
tar tzf "$SDIST" | sed 's|^[^/]*/||' | sort > "$WORK/contents.txt"
missing=0
while read -r file; do
    if ! grep -qxF "$file" "$WORK/contents.txt"; then echo "missing from the sdist: $file"; missing=1; fi
done < <(cd "$ROOT" && git ls-files csrc docs rnnkern README.md pyproject.toml setup.py MANIFEST.in)
[[ $missing == 0 ]] || fail "the sdist lacks tracked files (MANIFEST.in)"
if grep -E '\.(so|o|pyc)$|^build/' "$WORK/contents.txt"; then fail "build output in the sdist"; fi
echo "$(wc -l < "$WORK/contents.txt") entries; csrc files: $(grep -c '^csrc/.' "$WORK/contents.txt")"

step "RNNKERN_BUILD_CUDA=1 without a CUDA torch stops with a message"
if RNNKERN_BUILD_CUDA=1 "$VPY" -m pip install --no-build-isolation --no-deps "$SDIST" > "$WORK/cuda1.log" 2>&1; then
    fail "RNNKERN_BUILD_CUDA=1 installed although torch has no CUDA"
fi
grep -q "rnnkern: not building the CUDA kernels: torch .* is not a CUDA build" "$WORK/cuda1.log" \
    || { tail -30 "$WORK/cuda1.log"; fail "no clear message for RNNKERN_BUILD_CUDA=1"; }
if grep -q "^Traceback" "$WORK/cuda1.log"; then fail "a traceback for RNNKERN_BUILD_CUDA=1"; fi
grep -o "rnnkern: not building the CUDA kernels:.*" "$WORK/cuda1.log" | head -1

step "pip install --no-build-isolation (RNNKERN_BUILD_CUDA=auto)"
"$VPY" -m pip install -v --no-build-isolation "$SDIST" > "$WORK/install.log" 2>&1 \
    || { tail -40 "$WORK/install.log"; fail "pip install of the sdist"; }
grep -o "rnnkern: not building the CUDA kernels:.*" "$WORK/install.log" | head -1 \
    || fail "setup.py did not say why it skipped the CUDA kernels"

step "smoke test of the installed package"
cd "$WORK"  # not the source tree: import the installed rnnkern
"$VPY" - "$ROOT" <<'PY'
import importlib.metadata
import os
import sys

import torch

import rnnkern

root = sys.argv[1]
assert not os.path.dirname(rnnkern.__file__).startswith(root), rnnkern.__file__
info = rnnkern.build_info()
print("build_info:", info)
assert info["extension"] and not info["cuda_kernels"] and info["torch_cuda"] is None, info
assert {"cpu", "reference"} <= set(rnnkern.backends()), rnnkern.backends()
scope = {}
exec(open(os.path.join(root, "rnnkern", "_version.py")).read(), scope)
assert importlib.metadata.version("rnnkern") == rnnkern.__version__ == scope["__version__"]

torch.manual_seed(0)
for kind, kwargs in [("LSTM", {"proj_size": 2}), ("GRU", {}), ("RNN", {"nonlinearity": "relu"})]:
    ref = getattr(torch.nn, kind)(3, 5, num_layers=2, bidirectional=True, **kwargs).double()
    x = torch.randn(7, 3, 3, dtype=torch.float64)
    ref_x = x.clone().requires_grad_()
    out_ref, _ = ref(ref_x)
    out_ref.pow(2).sum().backward()
    norms = {}
    for backend in ("cpu", "reference"):
        ours = getattr(rnnkern, kind)(3, 5, num_layers=2, bidirectional=True, backend=backend,
                                      record_grad_norms=True, **kwargs).double()
        ours.load_state_dict(ref.state_dict())
        our_x = x.clone().requires_grad_()
        out, _ = ours(our_x)
        out.pow(2).sum().backward()
        torch.testing.assert_close(out, out_ref, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(our_x.grad, ref_x.grad, rtol=1e-10, atol=1e-10)
        for p, p_ref in zip(ours.parameters(), ref.parameters()):
            torch.testing.assert_close(p.grad, p_ref.grad, rtol=1e-10, atol=1e-10)
        norms[backend] = ours.grad_norms.h_per_sample
    torch.testing.assert_close(norms["cpu"], norms["reference"], rtol=1e-6, atol=1e-6)
    print(f"{kind}: cpu and reference match torch.nn (outputs, gradients, norms)")
PY
step "OK: the sdist installs and works in a fresh venv with $TORCH_SPEC"
