# Sourced by every non-interactive bash in the image (Dockerfile: ENV BASH_ENV=...). KubeRay starts
# Ray with `/bin/bash -c -- "... ray start ..."`; for that command only, put the hardened fast
# ingress (serve/ingress.py, docs/SECURITY.md) in the environment, as the `ray up` files do with
# `eval "$(python -m serve env ...)"`. It keeps TEXTSERVE_INGRESS_SECRET from the environment (the
# textserve-secrets Secret), so HAProxy on every pod and every replica share one secret. Other
# commands (KubeRay's probes, kubectl exec) are left alone.
case "${BASH_EXECUTION_STRING:-}" in
  *"ray start"*)
    textserve_ingress_env="$(python -m serve env "${TEXTSERVE_INGRESS_DIR:-/tmp/textserve-ingress}")" || exit 1
    eval "$textserve_ingress_env"
    unset textserve_ingress_env
    ;;
esac
