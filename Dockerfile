# syntax=docker/dockerfile:1
#
# authproxy as a container, e.g. a sidecar next to an application.
#
#   docker build -t authproxy .
#   docker run --rm -v ./config.yaml:/etc/authproxy/config.yaml:ro \
#       -v authproxy-state:/var/lib/authproxy authproxy
#
# Configuration: /etc/authproxy/config.yaml ($AUTHPROXY_CONFIG).
# State (tokens authproxy created, OAuth refresh tokens): /var/lib/authproxy
#   ($STATE_DIRECTORY, used when the config has no state_dir); mount a volume
#   there so a restart reuses them instead of logging in again.
# Secrets: files under /run/secrets (Docker/Compose secrets, Kubernetes Secret
#   volumes), named in the config with *_file keys.
# Listening: inside a container 127.0.0.1 is only reachable from the same
#   network namespace (a Kubernetes pod). To serve other containers, listen on
#   0.0.0.0:8080 -- which authproxy refuses unless inbound.allow_remote is true
#   AND inbound.keys (or keys_file) is set. See examples/.

# ---- build: turn the source tree into a wheel --------------------------------
FROM python:3.12-slim AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY authproxy ./authproxy
# The wheels of authproxy and of every dependency, so the final stage installs
# offline and carries no compiler, no pip cache and no source tree.
RUN pip wheel --wheel-dir /wheels .

# ---- final: just the interpreter and the installed wheels ---------------------
FROM python:3.12-slim
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    AUTHPROXY_CONFIG=/etc/authproxy/config.yaml \
    STATE_DIRECTORY=/var/lib/authproxy

RUN --mount=type=bind,from=build,source=/wheels,target=/wheels \
    pip install --no-index --find-links=/wheels authproxy \
 && groupadd --system --gid 10001 authproxy \
 && useradd --system --uid 10001 --gid 10001 --no-create-home \
        --home-dir /nonexistent --shell /usr/sbin/nologin authproxy \
 && install -d -m 0755 -o root -g root /etc/authproxy \
 && install -d -m 0700 -o 10001 -g 10001 /var/lib/authproxy

# The state directory outlives the container; mode 0700 is kept on a fresh
# named volume because Docker copies the image's directory into it.
VOLUME ["/var/lib/authproxy"]

# Numeric, so Kubernetes' runAsNonRoot can verify it without /etc/passwd.
USER 10001:10001
WORKDIR /var/lib/authproxy

EXPOSE 8080

# No curl in -slim: ask the proxy itself with the standard library. The empty
# ProxyHandler keeps an inherited http_proxy variable from capturing 127.0.0.1.
# /-/healthz needs neither an inbound key nor an allowed Host.
HEALTHCHECK --interval=30s --timeout=5s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import urllib.request as u; u.build_opener(u.ProxyHandler({})).open('http://127.0.0.1:8080/-/healthz', timeout=4).read()"]

# SIGTERM: finish in-flight requests (shutdown_timeout), revoke what authproxy
# created, exit 0. Give it time: `docker stop -t 30`, stop_grace_period: 30s
# in Compose, terminationGracePeriodSeconds in Kubernetes.
STOPSIGNAL SIGTERM
ENTRYPOINT ["authproxy"]
CMD ["run"]
