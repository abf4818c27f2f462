# Sluice: one image for the sidecar, the operator and the CLI.
#   docker build -t sluice:0.1.0 .
#   docker run --rm sluice:0.1.0 sidecar --help
FROM python:3.11-slim-bookworm AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY hack/constraints.txt hack/constraints.txt
COPY core core
COPY sidecar sidecar
COPY operator operator
# the exact versions CI tested (hack/constraints.txt), not whatever is newest today
RUN pip wheel --no-cache-dir --wheel-dir /wheels -c hack/constraints.txt .

FROM python:3.11-slim-bookworm
RUN useradd --uid 65532 --no-create-home --shell /usr/sbin/nologin sluice
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir /wheels/*.whl && rm -rf /wheels
USER 65532:65532
EXPOSE 8080 9090
ENTRYPOINT ["sluice"]
CMD ["--help"]
