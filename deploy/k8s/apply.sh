#!/usr/bin/env bash
# Roll out mergeline in order: settings -> migration Job (waited for) -> API and workers.
# Usage: deploy/k8s/apply.sh            (uses the images set in migrate/ and app/kustomization.yaml)
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
ns=mergeline

kubectl apply -k "$here/config"

# A Job's pod template is immutable, and a finished one would not run again: start from a fresh Job.
kubectl -n "$ns" delete job mergeline-migrate --ignore-not-found --cascade=foreground
kubectl apply -k "$here/migrate"
# Wait for success or failure, whichever comes first (`kubectl wait` alone would sit out the timeout on failure).
deadline=$((SECONDS + 1800))
until [ "$(kubectl -n "$ns" get job mergeline-migrate -o jsonpath='{.status.succeeded}')" = "1" ]; do
  failed="$(kubectl -n "$ns" get job mergeline-migrate -o jsonpath='{.status.conditions[?(@.type=="Failed")].status}')"
  if [ "$failed" = "True" ] || [ "$SECONDS" -ge "$deadline" ]; then
    echo "migration failed or timed out; API and workers left as they were" >&2
    kubectl -n "$ns" logs job/mergeline-migrate --tail=100 >&2 || true
    exit 1
  fi
  sleep 5
done

kubectl apply -k "$here/app"
kubectl -n "$ns" rollout status deployment/mergeline-api --timeout=10m
kubectl -n "$ns" rollout status deployment/mergeline-worker --timeout=30m
