# syntax=docker/dockerfile:1
# a1111-proxy: API server + worker under supervisord, SQLite in /data by default.
#   docker build -t a1111-proxy .
#   docker build --build-arg WITH_ENGINE=1 -t a1111-proxy:engine .   (bundled diffusers engine)
ARG PYTHON_VERSION=3.11

FROM python:${PYTHON_VERSION}-slim AS build
ARG WITH_ENGINE=0
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
# Dependencies first, so that code changes do not invalidate this layer.
COPY pyproject.toml README.md ./
COPY a1111_proxy/__init__.py a1111_proxy/__init__.py
RUN pip install supervisor==4.3.0 \
    && if [ "$WITH_ENGINE" = "1" ]; then pip install ".[engine]"; else pip install .; fi \
    && pip uninstall -y a1111-proxy
COPY a1111_proxy a1111_proxy
COPY worker worker
COPY migrations migrations
RUN if [ "$WITH_ENGINE" = "1" ]; then pip install --no-deps ".[engine]"; else pip install --no-deps .; fi

FROM python:${PYTHON_VERSION}-slim
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    USER=app \
    A1111_PROXY_HOST=0.0.0.0 \
    A1111_PROXY_PORT=7861 \
    A1111_PROXY_DATABASE_URL=sqlite+aiosqlite:////data/a1111_proxy.db \
    A1111_PROXY_MODELS_DIR=/data/models
RUN useradd --create-home --uid 10001 app && mkdir -p /data/models && chown -R app /data
COPY --from=build /opt/venv /opt/venv
COPY supervisord.conf /etc/supervisord.conf
USER app
WORKDIR /home/app
VOLUME ["/data"]
EXPOSE 7861
HEALTHCHECK --interval=30s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health' % os.environ.get('A1111_PROXY_PORT', '7861'), timeout=4)"]
CMD ["sh", "-c", "a1111-proxy migrate && exec supervisord -c /etc/supervisord.conf"]
