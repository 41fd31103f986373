# syntax=docker/dockerfile:1
# a1111-proxy: the API server and a worker under supervisord; SQLite in /data by default.
#   docker build -t a1111-proxy .                                   (A1111 backends only, no torch)
#   docker build --build-arg ENGINE=true -t a1111-proxy:engine .    (+ the bundled diffusers engine)
# With ENGINE=true, TORCH_INDEX_URL picks the torch build (empty: the package index's default
# build, CUDA on x86-64 Linux; a CPU-only wheel index gives a much smaller image).
# docker-compose.yml runs the same image as separate API and worker services on PostgreSQL.
ARG PYTHON_VERSION=3.11

FROM python:${PYTHON_VERSION}-slim AS build
ARG ENGINE=false
ARG TORCH_INDEX_URL=""
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore
WORKDIR /src
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
# Dependencies first, from pyproject.toml alone, so that code changes keep this layer cached.
# (The project's own ranges pin them; hadolint's DL3013 asks for `==` pins we do not want.)
COPY pyproject.toml README.md ./
COPY a1111_proxy/__init__.py a1111_proxy/__init__.py
# hadolint ignore=DL3013
RUN --mount=type=cache,target=/root/.cache/pip \
    pip install supervisor==4.3.0 \
    && if [ "$ENGINE" = "true" ]; then \
         if [ -n "$TORCH_INDEX_URL" ]; then pip install --index-url "$TORCH_INDEX_URL" "torch>=2.1,<3"; fi \
         && pip install ".[engine]"; \
       else pip install .; fi \
    && pip uninstall -y a1111-proxy
COPY a1111_proxy a1111_proxy
COPY worker worker
COPY migrations migrations
# hadolint ignore=DL3013
RUN pip install --no-cache-dir --no-deps .

FROM python:${PYTHON_VERSION}-slim
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    SUPERVISOR_RUN_DIR=/tmp \
    A1111_PROXY_HOST=0.0.0.0 \
    A1111_PROXY_PORT=7861 \
    A1111_PROXY_LOG_FORMAT=json \
    A1111_PROXY_DATABASE_URL=sqlite+aiosqlite:////data/a1111_proxy.db \
    A1111_PROXY_MODELS_DIR=/data/models
RUN useradd --create-home --uid 10001 --user-group app \
    && mkdir -p /data/models && chown -R 10001:10001 /data
COPY --from=build /opt/venv /opt/venv
COPY supervisord.conf /etc/supervisord.conf
USER 10001:10001
WORKDIR /home/app
VOLUME ["/data"]
EXPOSE 7861
HEALTHCHECK --interval=30s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health' % os.environ.get('A1111_PROXY_PORT', '7861'), timeout=4)"]
# supervisord becomes PID 1 (exec): it forwards `docker stop`'s SIGTERM to both programs.
CMD ["sh", "-c", "a1111-proxy migrate && exec supervisord -c /etc/supervisord.conf"]
