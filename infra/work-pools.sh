#!/usr/bin/env bash
# Create (or update) the work pools of the tlflax deployments on the Prefect server that
# PREFECT_API_URL names. Idempotent: run it again after changing a pool.
#
#   PREFECT_API_URL=http://127.0.0.1:4200/api infra/work-pools.sh
#
# Both pools are of type `process`: a worker runs each flow run as a subprocess on its own
# machine or container, so a pool stands for "where this code and this hardware are".
#   tlflax-process  CPU machines and infra/docker-compose.yml's `worker`; prefect.yaml's pool.
#   tlflax-gpu      GPU machines running infra/Dockerfile.gpu-worker.
#
# Pools that start a container or a pod per flow run need Prefect's integrations (not
# installed in this project, so this script does not create them):
#   pip install prefect-docker && prefect work-pool create tlflax-docker --type docker
#   pip install prefect-kubernetes
#   prefect work-pool get-default-base-job-template --type kubernetes > k8s-job-template.json
#   (set the image and `nvidia.com/gpu` limits in it), then
#   prefect work-pool create tlflax-k8s --type kubernetes --base-job-template k8s-job-template.json
set -euo pipefail

: "${PREFECT_API_URL:?set PREFECT_API_URL to the API of the server, e.g. http://127.0.0.1:4200/api}"

for pool in tlflax-process tlflax-gpu; do
  prefect work-pool create "$pool" --type process --overwrite
done
# One run at a time on a GPU machine: two trainings on the same GPUs would fight for memory.
prefect work-pool set-concurrency-limit tlflax-gpu 1
