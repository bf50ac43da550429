# Retrain Studio as a container: `docker build -t retrain-studio .`
#   docker run -p 8501:8501 -v retrain-data:/data retrain-studio
# GPU: `docker build --build-arg GPU=1 -t retrain-studio:gpu .`, then `docker run --gpus all ...`
# Hugging Face Spaces (Docker SDK) and the other recipes: docs/deploy.md.
# Two targets (the default is the last one, the dashboard):
#   ray-node   a Ray cluster node (head or GPU worker) with the project installed; KubeRay
#              runs `ray start` in it: `docker build --target ray-node -t retrain-ray-node .`
#   dashboard  the Streamlit app; `--build-arg RAY=1` adds the Ray client for RETRAIN_RUNNER=ray
# docs/scale-out.md shows both on Kubernetes (KubeRay).

# --- A Ray node: Ray's own CUDA image (same Ray and Python as the dashboard's client), plus
# the project's runtime requirements with TensorFlow's CUDA wheels, and the code on PYTHONPATH
# so a job's `python -m retrain train ...` runs from any working directory.
ARG RAY_IMAGE=rayproject/ray:2.60.0-py311-gpu
FROM ${RAY_IMAGE} AS ray-node
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    TF_CPP_MIN_LOG_LEVEL=2 \
    PYTHONPATH=/app \
    RETRAIN_HOME=/data \
    KERAS_HOME=/data/keras
WORKDIR /app
COPY requirements.txt requirements-ray.txt ./
RUN pip install -r requirements.txt -r requirements-ray.txt \
    && pip install "tensorflow[and-cuda]==$(sed -n 's/^tensorflow==//p' requirements.txt)"
COPY retrain ./retrain
# /data is the shared volume (NFS/EFS/Filestore/FUSE bucket) mounted by the RayCluster spec.

# --- The dashboard (the default target).
FROM python:3.11-slim AS dashboard

# GPU=1 installs tensorflow[and-cuda] (CUDA/cuDNN as pip wheels); the host needs the NVIDIA
# driver and the NVIDIA Container Toolkit. RAY=1 installs the Ray client (requirements-ray.txt)
# so the dashboard can send runs to a Ray cluster (RETRAIN_RUNNER=ray, RAY_ADDRESS).
ARG GPU=0
ARG RAY=0

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    TF_CPP_MIN_LOG_LEVEL=2 \
    RETRAIN_HOME=/data \
    KERAS_HOME=/data/keras \
    RETRAIN_MAX_WORKERS=1 \
    RETRAIN_SESSION_TTL_HOURS=24 \
    STREAMLIT_SERVER_HEADLESS=true \
    STREAMLIT_BROWSER_GATHER_USAGE_STATS=false

# Hugging Face Spaces runs containers as uid 1000; use the same user everywhere.
RUN useradd --create-home --uid 1000 --shell /usr/sbin/nologin app \
    && mkdir -p /data/keras \
    && chown -R app:app /data

WORKDIR /app
COPY requirements.txt requirements-ray.txt ./
RUN pip install -r requirements.txt \
    && if [ "$GPU" = "1" ]; then \
         pip install "tensorflow[and-cuda]==$(sed -n 's/^tensorflow==//p' requirements.txt)"; \
       fi \
    && if [ "$RAY" = "1" ]; then pip install -r requirements-ray.txt; fi

COPY --chown=app:app .streamlit ./.streamlit
COPY --chown=app:app retrain ./retrain
COPY --chown=app:app pages ./pages
COPY --chown=app:app app.py ./

USER 1000:1000
# Train the built-in starter model now (seconds, into /data/keras) rather than on the first
# visit of the Model page; a new named volume starts with it.
RUN python -m retrain describe builtin:digits-cnn > /dev/null

# Sessions, uploads, runs and the Keras cache (ImageNet weights, starter model) live here.
VOLUME ["/data"]
EXPOSE 8501

HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://localhost:8501/_stcore/health', timeout=4)"]

# The model workers start first (TensorFlow loads there, the starter model is preloaded), so
# the first visitor never waits for them; the web server itself never imports TensorFlow.
CMD ["sh", "-c", "python -m retrain.service && exec streamlit run app.py --server.port=8501 --server.address=0.0.0.0"]
