# The project's image: the Ray Serve front end, the one-shot bootstrap (train and export
# when model_repo/ is empty), `gem tensorrt-script`, and Locust. See docker-compose.yml.
FROM python:3.11.14-slim-bookworm

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# The CPU build from PyTorch's own index first: PyPI's torch is a CUDA build of several GB.
RUN pip install --no-cache-dir --index-url https://download.pytorch.org/whl/cpu torch==2.13.0

WORKDIR /app

# The client package (no registry has it), then the other dependencies alone, so that
# a code change does not download them again.
COPY client ./client
RUN pip install --no-cache-dir ./client
COPY pyproject.toml ./
RUN python -c "import tomllib; deps = tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']; \
print('\n'.join(d for d in deps if not d.startswith('gem-knowledge-client')))" > /tmp/requirements.txt \
    && pip install --no-cache-dir --requirement /tmp/requirements.txt \
    && rm /tmp/requirements.txt

COPY . ./
RUN pip install --no-cache-dir --no-deps .

# The bind mounts (model_repo/, artifacts/loadtest/) are written as this user: build with
# GEM_UID=$(id -u) when the host's user is not 1000. artifacts/ is the working space of
# `gem bootstrap` (data, checkpoint) and holds the named volume of `gem tensorrt-script`.
ARG GEM_UID=1000
RUN useradd --create-home --uid "${GEM_UID}" gem \
    && mkdir -p artifacts/tensorrt artifacts/checkpoints artifacts/trainer \
    && chown -R gem artifacts
USER ${GEM_UID}

CMD ["gem", "--help"]
