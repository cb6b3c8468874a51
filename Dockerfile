# sdproxy as a sidecar image. Consul itself is not part of the image: point
# CONSUL_HTTP_ADDR (or [consul] address) at the node's agent.
FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY proxy ./proxy
COPY config ./config
RUN pip install --no-cache-dir . && useradd --system sdproxy
USER sdproxy
EXPOSE 8081 9901
ENTRYPOINT ["sdproxy"]
CMD ["run", "-c", "/app/config/example.toml"]
