#!/usr/bin/env bash
# Start an MLflow tracking server (UI + REST API) in the foreground.
#
#   slurm/mlflow_server.sh [--backend-store-uri URI] [--artifacts-destination DIR]
#                          [--host HOST] [--port PORT] [--workers N] [-- EXTRA mlflow server ARGS]
#
# Defaults (each also settable by the environment variable in brackets):
#   --backend-store-uri      sqlite:///$PWD/mlflow.db     [MLFLOW_BACKEND_STORE_URI]
#   --artifacts-destination  $PWD/mlartifacts             [MLFLOW_ARTIFACTS_DESTINATION]
#   --host                   127.0.0.1                    [MLFLOW_HOST]
#   --port                   5000                         [MLFLOW_PORT]
#   --workers                2                            [MLFLOW_WORKERS]
#
# Backend store:
#   * SQLite (default) is right for one user on one machine: the same file
#     `deqbench` writes when MLFLOW_TRACKING_URI is unset (sqlite:///mlflow.db).
#     Do not share one SQLite file between many writers on NFS/Lustre: its
#     locking is unreliable there.
#   * PostgreSQL is the production backend for a shared server on a cluster:
#       --backend-store-uri postgresql://USER:PASSWORD@DBHOST:5432/mlflow
#     (needs `pip install psycopg2-binary` in the venv; create the database
#     first: `createdb mlflow`). Put the password in ~/.pgpass rather than the URI.
#
# Host: 127.0.0.1 (default) serves this machine only; reach it from elsewhere
# through an ssh tunnel (`ssh -N -L 5000:127.0.0.1:PORT HOST`). Binding to a
# routable name (`--host "$(hostname)"` or 0.0.0.0) lets training jobs on other
# nodes log to it, but MLflow has no authentication: anyone who can reach the
# port can read and delete runs. Add `-- --allowed-hosts NAME:PORT` when the
# Host header is not localhost or a private IP.
#
# Clients then set MLFLOW_TRACKING_URI=http://HOST:PORT.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BACKEND="${MLFLOW_BACKEND_STORE_URI:-sqlite:///$PWD/mlflow.db}"
ARTIFACTS="${MLFLOW_ARTIFACTS_DESTINATION:-$PWD/mlartifacts}"
HOST="${MLFLOW_HOST:-127.0.0.1}"
PORT="${MLFLOW_PORT:-5000}"
WORKERS="${MLFLOW_WORKERS:-2}"
EXTRA=()

usage() { sed -n '2,5p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//' >&2; exit 2; }

while [[ $# -gt 0 ]]; do
    case "$1" in
        --backend-store-uri) BACKEND="${2:?}"; shift 2 ;;
        --artifacts-destination) ARTIFACTS="${2:?}"; shift 2 ;;
        --host) HOST="${2:?}"; shift 2 ;;
        --port) PORT="${2:?}"; shift 2 ;;
        --workers) WORKERS="${2:?}"; shift 2 ;;
        --) shift; EXTRA=("$@"); break ;;
        -h|--help) usage ;;
        *) echo "mlflow_server.sh: unknown argument '$1'" >&2; usage ;;
    esac
done

# The venv's mlflow: an activated venv wins, else the repo's .venv.
MLFLOW="$(command -v mlflow || true)"
[[ -z $MLFLOW && -x $REPO/.venv/bin/mlflow ]] && MLFLOW="$REPO/.venv/bin/mlflow"
[[ -n $MLFLOW ]] || { echo "mlflow_server.sh: mlflow not found; activate the venv (source .venv/bin/activate)" >&2; exit 1; }

mkdir -p "$ARTIFACTS"
echo "[mlflow_server] backend store: $BACKEND"
echo "[mlflow_server] artifacts:     $ARTIFACTS"
echo "[mlflow_server] tracking URI:  http://$HOST:$PORT  (export MLFLOW_TRACKING_URI=http://$HOST:$PORT)"
exec "$MLFLOW" server \
    --backend-store-uri "$BACKEND" \
    --artifacts-destination "$ARTIFACTS" \
    --host "$HOST" \
    --port "$PORT" \
    --workers "$WORKERS" \
    "${EXTRA[@]}"
