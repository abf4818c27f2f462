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
COPY hack/image/bytecode.py /tmp/bytecode.py
# What no process in the image reads, left out (issue #12 §1, the image under 150 MB):
# kubernetes' second, asyncio copy of its client (~40 MB; Sluice and kopf use the synchronous
# one), the packages' own test suites, type stubs, Cython/C sources and headers, pip's RECORD
# (the image has no pip to uninstall with); symbols of the extension modules (strip).
# Bytecode (hack/image/bytecode.py): the image's user cannot write __pycache__, so it is made
# here; the installed packages keep only their bytecode, Sluice's packages their source too.
RUN python3 -m pip --python /opt/sluice/bin/python install -q --no-compile --no-deps . \
    && cd /opt/sluice/lib/python3*/site-packages \
    && rm -rf kubernetes/aio greenlet/tests websocket/tests aiosqlite/tests certifi/tests \
    && find kubernetes -type f \( -name '*_test.py' -o -name 'test_*.py' \) -delete \
    && find . -type f \( -name '*.pyi' -o -name '*.pyx' -o -name '*.pxd' -o -name '*.pxi' \
         -o -name '*.c' -o -name '*.cpp' -o -name '*.h' -o -name '*.hpp' -o -path '*.dist-info/RECORD' \) -delete \
    && find /opt/sluice -name '*.so' -exec strip --strip-unneeded {} + \
    && /opt/sluice/bin/python -X no_debug_ranges /tmp/bytecode.py "$PWD" --no-docstrings kubernetes \
         --keep-source sluice_core sluice_sidecar sluice_operator sluice_analytics

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
