# qwen-edit-worker: a RunPod serverless worker for Qwen-Image-Edit-2509.
# The model is not baked in: it is downloaded (or found in RunPod's model cache) at run
# time into MODEL_DIR. Only the Lightning LoRA can be, on request (BAKE_LIGHTNING below). torch from PyPI is a CUDA 13.0 build, so hosts need an
# NVIDIA driver of 580 or newer.
FROM nvidia/cuda:13.0.0-base-ubuntu24.04

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/venv/bin:$PATH

# torch.compile (on by default on a GPU) runs triton, which builds a small C launcher at run
# time: it needs a C compiler, the C library headers and the Python headers.
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv python3-dev gcc libc6-dev ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/venv

WORKDIR /app
# MODEL_DIR's default in the container (without a network volume): its existence tells the
# worker it runs in the image, where a local run would use the user's cache folder instead.
RUN mkdir -p /models

COPY requirements.txt .
RUN pip install -r requirements.txt

COPY *.py test_input.json ./
COPY qwen_edit_worker ./qwen_edit_worker
COPY assets ./assets

# The files a start-up imports (about 4 GB with the shared libraries), listed into
# import_set.txt: a cold worker reads them first, many at a time, then its weights.
RUN python -m qwen_edit_worker.startup.import_set

# ./build.sh IMAGE TAG --bake-lightning 8 (or 4,8): the Lightning LoRA for those steps goes into
# the image (850 MB each), so that new workers do not download it. Empty: nothing is baked.
ARG BAKE_LIGHTNING=""
RUN if [ -n "$BAKE_LIGHTNING" ]; then python -m qwen_edit_worker.startup.bake_lightning "$BAKE_LIGHTNING"; fi

CMD ["python", "-u", "handler.py"]
