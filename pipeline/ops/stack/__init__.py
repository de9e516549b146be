"""The team stack as local processes: PostgreSQL, SeaweedFS (S3), MLflow with basic auth,
a Prefect server with an auth string, and one process worker, all on 127.0.0.1.

    lmforge stack up | status | down

The service config files are the checkout's docker/ files, the ones docker/compose.yaml
mounts (docker/README.md). Prefect and MLflow run as subprocesses; nothing here imports
prefect (pipeline/ never does).
"""

from pipeline.ops.stack.launcher import down, load_client_env, status, up, use_dvc_remote
from pipeline.ops.stack.layout import StackError

__all__ = ["StackError", "down", "load_client_env", "status", "up", "use_dvc_remote"]
