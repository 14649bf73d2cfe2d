# Sourced on a device machine: install the project editable, or, where pip finds no build backend,
# build the extensions with CMake into the source tree and put the tree on PYTHONPATH.
python -m pip install --no-build-isolation --no-deps -e . -q 2>&1 | tail -3
if ! python -c "import engine._core" 2>/dev/null; then
  python -c "import scikit_build_core.build" 2>&1 | tail -2
  cmake -S . -B /tmp/selfeval-build -G Ninja -DCMAKE_BUILD_TYPE=Release -DCMAKE_CUDA_ARCHITECTURES=90 \
    -DPython_EXECUTABLE="$(command -v python)" -Dpybind11_DIR="$(python -m pybind11 --cmakedir)" > /tmp/cmake.log 2>&1 \
    && cmake --build /tmp/selfeval-build >> /tmp/cmake.log 2>&1 || tail -20 /tmp/cmake.log
  cp /tmp/selfeval-build/_core*.so /tmp/selfeval-build/_cpu*.so /tmp/selfeval-build/_cuda*.so engine/ 2>/dev/null
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
  printf '#!/usr/bin/env bash\nexec python -m engine.cli "$@"\n' > /tmp/selfeval && chmod +x /tmp/selfeval
  export PATH="/tmp:$PATH"
fi
