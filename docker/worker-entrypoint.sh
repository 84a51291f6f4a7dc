#!/bin/sh
# Put the API key into the SDK worker's environment, then start Beam's boot program (Dataflow
# requires /opt/apache/beam/boot to run last, with the arguments it was given). The variable
# name must match provider.api_key_env (OPENAI_API_KEY here).
set -eu
if [ -z "${OPENAI_API_KEY:-}" ] && [ -n "${EMBEDPIPE_KEY_SECRET:-}" ]; then
  OPENAI_API_KEY="$(python -c 'import os; from google.cloud import secretmanager as sm; print(sm.SecretManagerServiceClient().access_secret_version(name=os.environ["EMBEDPIPE_KEY_SECRET"]).payload.data.decode(), end="")')"
  export OPENAI_API_KEY
fi
exec /opt/apache/beam/boot "$@"
