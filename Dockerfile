# syntax=docker/dockerfile:1
#
# dli on CUDA 12: torch (CUDA 12.6 build), NVIDIA DALI and CuPy for CUDA 12, on Ubuntu 24.04 / Python 3.12.
#
#   docker build -t dli .
#   mkdir -p runs && docker run --gpus all -v "$PWD/runs:/runs" dli train
#   docker run --gpus all -v /path/to/MT:/data:ro -v "$PWD/runs:/runs" dli train --data /data
#
# Stages: `base` (CUDA runtime + Python), `builder` (a virtual environment in /opt/venv), and the
# final stage, which copies that environment onto `base`: no compiler, no pip cache, no sources.
# Versions are pinned to those the test suite is run with; tests/test_dockerfile.py checks every
# package installed here against pyproject.toml (the dependencies and the `cuda12` extra).

# CUDA 12.6 to match the torch build below. The runtime flavour carries the CUDA 12 libraries CuPy
# loads (NVRTC, cuRAND, cuBLAS, ...); cudnn-runtime would add a cuDNN that only torch uses, and the
# torch wheel brings its own.
FROM nvidia/cuda:12.6.3-runtime-ubuntu24.04 AS base

ARG DEBIAN_FRONTEND=noninteractive
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 \
    && rm -rf /var/lib/apt/lists/*
ENV LANG=C.UTF-8 \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PATH=/opt/venv/bin:$PATH


FROM base AS builder

SHELL ["/bin/bash", "-o", "pipefail", "-c"]
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3-venv \
    && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/venv
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# torch 2.14.1 from the PyTorch cu126 index: 2.14 ships CUDA 12.6 builds there, while PyPI's default
# torch is a CUDA 13 build, and one environment holds one CUDA major (DALI and CuPy here are CUDA 12
# builds). torchvision is no direct dependency, but timm and segmentation-models-pytorch need it, and
# it must come from the same index as torch (its CUDA ops are built against one torch build). The
# frozen pair then constrains every later install, so no resolver step can swap torch for PyPI's
# CUDA 13 build.
RUN pip install --index-url https://download.pytorch.org/whl/cu126 torch==2.14.1 torchvision==0.29.1 \
    && pip freeze | grep -E '^(torch|torchvision)==' > /opt/torch-constraints.txt
ENV PIP_CONSTRAINT=/opt/torch-constraints.txt

# Dependencies before the sources, so editing code does not re-run this layer. The pins in this
# command are the layer's cache key; pyproject.toml is not copied first, as it would only re-run
# the layer on edits to its tool settings (tests/test_dockerfile.py keeps the two in step).
WORKDIR /src
RUN pip install \
        "nvidia-dali-cuda120==2.4.0" \
        "cupy-cuda12x==14.2.0" \
        "segmentation-models-pytorch==0.6.0" \
        "timm==1.0.31" \
        "numpy==2.4.6" \
        "scipy==1.17.1" \
        "pillow==13.0.0" \
        "tqdm==4.70.1" \
        "matplotlib==3.11.2" \
        "tensorboard==2.21.0" \
        "pyyaml==6.0.4" \
        "pycocotools==2.0.11" \
        "contourpy==1.3.3"

# The project itself, without dependencies (all installed above). `pip check` fails the build if
# pyproject.toml declares something the layer above did not install; the import line fails it if
# torch is not a CUDA 12 build or a GPU library does not load.
COPY . .
RUN pip install --no-deps . \
    && pip check \
    && python -c "import torch; assert torch.version.cuda.startswith('12.'), torch.version.cuda" \
    && python -c "import torchvision, cupy, nvidia.dali, segmentation_models_pytorch, timm, dli.train"


FROM base

COPY --from=builder /opt/venv /opt/venv

# An unprivileged user `dli`. Ubuntu 24.04 images ship a user `ubuntu` holding uid 1000, the usual
# uid of a desktop user: dli takes that uid over, so files written to a mounted folder belong to
# that user on the host (others pass `--user "$(id -u):$(id -g)"`).
# `train` writes to runs/<name> relative to the working directory: /workspace/runs links to the
# /runs volume, so run folders land in the mounted host folder and the paths a run prints
# (runs/<name>/best.pt) work as given in later `dli eval` / `dli predict` calls.
RUN if id -u ubuntu > /dev/null 2>&1; then userdel --remove ubuntu; fi \
    && useradd --create-home --user-group --uid 1000 --shell /usr/sbin/nologin dli \
    && mkdir -p /data /runs /workspace \
    && chown dli:dli /runs /workspace \
    && ln -s /runs /workspace/runs
# Caches live in the /runs volume too: the generated synthetic dataset (DLI_CACHE), downloaded
# encoder weights (Hugging Face and torch hub read XDG_CACHE_HOME), CuPy's compiled kernels and
# Triton's (`train --compile`) persist across containers, and whichever uid may write the run
# folder may write them. CuPy and Triton would otherwise cache under $HOME, which Docker sets to
# / for a `--user` uid that has no passwd entry: `import cupy` then fails creating
# /.cupy/kernel_cache. No compiler is installed, so `train --compile` (Triton builds a C launcher
# at run time) needs gcc and python3-dev added.
ENV XDG_CACHE_HOME=/runs/.cache \
    DLI_CACHE=/runs/.cache/dli \
    MPLCONFIGDIR=/runs/.cache/matplotlib \
    CUPY_CACHE_DIR=/runs/.cache/cupy \
    TRITON_CACHE_DIR=/runs/.cache/triton
USER dli
WORKDIR /workspace
VOLUME ["/data", "/runs"]

ENTRYPOINT ["dli"]
CMD ["train"]
