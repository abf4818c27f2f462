# Sluice: one image for the sidecar, the operator, the usage collector and the CLI.
#   docker build -t sluice:0.1.0 .
#   docker run --rm sluice:0.1.0 sidecar --help
# Without a registry (`make image`, hack/image/build.sh): buildah builds this file from two
# Python bases made from Debian's packages, passed as BASE_IMAGE and BUILD_IMAGE.
#
# Both stages must have the same Python at the same path: the virtualenv made in the first is
# copied into the second. Where a registry exists both default to the public Python image.
ARG BASE_IMAGE=python:3.11-slim-bookworm
ARG BUILD_IMAGE=python:3.11-slim-bookworm

FROM ${BUILD_IMAGE} AS build
# Build-time only: pip trusts the CA bundle named here (hack/image/build.sh passes the host's,
# mounted read-only, so a TLS-inspecting proxy in front of the package index is trusted).
ARG PIP_CERT
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1 PIP_ROOT_USER_ACTION=ignore
# strip: the wheels' extension modules carry their symbols (72 MB -> 25 MB); the public image lacks it
RUN command -v strip >/dev/null || { apt-get update -qq \
      && apt-get install -y -qq --no-install-recommends binutils >/dev/null; }
# A virtualenv without pip: the final image gets the installed packages and nothing to install with.
RUN python3 -m venv --without-pip /opt/sluice
WORKDIR /src
# Dependencies first (their layer survives a source change): the exact versions CI tested
# (hack/constraints.txt), binary wheels only, so no compiler is needed even here.
COPY pyproject.toml ./
COPY hack/constraints.txt hack/constraints.txt
RUN python3 -c 'import tomllib; print("\n".join(tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]))' > /tmp/requirements.txt \
    && python3 -m pip --python /opt/sluice/bin/python install -q --no-compile --only-binary=:all: \
         -c hack/constraints.txt -r /tmp/requirements.txt
# setuptools wants the readme named in pyproject.toml; the image needs no long description, and
# not copying README.md keeps every docs edit from rebuilding the image.
RUN touch README.md
COPY core core
COPY sidecar sidecar
COPY operator operator
COPY analytics analytics
# kubernetes ships a second, asyncio copy of its client (~40 MB) that nothing here imports
# (Sluice and kopf use the synchronous one): not in the image. Bytecode is compiled here and
# checked by nothing at import: the non-root user cannot write __pycache__, and the files never
# change inside the image; start-up reads these instead of compiling every module again.
RUN python3 -m pip --python /opt/sluice/bin/python install -q --no-compile --no-deps . \
    && rm -rf /opt/sluice/lib/python3*/site-packages/kubernetes/aio \
    && find /opt/sluice -name '*.so' -exec strip --strip-unneeded {} + \
    && /opt/sluice/bin/python -m compileall -q --invalidation-mode unchecked-hash /opt/sluice/lib

FROM ${BASE_IMAGE}
# The user the chart and the injector run the containers as (65532, not root).
RUN groupadd --gid 65532 sluice \
    && useradd --uid 65532 --gid 65532 --no-create-home --home-dir /nonexistent \
         --shell /usr/sbin/nologin sluice
COPY --from=build /opt/sluice /opt/sluice
ENV PATH=/opt/sluice/bin:$PATH PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
USER 65532:65532
EXPOSE 8080 9090
ENTRYPOINT ["sluice"]
CMD ["--help"]
