import re
from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).parent
# The version lives in dasg_kernels/_version.py only (read here without importing torch).
VERSION = re.search(r'^__version__ = "([^"]+)"', (HERE / "dasg_kernels" / "_version.py").read_text(), re.M).group(1)

setup(
    name="dasg-kernels",
    version=VERSION,
    description=(
        "Triton kernels for long-sequence Mixture-of-Experts transformers: grouped "
        "sliding-window attention with group summaries (GMHA) and routed experts (ADR + DSSE)."
    ),
    long_description=(HERE / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    license_files=["LICENSE"],
    classifiers=[
        "License :: OSI Approved :: Apache Software License",
        "Programming Language :: Python :: 3",
        "Operating System :: OS Independent",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
    python_requires=">=3.10",
    packages=find_packages(include=["dasg_kernels*", "dasg_model*", "benchmarks*"]),
    package_data={"dasg_kernels": ["py.typed"], "dasg_model": ["py.typed"]},
    install_requires=["torch>=2.4", "triton>=3.2", "numpy"],
    extras_require={
        "test": ["pytest", "pytest-benchmark", "pytest-xdist", "numpy"],
        "bench": [
            "matplotlib",
            "liger-kernel==0.8.5",  # fused MoE: a calibration peer (benchmarks/calibrate.py)
            "fla-core==0.6.0",  # parallel_attn: the attention peer the compile report predicts
        ],
        "hf": ["transformers>=4.56", "accelerate>=1.1"],  # accelerate: transformers.Trainer
    },
)
