"""Install script for dense_diffusion.

Run-time stack only in install_requires; reference libraries that the tests compare against
(PyTorch, diffusers, transformers, scikit-image, torchmetrics) live in the `test` extra so that
a training machine never needs torch.
"""
from setuptools import find_packages, setup

setup(
    name="dense_diffusion",
    version="0.1.0",
    description="Re-purposing pre-trained text-to-image diffusion models for dense vision tasks (JAX/Flax NNX).",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["dense_diffusion", "dense_diffusion.*"]),
    include_package_data=True,
    package_data={"dense_diffusion.datasets": ["*.json"]},
    install_requires=[
        "jax>=0.8",
        "flax>=0.12",
        "optax>=0.2.4",
        "orbax-checkpoint>=0.11",
        # Workdir paths (local or gs://); gs:// goes through tf.io.gfile, so no gcsfs is needed.
        "etils[epath]>=1.5",
        "tensorflow-cpu>=2.18",
        "tensorflow-datasets>=4.9.7",
        "ml_collections>=1.0",
        "clu>=0.0.12",
        "tensorboard>=2.18",
        "safetensors>=0.4",
        "tokenizers>=0.20",
        "dm-pix>=0.4.3",
        "numpy>=1.26",
        "scipy>=1.11",
        "h5py>=3.10",  # Hypersim's HDF5 files (datasets/hypersim).
        "pillow>=10.0",
        "matplotlib>=3.8",
        "absl-py>=2.1",
        "tqdm>=4.66",
        "importlib_resources>=6.0",  # TFDS builders import it.
    ],
    extras_require={
        "test": [
            "pytest>=8.0",
            "pytest-xdist>=3.5",
            "torch==2.13.0",
            "diffusers>=0.35",
            "transformers>=4.50",
            "peft>=0.17",  # tests/test_lora_interop.py: diffusers' load_lora_adapter needs it
            "scikit-image>=0.24",
            "torchmetrics>=1.4",
            "nbclient>=0.10",  # tests/test_notebook.py executes notebooks/demo.ipynb headless
            "nbformat>=5.10",
            "ipykernel>=6.29",
            # tests/test_compile.py compiles a tiny run for a v5e slice (same pin as tpu-aot).
            "libtpu==0.0.42.*",
        ],
        "gpu": ["jax[cuda12]>=0.8"],
        "tpu": ["jax[tpu]>=0.8"],
        # `main compile` on a machine without TPUs: libtpu describes a TPU slice's devices and
        # compiles for them (docs/compile.md). The libtpu jax 0.10.2 was built with.
        "tpu-aot": ["libtpu==0.0.42.*"],
    },
)
