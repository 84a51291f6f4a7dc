# The embedpipe SDK worker image for Dataflow (and Flink with DOCKER/EXTERNAL environments).
# It carries embedpipe and its dependencies, and an entrypoint that puts the API key into the
# SDK worker's environment from Secret Manager before Beam's boot program starts. See
# docs/RUNNERS.md. Build from the repository root:
#   docker build -f docker/worker.Dockerfile -t REGION-docker.pkg.dev/PROJECT/embedpipe/worker:0.1.0 .
# The Beam (2.77.0) and Python (3.11) versions must be the launcher's.
FROM apache/beam_python3.11_sdk:2.77.0
COPY . /src/embedpipe
RUN pip install --no-cache-dir '/src/embedpipe[gcs]' 'google-cloud-secret-manager>=2'
COPY docker/worker-entrypoint.sh /opt/embedpipe/entrypoint.sh
# The NAME of the secret, not the key: read by the entrypoint with the worker's service account.
ENV EMBEDPIPE_KEY_SECRET=projects/my-project/secrets/openai-api-key/versions/latest
ENTRYPOINT ["/opt/embedpipe/entrypoint.sh"]
