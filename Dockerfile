# Stable-SAM Label Studio ML backend. GPU: run with --gpus all (DEVICE=auto picks CUDA).
#   docker build -t stable-sam-backend .
#   docker run --gpus all -p 9090:9090 -v $PWD/models:/models \
#     -e LABEL_STUDIO_URL=http://label-studio:8080 -e LABEL_STUDIO_API_KEY=... stable-sam-backend
# The torch wheel in requirements.txt carries its own CUDA libraries; the CUDA runtime base gives
# the matching system libraries and works with the NVIDIA container toolkit.
FROM nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates curl \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

WORKDIR /app
COPY requirements.txt .
# sam2 is a source distribution: built without its optional CUDA extension, with this venv's torch
RUN pip install --upgrade pip setuptools \
    && SAM2_BUILD_CUDA=0 pip install --no-build-isolation -r requirements.txt

COPY stable_sam/ stable_sam/
COPY backend/ backend/
COPY label_config/ label_config/
COPY checkpoints/ checkpoints/
# files keep their mode from the build context: make sure the non-root user can read them
RUN chmod -R a+rX /app

# Non-root; the model dir (official SAM weights, plugin versions, embedding store) is a volume.
RUN useradd --create-home --uid 10001 stablesam \
    && mkdir -p /models \
    && chown stablesam /models
USER stablesam
VOLUME ["/models"]

ENV MODEL_DIR=/models \
    HOST=0.0.0.0 \
    PORT=9090 \
    WORKERS=1 \
    THREADS=8 \
    DEVICE=auto
EXPOSE 9090
HEALTHCHECK --interval=30s --timeout=3s --start-period=20s \
    CMD curl -fsS http://127.0.0.1:9090/health || exit 1

# One model per worker process, loaded lazily: never add --preload.
CMD ["gunicorn", "-c", "backend/gunicorn.conf.py", "backend.wsgi:app"]
