"""gunicorn's settings for the mintq API: the one place they are written.

`deploy.processes.api_command` starts gunicorn with this file for every API process (the dev
stack, the container image, tests and benchmarks) and adds on the command line only what the
caller chooses: where to listen, and where it asks, workers, threads and the access log. gunicorn
lets its command line win over this file.
"""

import os

wsgi_app = "app.wsgi:app"
bind = ["127.0.0.1:8000"]

# Two per core with 8 threads measured best for intake (bench.intake; 2x16, 3x8, 4x4, 6x6, 8x2
# and 12x1 did no better). Live-update streams hold no thread here: the event service serves
# them. WEB_CONCURRENCY, gunicorn's own knob, still sets the number of workers.
workers = int(os.environ.get("WEB_CONCURRENCY") or 2 * (os.cpu_count() or 1))
worker_class = "gthread"
threads = 8
graceful_timeout = 20

# Each worker's heartbeat touches a file on every pass of its loop (twice a request): on a disk
# that is a metadata write each time, in memory it is not.
if os.path.isdir("/dev/shm"):
    worker_tmp_dir = "/dev/shm"

# Behind a load balancer it writes the access log (deploy/nginx.conf): gunicorn's own would cost
# intake CPU for lines already written. A lone API (the dev stack) asks for it on the command line.
accesslog = None

# No `gunicornc` control socket: every API on a host (replicas, tests) would share its one
# default path, and nothing here uses it.
control_socket_disable = True
