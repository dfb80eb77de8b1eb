#!/usr/bin/env bash
# Renders the Kubernetes manifests, k8s/base and every overlay in
# k8s/overlays/, with `kubectl kustomize`, and checks what comes out:
#
#   1. Schemas: kubernetes-validate in strict mode, against the API of every
#      Kubernetes version in K8S_VERSIONS. Unknown fields, wrong types and
#      missing required fields are errors. Custom resources have no schema
#      there: objects of the kinds listed in CUSTOM_KINDS (Strimzi's
#      KafkaTopic, CloudNativePG's Cluster) are let through, and any other
#      object without a schema is an error, since a misspelt apiVersion or
#      kind would otherwise pass unchecked.
#   2. Rapport's own rules, which no schema expresses: the settings every
#      pod needs to start and to run locked down (enableServiceLinks off,
#      non-root, read-only root filesystem, ...), a pinned image tag, a
#      termination grace period longer than RAPPORT_SHUTDOWN_GRACE_MS, and
#      references that resolve (ConfigMaps, Services, PodDisruptionBudgets
#      and autoscalers to the Deployments they are for).
#
# Exits non-zero on any error. Needs kubectl (on PATH, or the one
# deploy/local-stack.sh installs as $RAPPORT_STATE_DIR/python/bin/kubectl)
# and kubernetes-validate in $RAPPORT_STATE_DIR/python (also installed by
# deploy/local-stack.sh).
#
# K8S_VERSIONS: space-separated Kubernetes versions to validate against
# (default "1.30.0 1.37.0": the oldest version these manifests support and
# the newest kubernetes-validate knows).

set -euo pipefail
cd "$(dirname "$0")/.."

RAPPORT_STATE_DIR=${RAPPORT_STATE_DIR:-/var/tmp/rapport}
PYTHON_DIR="$RAPPORT_STATE_DIR/python"
K8S_VERSIONS=${K8S_VERSIONS:-1.30.0 1.37.0}
# "<kind> with api version <apiVersion>", as kubernetes-validate names them.
CUSTOM_KINDS=(
  "KafkaTopic with api version kafka.strimzi.io/v1beta2"
  "Cluster with api version postgresql.cnpg.io/v1"
)

custom_kinds=()
for kind in "${CUSTOM_KINDS[@]}"; do
  custom_kinds+=(-e "$kind")
done

say() { echo "[validate-k8s] $*" >&2; }

if command -v kubectl >/dev/null; then
  kubectl=kubectl
elif [ -x "$PYTHON_DIR/bin/kubectl" ]; then
  kubectl="$PYTHON_DIR/bin/kubectl"
else
  say "kubectl not found on PATH nor as $PYTHON_DIR/bin/kubectl; run deploy/local-stack.sh"
  exit 1
fi
if ! PYTHONPATH="$PYTHON_DIR" python3 -c 'import kubernetes_validate, yaml' 2>/dev/null; then
  say "kubernetes-validate not found in $PYTHON_DIR; run deploy/local-stack.sh"
  exit 1
fi

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

