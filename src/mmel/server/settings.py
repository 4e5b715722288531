"""Server settings: where to listen, who may call, and how much one request may ask for."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field


class ServerSettings(BaseModel):
    """Everything `create_app` needs. Defaults are safe for a laptop: localhost only, modest limits."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    index_dir: Path
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)
    token: str | None = Field(default=None, min_length=8,
                              description="bearer token required on /link and /entities when set")
    max_body_bytes: int = Field(default=12 * 1024 * 1024, gt=0)
    max_url_bytes: int = Field(default=8 * 1024, gt=0, description="longer URLs answer 414")
    max_header_bytes: int = Field(default=64 * 1024, gt=0, description="larger header blocks answer 431")
    max_image_bytes: int = Field(default=8 * 1024 * 1024, gt=0)
    max_image_pixels: int = Field(default=25_000_000, gt=0)
    max_batch: int = Field(default=64, gt=0)
    max_top_k: int = Field(default=100, gt=0)
    max_candidates_k: int = Field(default=1000, gt=0)
    request_timeout_s: float = Field(default=30.0, gt=0, description="work over this answers 504")
    body_timeout_s: float | None = Field(default=None, gt=0, description=(
        "a request body must arrive within this (else 408 and the connection is closed); "
        "default: request_timeout_s"))
    query_runtime: str = Field(default="auto", pattern="^(auto|float32|onnx|onnx-int8)$", description=(
        "how queries are encoded (BackboneConfig.query_runtime)"))
    head_timeout_s: float = Field(default=10.0, gt=0, description=(
        "a request line and headers must arrive within this once a connection opens or a request starts "
        "(else the connection is closed)"))
    link_batch_wait_ms: float = Field(default=2.0, ge=0, description=(
        "how long a POST /link waits for other requests to be linked with it in one call (dynamic batching; "
        "requests that queue up while a call runs join the next one regardless)"))
