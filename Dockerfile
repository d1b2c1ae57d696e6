# One image for every mintq process (api, events, worker, beat, flower, setup) and the dev anvil.
FROM python:3.11-slim

RUN apt-get update \
    && apt-get install -y --no-install-recommends nodejs npm curl \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /srv/mintq
COPY package.json package-lock.json ./
RUN npm install --no-audit --no-fund --loglevel=error
COPY pyproject.toml README.md ./
COPY app app
COPY tasks tasks
COPY db db
COPY mintq mintq
COPY deploy deploy
COPY contracts contracts
COPY celeryconfig.py gunicorn.conf.py ./
RUN pip install --no-cache-dir .

# A role of deploy/processes.py (api, events, worker, webhooks, beat, flower) or any command.
ENTRYPOINT ["deploy/entrypoint.sh"]
CMD ["api", "--host", "0.0.0.0"]
