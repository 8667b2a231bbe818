"""drover-chaos Celery baseline: the tasks. Configured from the environment by the harness."""
import os
import subprocess

from celery import Celery

app = Celery(
    "drover_chaos",
    broker=os.environ["DROVER_CHAOS_BROKER"],
    backend=os.environ["DROVER_CHAOS_BACKEND"],
)
app.conf.update(
    task_acks_late=True,
    worker_prefetch_multiplier=1,
    task_default_queue="drover_chaos",
    result_expires=3600,
    broker_connection_retry_on_startup=True,
    worker_hijack_root_logger=False,
)

DOCKER_ARGS = os.environ.get("DROVER_CHAOS_DOCKER_ARGS", "").split("\x1f")


@app.task(name="drover_chaos.noop")
def noop():
    return 0


@app.task(name="drover_chaos.docker")
def docker():
    return subprocess.run(["docker"] + DOCKER_ARGS, stdin=subprocess.DEVNULL,
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).returncode
