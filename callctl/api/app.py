"""The provisioning HTTP API (FastAPI): bindings and pool status for a tenant's systems.

Every request carries `Authorization: Bearer <token>` (`callctl token create`). A token
has a role; the binding and pool endpoints take 'tenant' tokens and act only on that
tenant's bindings: another tenant's binding is 404, exactly like a missing one.
`GET /exports/regulator` takes 'regulator' tokens, and they can read nothing else. Real
numbers go in (customer, other_party) and never come out: responses carry them masked.
Every error is JSON `{"error": {"code": ..., "message": ...}}` with a stable code
(the codes of callctl.errors.ProvisionError and its kinds, plus the HTTP-level ones below).
"""
from __future__ import annotations

import copy
import logging
from datetime import timedelta

import structlog
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.engine import Engine
from sqlalchemy.exc import DBAPIError
from starlette.exceptions import HTTPException

from callctl.api import bindings, blacklist, blocks, cdrs, customers, pool, regulator, reveals
from callctl.api.auth import Tokens
from callctl.api.deps import Settings
from callctl.api.limits import BODY_TIMEOUT, MAX_BODY_BYTES, BodyGuard
from callctl.api.schemas import ERRORS
from callctl.errors import ProvisionError
from callctl.store import reveal

log = structlog.get_logger("callctl.api")

# One router per resource, in the order the OpenAPI page lists them.
ROUTERS = (bindings.router, pool.router, cdrs.router, customers.router, blocks.router, reveals.router,
           regulator.router, blacklist.router)
HTTP_CODES = {401: "unauthorized", 403: "forbidden", 404: "not_found", 405: "method_not_allowed"}


def error(status: int, code: str, message: str) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status)


def _provision_error(_request: Request, exc: ProvisionError):
    return error(exc.status, exc.code, str(exc))


def _invalid(_request: Request, exc: RequestValidationError):
    # Location and message only: pydantic's 'input' could echo a real number.
    problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())
    return error(422, "invalid_request", problems)


def _http(_request: Request, exc: HTTPException):
    if exc.status_code == 400:  # a body FastAPI could not read: not UTF-8, or JSON nested too deep
        return error(422, "invalid_request", "body: not readable JSON (UTF-8, nested at most a few hundred deep)")
    response = error(exc.status_code, HTTP_CODES.get(exc.status_code, "http_error"), str(exc.detail))
    response.headers.update(exc.headers or {})  # 405's Allow
    return response


def _database(_request: Request, exc: DBAPIError):
    # The statement and its parameters stay out of the log: they may hold a real number.
    log.error("database error", error=type(exc.orig).__name__)
    return error(503, "unavailable", "the database cannot answer; retry")


def create_app(engine: Engine, *, quarantine: timedelta, region: str = "CN", extension_digits: int = 4,
               max_body_bytes: int = MAX_BODY_BYTES, body_timeout: float = BODY_TIMEOUT,
               token_cache_seconds: float = 5.0, expiry_quarantine: timedelta | None = None) -> FastAPI:
    # No redirect to the path without its trailing slash: a 307 is no answer the API
    # documents (an id of "/" made one); such a path is 404 like any unknown one.
    app = FastAPI(title="callctl provisioning API", version="1", description=__doc__, responses=ERRORS,
                  redirect_slashes=False)
    # A body is read only after its token checks out, capped and timed (limits.py).
    app.state.tokens = Tokens(engine, token_cache_seconds)  # auth.py: how late a revocation can bite
    app.add_middleware(BodyGuard, tokens=app.state.tokens, routes=app.router.routes,
                       max_bytes=max_body_bytes, timeout=body_timeout)
    app.state.engine = engine
    app.state.settings = Settings(quarantine=quarantine, region=region, extension_digits=extension_digits,
                                  expiry_quarantine=quarantine if expiry_quarantine is None else expiry_quarantine)
    app.add_exception_handler(ProvisionError, _provision_error)
    app.add_exception_handler(RequestValidationError, _invalid)
    app.add_exception_handler(HTTPException, _http)
    app.add_exception_handler(DBAPIError, _database)
    for router in ROUTERS:
        app.include_router(router)
    return app


