"""Install fbnet_fast. The C++/CUDA sources (csrc/) and the Triton kernels (kernels/)
go inside the installed package as fbnet_fast/csrc and fbnet_fast.kernels, so an
installed copy can compile its extension just in time on first use."""
import re
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).parent
VERSION = re.search(r'__version__ = "([^"]+)"',
                    (ROOT / "fbnet_fast" / "__init__.py").read_text()).group(1)

setup(
    name="fbnet_fast",
    version=VERSION,
    description="FBNet differentiable architecture search with fused, memory-light kernels",
    long_description=(ROOT / "README.md").read_text() if (ROOT / "README.md").exists() else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.9",
    packages=["fbnet_fast", "fbnet_fast.nn", "fbnet_fast.backends", "fbnet_fast.latency",
              "fbnet_fast.search", "fbnet_fast.cli", "fbnet_fast.kernels", "fbnet_fast.csrc"],
    package_dir={"fbnet_fast.kernels": "kernels", "fbnet_fast.csrc": "csrc"},
    package_data={"fbnet_fast.csrc": ["*.cpp", "*.h", "cpu/*.cpp", "cpu/*.h",
                                      "cuda/*.cu", "cuda/*.cuh", "cuda/*.h"]},
    install_requires=[
        "torch>=2.11",
        "numpy",
        "ninja",
        "pybind11",
        'triton; platform_system == "Linux" and platform_machine == "x86_64"',
        "tqdm",
        "matplotlib",
    ],
    extras_require={
        "vision": ["torchvision"],
        # ONNX export and latency tables measured in ONNX Runtime (docs/latency.md)
        "onnx": ["onnx", "onnxruntime", "onnxscript"],
        # found architectures as timm models (fbnet-fast export --timm)
        "timm": ["timm"],
        # examples/digits_folder.py: a real data set shipped inside scikit-learn
        "examples": ["scikit-learn"],
        "dev": ["pytest", "pytest-benchmark"],
    },
    entry_points={"console_scripts": ["fbnet-fast = fbnet_fast.cli:main"]},
)
