"""InstaBoost experiment framework: Hydra-composed MindSpore Mask R-CNN runs tracked in MLflow.

Importing the package sets one process-wide default before MindSpore loads its OpenMP runtime
(libgomp, loaded by ``import mindspore`` and shared with the project's C++ kernels, which
read the variable once, at load): idle OpenMP threads sleep instead of spinning. libgomp's
default spins for a while after every parallel region, and MindSpore's own thread pool runs on
the same cores between two kernel calls, so a spinning thread takes a core from it. Measured at
512², batch 2, bfloat16 products, learning rate 0 (a fixed workload), runs of 5 steps
alternating between the two: median step 4.7-5.5 s passive vs 5.5-6.2 s spinning. A value the
user set wins.
"""
import os
import sys
import warnings

OPENMP_WAIT_POLICY = "PASSIVE"

if "OMP_WAIT_POLICY" not in os.environ:
    if "mindspore" in sys.modules:
        warnings.warn("mindspore was imported before instaboost, so its OpenMP threads keep "
                      "libgomp's spinning default; import instaboost first or set "
                      f"OMP_WAIT_POLICY={OPENMP_WAIT_POLICY} (a CPU train step is about 10% "
                      "slower without)", RuntimeWarning, stacklevel=2)
    os.environ["OMP_WAIT_POLICY"] = OPENMP_WAIT_POLICY