def app_from_config() -> FastAPI:
    """The app as configured (conf/callctl.yaml, CALLCTL_* variables): what each worker
    process of `callctl serve api` runs."""
    from callctl import config, logs
    from callctl.store.db import make_engine

    cfg = config.load()
    logs.setup(cfg.log.format, cfg.log.level)
    reveal.use_checkpoint(cfg.audit_checkpoint)  # reveals advance the audit checkpoint
    # db_timeout: no request waits on a dead or hung database longer than that.
    engine = make_engine(cfg.database_url, pool_size=cfg.db_threads, timeout=cfg.db_timeout)
    return create_app(engine, quarantine=timedelta(days=cfg.quarantine_days), region=cfg.region,
                      extension_digits=cfg.axe_extension_digits, max_body_bytes=cfg.api.max_body_bytes,
                      body_timeout=cfg.api.body_timeout, token_cache_seconds=cfg.api.token_cache_seconds,
                      expiry_quarantine=cfg.expiry_quarantine)


def _api_health(cfg):
    """/healthz of the API process: ready while its database answers."""
    import asyncio

    from sqlalchemy import text as sql_text
    from sqlalchemy.exc import SQLAlchemyError

    from callctl.store.db import make_engine

    engine = make_engine(cfg.database_url, pool_size=1, timeout=cfg.db_timeout)

    def probe() -> dict[str, str]:
        try:
            with engine.connect() as conn:
                conn.execute(sql_text("SELECT 1"))
            return {"database": "ok"}
        except SQLAlchemyError as exc:
            return {"database": f"not answering ({type(exc).__name__})"}

    async def health() -> dict[str, str]:
        return await asyncio.get_running_loop().run_in_executor(None, probe)

    def outbox_depth() -> float:
        from sqlalchemy import func, select

        from callctl.store.models import WebhookDelivery

        try:
            with engine.connect() as conn:
                return conn.execute(select(func.count()).select_from(WebhookDelivery)
                                    .where(WebhookDelivery.delivered_at.is_(None))).scalar()
        except SQLAlchemyError:
            return float("nan")  # database down: /healthz says so

    from callctl.metrics import OUTBOX_DEPTH

    OUTBOX_DEPTH.set_function(outbox_depth)

    return health


class AccessFormatter(logging.Formatter):
    """uvicorn's access lines as method, path and status: never the query string (GET
    /v1/customers/preferences?customer=... carries a real number) nor the client's
    address; any number-like digit run a client put in the path is masked."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        from callctl.logs import scrub

        _client, method, full_path, _version, status = record.args
        record = copy.copy(record)
        record.__dict__.update(method=method, path=scrub(str(full_path).partition("?")[0]), status=status)
        return super().formatMessage(record)


def _uvicorn_logging(access_log: bool) -> dict:
    """uvicorn's own log lines (startup, errors) at warning; access lines (api.access_log)
    through AccessFormatter, on stderr with the rest."""
    return {
        "version": 1, "disable_existing_loggers": False,
        "formatters": {
            "default": {"format": "%(asctime)s %(levelname)s uvicorn: %(message)s"},
            "access": {"()": "callctl.api.app.AccessFormatter",
                       "format": "%(asctime)s api access: %(method)s %(path)s %(status)s"},
        },
        "handlers": {
            "default": {"class": "logging.StreamHandler", "formatter": "default", "stream": "ext://sys.stderr"},
            "access": {"class": "logging.StreamHandler", "formatter": "access", "stream": "ext://sys.stderr"},
        },
        "loggers": {
            "uvicorn": {"handlers": ["default"], "level": "WARNING", "propagate": False},
            "uvicorn.error": {"level": "WARNING"},
            "uvicorn.access": {"handlers": ["access"] if access_log else [],
                               "level": "INFO" if access_log else "WARNING", "propagate": False},
        },
    }


def serve(cfg) -> None:
    """`callctl serve api`: the API on cfg.api.listen until SIGTERM/SIGINT."""
    import uvicorn

    from callctl.metrics import serve_in_thread

    serve_in_thread(cfg.api.metrics_host, cfg.api.metrics_port, _api_health(cfg))
    log.info("api listening", listen=cfg.api.listen, workers=cfg.api.workers, metrics=cfg.api.metrics_listen)
    uvicorn.run("callctl.api.app:app_from_config", factory=True, host=cfg.api.host, port=cfg.api.port,
                workers=cfg.api.workers, access_log=cfg.api.access_log, log_level=None,
                log_config=_uvicorn_logging(cfg.api.access_log), server_header=False)
