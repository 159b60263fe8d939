#!/usr/bin/env bash
# Start the Prefect API + UI for qlora-pipeline with HTTP basic authentication, on loopback.
#
#   deploy/run-server.sh                       # settings from deploy/server.env
#   QLORA_SERVER_ENV=/etc/qlora/server.env deploy/run-server.sh
#
# Every setting in the env file can be overridden from the environment. Refuses to start without an
# auth string, or with one that is not "user:password" of at least 16 characters.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
env_file="${QLORA_SERVER_ENV:-$here/server.env}"
[[ -f "$env_file" ]] || { echo "run-server: env file not found: $env_file" >&2; exit 2; }

# Load KEY=VALUE lines without overriding what the caller already exported.
while IFS= read -r line || [[ -n "$line" ]]; do
  [[ "$line" =~ ^[[:space:]]*(#|$) ]] && continue
  key="${line%%=*}"; value="${line#*=}"
  [[ "$key" =~ ^[A-Z_][A-Z0-9_]*$ ]] || { echo "run-server: bad line in $env_file: $key" >&2; exit 2; }
  [[ -n "${!key+x}" ]] || export "$key=$value"
done < "$env_file"

if [[ -z "${PREFECT_SERVER_API_AUTH_STRING:-}" && -n "${PREFECT_SERVER_API_AUTH_STRING_FILE:-}" \
      && -r "${PREFECT_SERVER_API_AUTH_STRING_FILE}" ]]; then
  PREFECT_SERVER_API_AUTH_STRING="$(head -n1 "$PREFECT_SERVER_API_AUTH_STRING_FILE")"
fi
auth="${PREFECT_SERVER_API_AUTH_STRING:-}"
if [[ -z "$auth" ]]; then
  echo "run-server: no auth string: set PREFECT_SERVER_API_AUTH_STRING or PREFECT_SERVER_API_AUTH_STRING_FILE" >&2
  exit 2
fi
if [[ "$auth" != *:* || ${#auth} -lt 16 ]]; then
  echo "run-server: the auth string must be user:password, 16 characters or more" >&2
  exit 2
fi
export PREFECT_SERVER_API_AUTH_STRING="$auth"
unset PREFECT_SERVER_API_AUTH_STRING_FILE

prefect_bin="${PREFECT_BIN:-$(command -v prefect || true)}"
[[ -n "$prefect_bin" ]] || { echo "run-server: prefect not found (activate .venv or set PREFECT_BIN)" >&2; exit 2; }
mkdir -p "$PREFECT_HOME"
exec "$prefect_bin" server start --host "$PREFECT_SERVER_API_HOST" --port "$PREFECT_SERVER_API_PORT"
