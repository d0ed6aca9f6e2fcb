# GPU image for the Ray head and worker nodes of a capfilt cluster. On a running cluster every node
# imports capfilt's stages, so every node needs this package at the driver's version.
#   docker build -t capfilt .
#   docker run --gpus all --shm-size=16g capfilt ray start --head --block
# Ray must be the same version on the driver and on every node: pick the tag to match
# (pyproject.toml asks for ray >= 2.40).
FROM rayproject/ray:2.40.0-py311-gpu

# img2dataset imports albumentations, which would otherwise ask PyPI for updates on import.
ENV NO_ALBUMENTATIONS_UPDATE=1 \
    TOKENIZERS_PARALLELISM=false \
    HF_HOME=/home/ray/.cache/huggingface

# Only what the wheel needs: the package, and the schemas and example jobs it bundles.
WORKDIR /home/ray/capfilt
COPY --chown=ray:users pyproject.toml README.md ./
COPY --chown=ray:users pipeline ./pipeline
COPY --chown=ray:users schemas ./schemas
COPY --chown=ray:users jobs ./jobs

# torch comes from PyPI unless the image already has one that satisfies torch>=2.4; PyPI's Linux
# x86_64 torch wheel is the CUDA build. No model weights are baked in: actors load them by name
# into HF_HOME (mount a volume there to keep them) or from a mounted local directory.
RUN pip install --no-cache-dir . && capfilt --version
