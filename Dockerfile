# One gossipnode peer. Configure it entirely with GOSSIPNODE_* environment variables (every
# `gossipnode run` option, e.g. GOSSIPNODE_GRAD_RATE=20); docker-compose.yml runs four.
#
#   docker build -t gossipnode .
#   docker run --rm gossipnode --help
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore

# torch first, in its own layer, pinned as in pyproject.toml and from the CPU index: PyPI's
# torch is the multi-GB CUDA build.
RUN pip install "torch==2.13.0" --index-url https://download.pytorch.org/whl/cpu

# Then the package (its other dependencies come from PyPI; torch is already satisfied).
WORKDIR /src
COPY pyproject.toml README.md ./
COPY gossipnode/ gossipnode/
RUN pip install . && rm -rf /src

RUN useradd --create-home --uid 10001 --user-group gossip \
    && mkdir /data && chown gossip:gossip /data
USER gossip
WORKDIR /data
# Checkpoints, models, summary.json and events.jsonl (GOSSIPNODE_OUT=/data); a named volume
# keeps them across restarts (GOSSIPNODE_RESUME=true).
VOLUME /data

# 7000: gossip (GOSSIPNODE_LISTEN); 9100: /metrics and /status (GOSSIPNODE_METRICS).
EXPOSE 7000 9100
# The node checkpoints and exits 0 on SIGTERM (docker stop).
STOPSIGNAL SIGTERM
ENTRYPOINT ["gossipnode"]
CMD ["run"]
