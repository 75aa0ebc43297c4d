"""What every route may depend on: the app's engine and settings (set once by create_app)."""
from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

from fastapi import Request
from sqlalchemy.engine import Engine


@dataclass(frozen=True)
class Settings:
    quarantine: timedelta  # after unbind
    expiry_quarantine: timedelta | None = None  # the most after an expiry (None: quarantine)
    region: str = "CN"
    extension_digits: int = 4


async def engine(request: Request) -> Engine:  # async: no thread for a lookup
    return request.app.state.engine


async def settings(request: Request) -> Settings:
    return request.app.state.settings
