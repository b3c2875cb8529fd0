"""Flower's Deployment Engine: ``flwr`` CLI control, a local deployment, the ``fedlayer deploy`` command."""

from fedlayer.deploy.command import (
    add_deploy_parser,
    cmd_deploy,
    deployment_overrides,
    prepare_out,
    report,
    run_config,
)
from fedlayer.deploy.flwr_cli import DeployError, FlwrControl, RunOutcome
from fedlayer.deploy.local import LocalDeployment, TlsFiles, free_port

__all__ = [
    "DeployError",
    "FlwrControl",
    "LocalDeployment",
    "RunOutcome",
    "TlsFiles",
    "add_deploy_parser",
    "cmd_deploy",
    "deployment_overrides",
    "free_port",
    "prepare_out",
    "report",
    "run_config",
]
