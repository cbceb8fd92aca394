from setuptools import find_packages, setup

setup(
    name="dasg-kernels",
    version="0.1.0",
    description=(
        "Triton kernels for long-sequence Mixture-of-Experts transformers: grouped "
        "sliding-window attention with group summaries (GMHA) and routed experts (ADR + DSSE)."
    ),
    python_requires=">=3.10",
    packages=find_packages(include=["dasg_kernels*", "dasg_model*", "benchmarks*"]),
    install_requires=["torch>=2.4", "triton>=3.2", "numpy"],
    extras_require={
        "test": ["pytest", "pytest-benchmark", "pytest-xdist", "numpy"],
        "bench": ["matplotlib"],
        "hf": ["transformers>=4.56", "accelerate>=1.1"],  # accelerate: transformers.Trainer
    },
)
