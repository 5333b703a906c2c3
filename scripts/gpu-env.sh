# Sourced by the gpu-*.sh scripts: libtorch from the machine's torch first on
# LD_LIBRARY_PATH (the path differs between machine kinds, and the 2-GPU host
# sets a LD_LIBRARY_PATH without torch), and the binary to run.
TORCH_LIB=/opt/torch/.venv/lib/python3.12/site-packages/torch/lib
[[ -d $TORCH_LIB ]] || TORCH_LIB=$(python3 -c 'import os, torch; print(os.path.join(os.path.dirname(torch.__file__), "lib"))')
export LD_LIBRARY_PATH=$TORCH_LIB${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
B=${MASKRCNN_BIN:-$PWD/target/gpu/maskrcnn}
