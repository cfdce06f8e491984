"""gnp: gradient-based regularisation for JAX/Flax."""

import setuptools

setuptools.setup(
    name="gnp",
    version="0.1.0",
    description="Gradient-norm, sharpness and gradient-variance regularisers for JAX/Flax.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=setuptools.find_packages(include=["gnp", "gnp.*"]),
    python_requires=">=3.10",
    install_requires=[
        "jax>=0.4.35",
        "flax>=0.10",
        "optax>=0.2.8",
        "chex>=0.1.87",
        "numpy",
        "absl-py",
        "ml_collections",
        "orbax-checkpoint",
        "tensorflow-datasets",
        # tensorflow-datasets imports it but declares it only for Python < 3.9.
        "importlib_resources",
        # The training system, studies and reports.
        "mnist1d",
        "tensorboardX",
        "optuna",
        "matplotlib",
        "scipy",  # gnp.report's t intervals.
    ],
    extras_require={
        "test": ["pytest>=8", "pytest-xdist"],
    },
)
