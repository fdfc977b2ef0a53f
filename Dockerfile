# The twllm gateway image (`twllm render k8s` runs it as the gateway Deployment and the
# db-migrate Job): LiteLLM's proxy behind twllm's shield, with the accounting, guard and zh-TW hooks.
#
#   docker build -t registry.example/twllm-gateway:0.1.0 .
#   docker build --build-arg EXTRAS=guard -t …   # guard models inside the gateway (adds CPU torch)
#
# Two stages: the wheel is built with build tools in the first; the image that runs has none of
# them (no compiler, no pip cache, no git), runs as an unprivileged user and writes only to the
# volumes the manifests mount (/var/lib/twllm, /tmp).

ARG PYTHON=3.11

FROM python:${PYTHON}-slim-bookworm AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY twllm ./twllm
RUN python -m pip wheel --no-cache-dir --no-deps --wheel-dir /wheels .

FROM python:${PYTHON}-slim-bookworm
ARG EXTRAS=""
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    LITELLM_LOCAL_MODEL_COST_MAP=True \
    LITELLM_OFFLINE_MODE=true
COPY --from=build /wheels /wheels
# CPU torch for EXTRAS=guard: PyPI's default torch is a CUDA build of several GB.
RUN set -eux; \
    wheel="$(ls /wheels/twllm-*.whl)"; \
    if [ -n "$EXTRAS" ]; then \
        pip install --index-url https://download.pytorch.org/whl/cpu "torch>=2.6,<3"; \
        pip install "${wheel}[${EXTRAS}]"; \
    else \
        pip install "${wheel}"; \
    fi; \
    rm -rf /wheels; \
    groupadd --system --gid 10001 twllm; \
    useradd --system --uid 10001 --gid twllm --home-dir /var/lib/twllm --shell /usr/sbin/nologin twllm; \
    mkdir -p /var/lib/twllm /etc/twllm; \
    chown twllm:twllm /var/lib/twllm
USER 10001:10001
WORKDIR /var/lib/twllm
EXPOSE 4000
# The manifests give the arguments (the rendered config is mounted at /etc/twllm).
ENTRYPOINT ["python", "-m", "twllm.gateway.serve"]
CMD ["--config", "/etc/twllm/litellm_config.yaml", "--host", "0.0.0.0", "--port", "4000"]
