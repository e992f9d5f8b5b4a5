# Images from one file (docs/deploy.md); always name the target (without one, Docker builds the last):
#   docker build --target api    -t sdfleet:api .      `sdfleet api`, `sdfleet ops`, `sdfleet keys`: no model stack
#   docker build --target worker -t sdfleet:worker .   `sdfleet worker`: torch (CPU), OpenVINO, diffusers
#   docker build --target flower -t sdfleet:flower .   Flower on sdfleet's own Celery app (see docs/deploy.md)
FROM python:3.11-slim AS base
ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
# uid and gid 10001: a host directory bind-mounted as /cache is `chown 10001:10001`
RUN groupadd --system --gid 10001 sdfleet \
 && useradd --system --uid 10001 --gid sdfleet --create-home --home-dir /home/sdfleet --shell /usr/sbin/nologin sdfleet
WORKDIR /app
# Dependencies are installed from pyproject.toml alone, against empty packages, so that a change to the code
# rebuilds only the last layer and not the multi-GB model stack.
COPY pyproject.toml README.md ./
RUN for p in api worker ops modeltools shared sdfleet; do mkdir -p "$p" && touch "$p/__init__.py"; done

FROM base AS worker
# torch 2.13.0 from PyTorch's CPU index (PyPI's Linux wheel is the multi-GB CUDA build); torchvision, which
# optimum-intel requires but sdfleet never uses, is removed because it does not import beside the CPU torch.
RUN pip install --extra-index-url https://download.pytorch.org/whl/cpu '.[worker]' \
 && pip uninstall -y torchvision
COPY api api
COPY worker worker
COPY ops ops
COPY modeltools modeltools
COPY shared shared
COPY sdfleet sdfleet
RUN pip install --no-deps --force-reinstall . && rm -rf build *.egg-info
# Compiled-model cache and built models. Created here, owned by sdfleet, before VOLUME: Docker fills a new
# named volume with the image's directory, ownership included, so the non-root worker can write to it.
RUN mkdir /cache && chown sdfleet:sdfleet /cache
ENV SDFLEET_CACHE_DIR=/cache HF_HOME=/cache/huggingface
VOLUME /cache
USER sdfleet
# SIGTERM (docker stop) reaches the worker as PID 1: Celery's warm shutdown, the current job finishes first
CMD ["sdfleet", "worker"]

FROM base AS api
RUN pip install .
COPY api api
COPY worker worker
COPY ops ops
COPY modeltools modeltools
COPY shared shared
COPY sdfleet sdfleet
RUN pip install --no-deps --force-reinstall . && rm -rf build *.egg-info
USER sdfleet
EXPOSE 8000
CMD ["sdfleet", "api", "--host", "0.0.0.0", "--port", "8000"]

FROM api AS flower
USER root
RUN pip install 'flower>=2,<3'
USER sdfleet
EXPOSE 5555
# -A ops.app:app: Flower must use sdfleet's Redis transport options, or the workers cannot answer its
# inspect requests (docs/deploy.md, Monitoring). FLOWER_BASIC_AUTH=user:password is required: Flower's UI can
# shut workers down, and without authentication it is open to anyone who reaches the port.
CMD test -n "$FLOWER_BASIC_AUTH" || { echo "set FLOWER_BASIC_AUTH=user:password" >&2; exit 2; }; \
    exec celery -A ops.app:app flower --port=5555 --address=0.0.0.0
