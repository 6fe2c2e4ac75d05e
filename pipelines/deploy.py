"""Serve the pipeline flow on its schedule from one process, with no work pool or worker.

    python -m pipelines.deploy serve                         # prefect.yaml's nightly schedule
    python -m pipelines.deploy serve --cron "*/30 * * * *" --name half-hourly

``flow.serve`` registers a deployment, schedule included, on the server PREFECT_API_URL names,
then runs its flow runs (scheduled or triggered, each in a subprocess) until it is stopped
with Ctrl-C or SIGTERM, which also pauses the schedule. The schedule and parameters come from
the ``nightly`` deployment in prefect.yaml, so both ways of deploying run the same thing;
the work-pool way is ``prefect deploy --all`` and ``prefect worker start`` (see prefect.yaml).
"""

from __future__ import annotations

import argparse
from typing import Any

import yaml
from prefect.schedules import Cron

from pipelines.flows import PROJECT_ROOT, pipeline
from tlflax.errors import InputError

PREFECT_YAML = PROJECT_ROOT / "prefect.yaml"
TEMPLATE_DEPLOYMENT = "nightly"
SERVED_DEPLOYMENT = "nightly-served"


def read_deployment(name: str) -> dict[str, Any]:
    """The deployment called ``name`` in prefect.yaml.

    Raises:
      InputError: prefect.yaml has no deployment of that name.
    """
    deployments = yaml.safe_load(PREFECT_YAML.read_text())["deployments"]
    matching = [deployment for deployment in deployments if deployment["name"] == name]
    if not matching:
        raise InputError(f"{PREFECT_YAML}: no deployment named {name!r}")
    return matching[0]


def serve(name: str, cron: str | None) -> None:
    """Serve the flow as deployment ``name`` on prefect.yaml's schedules, or on ``cron`` (UTC)."""
    template = read_deployment(TEMPLATE_DEPLOYMENT)
    if cron:
        schedules = [Cron(cron, timezone="UTC")]
    else:
        schedules = [
            Cron(schedule["cron"], timezone=schedule.get("timezone"))
            for schedule in template["schedules"]
        ]
    pipeline.serve(
        name=name,
        schedules=schedules,
        parameters=template.get("parameters", {}),
        description=template.get("description"),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    serve_command = commands.add_parser("serve", help="serve the flow on a schedule")
    serve_command.add_argument("--name", default=SERVED_DEPLOYMENT, help="deployment name")
    serve_command.add_argument("--cron", help="cron schedule (default: prefect.yaml's)")
    arguments = parser.parse_args()
    serve(arguments.name, arguments.cron)


if __name__ == "__main__":
    main()
