# GPU image for Ray head and worker nodes running capfilt jobs.
#   docker build -t capfilt:latest .
#   docker run --gpus all --shm-size=16g capfilt:latest ray start --head --block
# No model weights are baked in: the actors load them by name (cached in HF_HOME) or from a mounted path.
FROM rayproject/ray:2.52.0-py311-gpu

ENV NO_ALBUMENTATIONS_UPDATE=1 \
    TOKENIZERS_PARALLELISM=false \
    HF_HOME=/home/ray/.cache/huggingface

WORKDIR /opt/capfilt
COPY --chown=ray:users pyproject.toml README.md ./
COPY --chown=ray:users pipeline ./pipeline
COPY --chown=ray:users schemas ./schemas
COPY --chown=ray:users jobs ./jobs
# The base image ships a CUDA build of torch; pip keeps it when it satisfies the requirement.
RUN pip install --no-cache-dir . && capfilt --version
