#!/usr/bin/env bash
# Smoke test of a control plane started by `scripts/cluster.sh up`, with curl
# and the admin client certificate only (no kubectl needed):
#   default service account exists -> create a Deployment -> the controller
#   manager makes a ReplicaSet and a Pod (Pending: there is no kubelet) ->
#   delete the Deployment -> the garbage collector removes ReplicaSet and Pod.
# Usage: bash scripts/k8s/smoke.sh [CLUSTER_NAME]   (default c0)
set -euo pipefail

NAME=${1:-c0}
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
ENV_FILE=$ROOT/.cluster/$NAME/cluster.env
[[ -f $ENV_FILE ]] || { echo "no cluster $NAME ($ENV_FILE missing)" >&2; exit 1; }
# shellcheck disable=SC1090
source "$ENV_FILE"
TIMEOUT=${SMOKE_TIMEOUT:-60}
DEPLOY=smoke-$$

say() { printf '[smoke %s] %s\n' "$NAME" "$*" >&2; }
api() { # METHOD PATH [JSON]
    curl -sS --fail-with-body --max-time 10 --cacert "$CA_CERT" --cert "$ADMIN_CERT" --key "$ADMIN_KEY" \
        -X "$1" -H 'Content-Type: application/json' ${3:+--data "$3"} "$API_SERVER$2"
}
# Polls a jq expression over a GET until it is true.
wait_jq() { # description path jq-expr
    local deadline=$(( $(date +%s) + TIMEOUT ))
    until api GET "$2" | jq -e "$3" >/dev/null 2>&1; do
        (( $(date +%s) < deadline )) || { say "FAIL: timed out waiting for $1"; exit 1; }
        sleep 1
    done
    say "ok: $1"
}

api GET /api/v1/namespaces/default/serviceaccounts/default | jq -e '.metadata.name == "default"' >/dev/null
say "ok: serviceaccount default/default exists"

api POST /apis/apps/v1/namespaces/default/deployments "$(cat <<EOF
{"apiVersion": "apps/v1", "kind": "Deployment",
 "metadata": {"name": "$DEPLOY", "namespace": "default"},
 "spec": {"replicas": 1,
          "selector": {"matchLabels": {"app": "$DEPLOY"}},
          "template": {"metadata": {"labels": {"app": "$DEPLOY"}},
                       "spec": {"containers": [{"name": "main", "image": "example.invalid/smoke:1"}]}}}}
EOF
)" >/dev/null
say "ok: created deployment $DEPLOY"

SEL="labelSelector=app%3D$DEPLOY"
wait_jq "ReplicaSet created by the deployment controller" \
    "/apis/apps/v1/namespaces/default/replicasets?$SEL" \
    '.items | length == 1 and .[0].metadata.ownerReferences[0].kind == "Deployment"'
wait_jq "Pod created by the replicaset controller (Pending, no kubelet)" \
    "/api/v1/namespaces/default/pods?$SEL" \
    '.items | length == 1 and .[0].status.phase == "Pending" and .[0].metadata.ownerReferences[0].kind == "ReplicaSet"'

api DELETE "/apis/apps/v1/namespaces/default/deployments/$DEPLOY" \
    '{"kind": "DeleteOptions", "apiVersion": "v1", "propagationPolicy": "Background"}' >/dev/null
say "ok: deleted deployment $DEPLOY"
wait_jq "garbage collector removed the ReplicaSet" \
    "/apis/apps/v1/namespaces/default/replicasets?$SEL" '.items | length == 0'
wait_jq "garbage collector removed the Pod" \
    "/api/v1/namespaces/default/pods?$SEL" '.items | length == 0'
say "PASS"
