# One image for both roles: `sdfleet api` (small: never imports the model stack) and `sdfleet worker`.
FROM python:3.11-slim
ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
WORKDIR /app
COPY pyproject.toml README.md ./
COPY api api
COPY worker worker
COPY shared shared
COPY sdfleet sdfleet
# torch 2.13.0 from PyTorch's CPU index (PyPI's Linux wheel is the multi-GB CUDA build); torchvision, which
# optimum-intel requires but sdfleet never uses, is removed because it does not import beside the CPU torch.
RUN pip install --extra-index-url https://download.pytorch.org/whl/cpu '.[worker]' \
 && pip uninstall -y torchvision
RUN useradd --create-home sdfleet
USER sdfleet
EXPOSE 8000
CMD ["sdfleet", "api", "--host", "0.0.0.0", "--port", "8000"]
