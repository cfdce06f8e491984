"""gnp: gradient-based regularisation for JAX/Flax."""

import setuptools

setuptools.setup(
    name="gnp",
    version="0.1.0",
    description="Gradient-norm, sharpness and gradient-variance regularisers for JAX/Flax.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=setuptools.find_packages(include=["gnp", "gnp.*"]),
    python_requires=">=3.11",  # jax 0.7.0, the floor, needs 3.11.
    install_requires=[
        # >= floors: the lowest releases that pass, tested by CI (ci/floor.sh).
        "jax>=0.7.0",
        "flax>=0.10.5",
        "optax>=0.2.6",
        "chex>=0.1.87",
        "numpy",
        "absl-py",
        "ml_collections",
        "orbax-checkpoint>=0.11.22",
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
        # Equinox: ghost norms are tested on an Equinox model too.
        "test": ["pytest>=8", "pytest-xdist", "equinox"],
        # To read the TensorBoard event files the runs write.
        "tensorboard": ["tensorboard"],
    },
)
