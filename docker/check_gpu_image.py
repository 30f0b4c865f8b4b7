"""Checks the built GPU image on a machine without a GPU (README, "The GPU image"):

    podman run --rm --network none -v "$PWD/docker/check_gpu_image.py:/tmp/check.py:ro" IMAGE python /tmp/check.py

Both backends import; JAX finds its CUDA plugin; every CUDA library that the plugin preloads or that
TensorFlow's dlopen check needs is in the nvidia wheels and loads, cuDNN's sub-libraries as its
CUDNN_LIB_CONFIG says (the driver's libcuda.so.1 aside,
which the host brings); the plugin's version check passes as far as it goes without a GPU; ptxas
runs and libdevice is there; and ldd finds nothing else missing. Exits non-zero on any failure.
"""

import ctypes
import glob
import os
import subprocess
from importlib.metadata import entry_points

import jax
import jaxlib
import keras
import keras_hub
import tensorflow as tf

print("imports: tensorflow", tf.__version__, "jax", jax.__version__, "jaxlib", jaxlib.__version__,
      "keras", keras.__version__, "keras_hub", keras_hub.__version__)
build = tf.sysconfig.get_build_info()
assert build["is_cuda_build"], build
print("tensorflow: a CUDA build, cuda", build["cuda_version"], "cudnn", build["cudnn_version"])

import jax_plugins.xla_cuda12 as plugin  # noqa: E402  the PJRT plugin, found through its entry point

plugins = sorted(e.name for e in entry_points(group="jax_plugins"))
assert plugins == ["xla_cuda12"], plugins
site = os.path.dirname(os.path.dirname(os.path.dirname(plugin.__file__)))
print("jax plugin:", plugins, plugin._get_library_path())

# jax_plugins/xla_cuda12/__init__.py preloads these and ignores failures: load them here and fail loudly.
NEEDED = {"cuda_runtime": ["libcudart.so.12"], "cuda_nvrtc": ["libnvrtc.so.12", "libnvrtc-builtins.so.12.9"],
          "cublas": ["libcublas.so.12", "libcublasLt.so.12"], "nccl": ["libnccl.so.2"],
          "cuda_cupti": ["libcupti.so.12"], "cusparse": ["libcusparse.so.12"], "cusolver": ["libcusolver.so.11"],
          "cufft": ["libcufft.so.11"], "nvjitlink": ["libnvJitLink.so.12"]}
# cuDNN in NVIDIA's reduced configuration (Dockerfile) keeps the graph API and its runtime-compiled
# engines; FULL keeps the legacy API (ops, cnn, adv) and the precompiled kernels as well.
CUDNN_JIT = ["libcudnn.so.9", "libcudnn_graph.so.9", "libcudnn_engines_runtime_compiled.so.9",
             "libcudnn_engines_tensor_ir.so.9"]
CUDNN_REST = ["libcudnn_engines_precompiled.so.9", "libcudnn_heuristic.so.9", "libcudnn_ops.so.9",
              "libcudnn_cnn.so.9", "libcudnn_adv.so.9", "libcudnn_ext.so.9"]
cudnn_config = os.environ.get("CUDNN_LIB_CONFIG", "FULL")
NEEDED["cudnn"] = CUDNN_JIT + (CUDNN_REST if cudnn_config == "FULL" else [])
absent = [lib for lib in CUDNN_REST if not os.path.exists(os.path.join(site, "nvidia", "cudnn", "lib", lib))]
assert absent == ([] if cudnn_config == "FULL" else CUDNN_REST), (cudnn_config, absent)
print(f"cudnn: CUDNN_LIB_CONFIG={cudnn_config}, left out: {absent or 'nothing'}")
loaded, need_driver = [], []
for package, libs in NEEDED.items():
    for lib in libs:
        path = os.path.join(site, "nvidia", package, "lib", lib)
        assert os.path.isfile(path), path
        try:
            ctypes.CDLL(path)
            loaded.append(lib)
        except OSError as error:
            assert "libcuda.so.1" in str(error), error  # only the driver may be missing
            need_driver.append(lib)
print(f"dlopen: {len(loaded)} CUDA libraries load; {need_driver} need only the driver's libcuda.so.1")

plugin._load_nvidia_libraries()
plugin._import_extensions()  # what plugin.initialize() does first; its version check then counts GPUs
versions = plugin.cuda_versions
for name, scale in (("cuda_runtime", 10), ("cudnn", 100), ("cufft", 100), ("cupti", 1), ("cublas", 100),
                    ("cusparse", 100)):
    installed, built = getattr(versions, f"{name}_get_version")(), getattr(versions, f"{name}_build_version")()
    assert installed // scale >= built // scale, (name, installed, built)
    print(f"  {name}: installed {installed}, jax built against {built}")

ptxas = os.path.join(site, "nvidia", "cuda_nvcc", "bin", "ptxas")
print("ptxas:", subprocess.run([ptxas, "--version"], capture_output=True, text=True, check=True)
      .stdout.strip().splitlines()[-1])
libdevice = glob.glob(os.path.join(site, "nvidia", "cuda_nvcc", "nvvm", "libdevice", "libdevice.*.bc"))
assert libdevice
print("libdevice:", libdevice)

missing = {}
for path in glob.glob(os.path.join(site, "**", "*.so*"), recursive=True):
    if any(f"/{p}/" in path for p in ("tensorflow", "jaxlib", "jax_plugins", "jax_cuda12_plugin", "nvidia")):
        for line in subprocess.run(["ldd", path], capture_output=True, text=True).stdout.splitlines():
            if "not found" in line:
                missing.setdefault(line.split()[0], []).append(os.path.relpath(path, site))
assert set(missing) <= {"libcuda.so.1"}, missing
print("ldd: not found:", {lib: paths for lib, paths in missing.items()} or "nothing")
