"""Flower's configuration file (docker-compose.yml mounts it as the working directory's
`flowerconfig.py`, which Flower reads at start): its `/metrics` asks for the same login as
every other page.

Flower exempts `/metrics` from `--basic-auth` and has no option to include it (mher/flower
#1342), and the metrics name every task. Prometheus scrapes it with FLOWER_BASIC_AUTH.
"""

import tornado.web
from flower.views import monitor

if not getattr(monitor.Metrics.get, "__wrapped__", None):
    monitor.Metrics.get = tornado.web.authenticated(monitor.Metrics.get)
