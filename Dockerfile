# One image for every spendstream service; the command picks the service.
FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY services ./services
COPY schemas ./schemas
COPY infra/policy ./infra/policy
RUN pip install --no-cache-dir . && mkdir -p /var/lib/spendstream /etc/spendstream-keys/signing /etc/spendstream-keys/verify \
    && chown nobody /var/lib/spendstream /etc/spendstream-keys/signing /etc/spendstream-keys/verify
USER nobody
ENTRYPOINT ["spendstream"]
CMD ["--help"]