targets=(k8s/base)
for overlay in k8s/overlays/*/; do
  targets+=("${overlay%/}")
done
if [ ${#targets[@]} -lt 2 ]; then
  say "no overlays found in k8s/overlays"
  exit 1
fi

failed=0
for target in "${targets[@]}"; do
  rendered="$work/$(echo "$target" | tr / _).yaml"
  if ! "$kubectl" kustomize "$target" >"$rendered" 2>"$work/kustomize.err"; then
    say "$target: kustomize failed:"
    cat "$work/kustomize.err" >&2
    failed=1
    continue
  fi
  objects=$(grep -c '^kind:' "$rendered" || true)

  # 1. Schemas.
  for version in $K8S_VERSIONS; do
    status=0
    PYTHONPATH="$PYTHON_DIR" python3 -m kubernetes_validate --strict --quiet \
      -k "$version" "$rendered" >"$work/validate.out" 2>&1 || status=$?
    # Objects without a schema are reported as warnings; only the custom
    # kinds above may have none.
    unexpected=$(grep '^WARN' "$work/validate.out" | grep -v -F "${custom_kinds[@]}" || true)
    errors=$(grep -v '^WARN' "$work/validate.out" || true)
    if [ "$status" -ne 0 ] || [ -n "$errors" ] || [ -n "$unexpected" ]; then
      say "$target: Kubernetes $version: FAILED"
      [ -z "$errors" ] || echo "${errors//$rendered/$target}" >&2
      [ -z "$unexpected" ] || echo "$unexpected" | sed -e "s|$rendered|$target|" \
        -e 's/^WARN/ERROR (no schema; not a known custom resource)/' >&2
      failed=1
    else
      custom=$(grep -c '^WARN' "$work/validate.out" || true)
      say "$target: Kubernetes $version: $((objects - custom)) objects valid;" \
        "$custom custom resources have no schema here and were not checked"
    fi
  done

  # 2. Rapport's rules.
  if ! PYTHONPATH="$PYTHON_DIR" python3 - "$rendered" "$target" <<'EOF'
import sys

import yaml

path, target = sys.argv[1], sys.argv[2]
objects = [o for o in yaml.safe_load_all(open(path)) if o]
errors = []


def of_kind(kind):
    return [o for o in objects if o["kind"] == kind]


def name(o):
    return f'{o["kind"]}/{o["metadata"]["name"]}'


def matches(selector, labels):
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


config = {}
configmaps = {o["metadata"]["name"] for o in of_kind("ConfigMap")}
for o in of_kind("ConfigMap"):
    config.update(o.get("data", {}))
grace_ms = int(config.get("RAPPORT_SHUTDOWN_GRACE_MS", "20000"))

workloads = of_kind("Deployment") + of_kind("Job")
if len(of_kind("Deployment")) != 6:
    errors.append(f"expected 6 Deployments, found {len(of_kind('Deployment'))}")
for o in workloads:
    pod = o["spec"]["template"]["spec"]
    where = name(o)
    # Kubernetes would otherwise add RAPPORT_<SERVICE>_SERVICE_HOST and the
    # like, which Rapport refuses as unknown configuration keys.
    if pod.get("enableServiceLinks") is not False:
        errors.append(f"{where}: enableServiceLinks must be false")
    if pod.get("automountServiceAccountToken") is not False:
        errors.append(f"{where}: automountServiceAccountToken must be false")
    security = pod.get("securityContext", {})
    if security.get("runAsNonRoot") is not True or security.get("runAsUser") != 10001:
        errors.append(f"{where}: must run as non-root user 10001")
    if security.get("seccompProfile", {}).get("type") != "RuntimeDefault":
        errors.append(f"{where}: seccompProfile must be RuntimeDefault")
    for c in pod["containers"]:
        cwhere = f'{where} container {c["name"]}'
        image = c.get("image", "")
        if ":" not in image.rsplit("/", 1)[-1]:
            errors.append(f"{cwhere}: image {image!r} has no tag")
        sc = c.get("securityContext", {})
        if sc.get("readOnlyRootFilesystem") is not True:
            errors.append(f"{cwhere}: readOnlyRootFilesystem must be true")
        if sc.get("allowPrivilegeEscalation") is not False:
            errors.append(f"{cwhere}: allowPrivilegeEscalation must be false")
        if "ALL" not in sc.get("capabilities", {}).get("drop", []):
            errors.append(f"{cwhere}: capabilities must drop ALL")
        for source in c.get("envFrom", []):
            ref = source.get("configMapRef", {}).get("name")
            if ref is not None and ref not in configmaps:
                errors.append(f"{cwhere}: ConfigMap {ref} is not in the output")

for o in of_kind("Deployment"):
    pod = o["spec"]["template"]["spec"]
    where = name(o)
    if pod.get("terminationGracePeriodSeconds", 30) * 1000 <= grace_ms:
        errors.append(f"{where}: terminationGracePeriodSeconds must exceed "
                      f"RAPPORT_SHUTDOWN_GRACE_MS ({grace_ms} ms)")
    container = pod["containers"][0]
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        if probe not in container:
            errors.append(f"{where}: no {probe}")
    labels = o["spec"]["template"]["metadata"].get("labels", {})
    if not matches(o["spec"]["selector"].get("matchLabels"), labels):
        errors.append(f"{where}: selector does not match its pod template")
    for kind, selector_of in (
        ("Service", lambda s: s["spec"].get("selector")),
        ("PodDisruptionBudget", lambda p: p["spec"]["selector"].get("matchLabels")),
    ):
        if not any(matches(selector_of(x), labels) for x in of_kind(kind)):
            errors.append(f"{where}: no {kind} selects its pods")
    if not any(h["spec"]["scaleTargetRef"]["name"] == o["metadata"]["name"]
               for h in of_kind("HorizontalPodAutoscaler")):
        errors.append(f"{where}: no HorizontalPodAutoscaler targets it")

for error in errors:
    print(f"ERROR {target}: {error}", file=sys.stderr)
sys.exit(1 if errors else 0)
EOF
  then
    say "$target: Rapport's rules: FAILED"
    failed=1
  else
    say "$target: Rapport's rules: ok"
  fi
done

if [ "$failed" -ne 0 ]; then
  say "FAILED"
  exit 1
fi
say "all manifests valid"
