# GPU image for the Ray head and workers of a capfilt cluster (docs/cluster.md). Every node imports
# capfilt's stages and the job's driver runs on the head, so every node runs this image:
#   docker build -t registry.example.com/capfilt:0.1.0-ray2.60.0 .
#   docker push registry.example.com/capfilt:0.1.0-ray2.60.0
# The tag names capfilt's version and Ray's: a new capfilt gets a new tag, so no node keeps running
# old code under a reused name (Kubernetes' IfNotPresent would not pull it again).
#
# Ray must be the same version on the submitting machine, the head and every worker: Ray refuses a
# driver of another Ray (or Python minor) version. This FROM tag, `rayVersion` in
# jobs/cluster/kuberay-raycluster.yaml and the image tags in jobs/cluster/ must agree
# (tests/test_cluster_files.py checks), and the submitting machine needs `pip install ray==2.60.0`.
#
# Not built on the project's machines (no Docker daemon, no registry access there): written from the
# base image's conventions. The base image runs as user `ray` (uid 1000, group `users`), home
# /home/ray, with conda's python and pip first on PATH, so `pip` installs into Ray's own environment.
# `-gpu` is an alias of one of Ray's `-cuXX` tags (CUDA 12). torch does not use that CUDA toolkit:
# its wheel brings its own CUDA libraries, so what must fit is torch's CUDA and the nodes' driver.
FROM rayproject/ray:2.60.0-py311-gpu

# img2dataset imports albumentations, which asks PyPI for a newer version on import unless told not
# to (clusters are often offline, and a data job makes no requests nobody asked for).
# TOKENIZERS_PARALLELISM=false: Ray already runs one process per core; the tokenizers' own thread
# pool only adds fork warnings (and, after a fork, a deadlock risk).
# HF_HOME: no model weights are baked in. Actors load them by name into HF_HOME, or from a directory
# named in the spec. The cluster files point HF_HOME at the shared volume (/data/huggingface), so the
# weights are fetched once per cluster rather than once per node; on a single machine mount a volume
# here to keep them between containers.
ENV NO_ALBUMENTATIONS_UPDATE=1 \
    TOKENIZERS_PARALLELISM=false \
    HF_HOME=/home/ray/.cache/huggingface

# torch first, and explicitly a CUDA build. The base image has no torch, so `pip install .` would
# take PyPI's: for torch 2.13.0 on Linux that is the CUDA 13.0 build, which needs an NVIDIA driver
# >= 580 on every GPU node; with an older driver torch sees no GPU and the CapFilt actors would
# silently run on the CPU. The CUDA 12.8 build matches the base image's CUDA 12 and runs on CUDA 12
# drivers (>= 570; >= 525 through CUDA's minor-version compatibility). With drivers >= 580 on every
# node, build with --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu130 instead.
# 2.13.0 is the torch capfilt is tested with. The installed Ray and torch are then written down
# as pip constraints, so installing capfilt can neither replace torch (with a CPU or another CUDA
# build) nor move Ray away from the version the cluster runs. transformers is pinned too: the actor's
# SDPA attention (pipeline/curate/attention.py) is checked against that version's BLIP code, and under any
# other version the models run with eager attention, slower (docs/performance.md).
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX=https://download.pytorch.org/whl/cu128
ARG TRANSFORMERS_VERSION=5.23.0
RUN pip install --no-cache-dir --index-url "${TORCH_INDEX}" "torch==${TORCH_VERSION}" \
    && python -c "import torch; assert torch.version.cuda, 'not a CUDA build: ' + torch.__version__" \
    && python -c "import ray, torch; print(f'ray=={ray.__version__}\ntorch=={torch.__version__}')" \
        > /home/ray/capfilt-constraints.txt \
    && echo "transformers==${TRANSFORMERS_VERSION}" >> /home/ray/capfilt-constraints.txt

# Only what the wheel needs: the package, the README it names, and the schemas and example jobs it
# bundles (.dockerignore keeps everything else out of the build context). The directory is made by
# `ray` first: one that COPY creates may be root's, and `ray` could not delete it after the install.
RUN mkdir /tmp/capfilt
COPY --chown=ray:users pyproject.toml README.md /tmp/capfilt/
COPY --chown=ray:users pipeline /tmp/capfilt/pipeline
COPY --chown=ray:users schemas /tmp/capfilt/schemas
COPY --chown=ray:users jobs /tmp/capfilt/jobs

# Extras s3 and gcs: s3fs and gcsfs, for s3:// and gs:// URL lists and outputs. The source is removed
# after the install, so `import pipeline` can only find the installed package.
# No HEALTHCHECK: Kubernetes ignores Docker's, and Ray's own health checks cover a running node.
# Instead the build fails here when the image could not run a job: the CLI starts, and the modules the
# workers import (img2dataset, Ray Data, the BLIP classes, the object-store filesystems) load.
RUN pip install --no-cache-dir --constraint /home/ray/capfilt-constraints.txt "/tmp/capfilt[s3,gcs]" \
    && rm -rf /tmp/capfilt \
    && capfilt --version \
    && python -c "import gcsfs, img2dataset, ray.data, s3fs, torch; \
from transformers import BlipForConditionalGeneration, BlipForImageTextRetrieval; \
import pipeline.job.runner, pipeline.curate.attention; assert torch.version.cuda, torch.__version__"
