# sdproxy as a sidecar image.
#   docker build -t sdproxy .
#   docker run -p 8081:8081 -p 9901:9901 -e CONSUL_HTTP_ADDR=consul.internal:8500 sdproxy
# It runs config/container.toml: the upstream `backend-service` on 0.0.0.0:8081, the admin
# API on 0.0.0.0:9901, Consul from $CONSUL_HTTP_ADDR (and $CONSUL_HTTP_TOKEN). Mount a
# config of your own and pass `run -c /path/to/it` to change that. Consul itself is not in
# the image; compose.yaml runs the whole picture (Consul, backends, a frontend with sdproxy).
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore \
    SDPROXY_READY_URL=http://127.0.0.1:9901/ready

# A fixed numeric UID/GID, so Kubernetes' runAsNonRoot can verify it and file ownership on
# mounted volumes is predictable.
RUN groupadd --system --gid 10001 sdproxy \
    && useradd --system --uid 10001 --gid 10001 --no-create-home \
       --home-dir /nonexistent --shell /usr/sbin/nologin sdproxy

WORKDIR /app

# Dependencies get a layer of their own, built from pyproject.toml alone (the list is read
# from [project] dependencies, so there is no second list to keep in step): a change to the
# source rebuilds only the small layer below, not uvloop, aiohttp and the rest.
COPY pyproject.toml ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" > /tmp/requirements.txt \
    && pip install --no-cache-dir --requirement /tmp/requirements.txt \
    && rm /tmp/requirements.txt

COPY README.md ./
COPY proxy ./proxy
COPY config ./config
RUN pip install --no-cache-dir --no-deps . \
    && rm -rf build ./*.egg-info

USER 10001:10001
EXPOSE 8081 9901
# sdproxy drains on SIGTERM (listeners close, in-flight work gets drain_timeout).
STOPSIGNAL SIGTERM
# /ready answers 200 once every upstream's catalog answered. No curl in the slim image:
# Python's urllib does the GET; an error status raises, and any exception exits 1.
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import os, sys, urllib.request; sys.exit(urllib.request.urlopen(os.environ['SDPROXY_READY_URL'], timeout=2).status != 200)"]
ENTRYPOINT ["sdproxy"]
CMD ["run", "-c", "/app/config/container.toml"]
