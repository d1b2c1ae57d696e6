# One image for every mintq process (api, worker, beat, flower, setup) and the dev anvil.
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
COPY celeryconfig.py ./
RUN pip install --no-cache-dir .

ENTRYPOINT ["deploy/entrypoint.sh"]
CMD ["python", "-m", "gunicorn", "app.wsgi:app", "--bind", "0.0.0.0:8000", "--worker-class", "gthread", "--threads", "8", "--worker-tmp-dir", "/dev/shm"]
