"""Shared benchmark plumbing: timing, device naming and result files."""

from __future__ import annotations

import json
import os
import platform
import re
import statistics
import time
from pathlib import Path

import jax

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def device_name(device: jax.Device | None = None) -> str:
    device = device or jax.devices()[0]
    return getattr(device, "device_kind", device.platform) or device.platform


def device_slug(device: jax.Device | str | None = None) -> str:
    """File-name form of a device (default: the first) or of a device name, e.g. ``nvidia-h100-80gb-hbm3``."""
    name = device if isinstance(device, str) else device_name(device)
    return re.sub(r"[^A-Za-z0-9]+", "-", name).strip("-").lower() or "device"


def median(xs):
    return statistics.median(xs)


def write_results(name: str, payload: dict, markdown: str) -> tuple[Path, Path]:
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    slug = device_slug()
    payload = dict(payload, device=device_name(), jax=jax.__version__, host=platform.node(), time=time.ctime())
    json_path = RESULTS_DIR / f"{name}_{slug}.json"
    md_path = RESULTS_DIR / f"{name}_{slug}.md"
    json_path.write_text(json.dumps(payload, indent=2) + "\n")
    md_path.write_text(f"# {name} on {device_name()}\n\n{markdown}\n")
    out = os.environ.get("OUT")  # the device tool copies $OUT back
    if out:
        for p in (json_path, md_path):
            Path(out, p.name).write_text(p.read_text())
    return json_path, md_path
