# moe-embed server image: `docker build -t REGISTRY/moe-embed:VERSION .` (the last stage,
# `runtime`, loads its model from a volume or builds the demo model).
# With an exported bundle baked in, for clusters without internet access (chart value
# model.source=image):
#   moe-embed export nomic-ai/nomic-embed-text-v2-moe --out bundles/nomic-int8 --precision int8
#   docker build --target bundled --build-arg BUNDLE=bundles/nomic-int8 \
#     -t REGISTRY/moe-embed:VERSION-nomic-int8 .
# Every stage runs `moe-embed serve`, the console script the test suite runs.
ARG PYTHON_IMAGE=python:3.11-slim

# ---- build: a virtualenv with CPU torch and the package (non-editable) ----
FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
# CPU-only torch from PyTorch's CPU index (the default index would pull the CUDA build);
# the version is pyproject.toml's pin.
RUN pip install --index-url https://download.pytorch.org/whl/cpu torch==2.13.0
WORKDIR /src
COPY pyproject.toml README.md ./
COPY protos ./protos
COPY export ./export
COPY workers ./workers
COPY service ./service
COPY corpus ./corpus
# moe_embed.testing (tests/support): a package of pyproject.toml's, so `pip install .` needs it
COPY tests/support ./tests/support
RUN pip install .

# ---- server: the virtualenv only, as a non-root user ----
FROM ${PYTHON_IMAGE} AS server
RUN groupadd --system --gid 10001 moe \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /cache moe \
    && mkdir -p /cache \
    && chown 10001:10001 /cache
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    MOE_EMBED_CACHE_DIR=/cache \
    MOE_EMBED_HOST=0.0.0.0 \
    HF_HOME=/cache/huggingface
USER 10001:10001
# Home is the cache: anything a library writes under ~ lands on the one writable volume.
WORKDIR /cache
# gRPC, OpenAI-compatible HTTP, Prometheus metrics.
EXPOSE 50051 8080 9090
ENTRYPOINT ["moe-embed"]
CMD ["serve"]

# ---- bundled: the server with an exported bundle in a read-only image layer ----
FROM server AS bundled
# A directory written by `moe-embed export`, relative to the build context.
ARG BUNDLE=bundles/model
# Owned by root, readable by the server's user: a served bundle must not change.
COPY ${BUNDLE} /models/bundle
ENV MOE_EMBED_BUNDLE=/models/bundle

# ---- runtime (the default target): the server without a bundle ----
FROM server AS runtime
