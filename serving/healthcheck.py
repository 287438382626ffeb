"""``python -m serving.healthcheck``: exit 0 when the server in this container is ready.

The images' HEALTHCHECK and docker-compose.yml run it: a slim image has no curl, and every
argument is one word, because podman's Docker-compatible API splits health-check arguments at
spaces (an inline ``python -c "..."`` arrives there as broken code). It probes
``http://$EED_HOST:$EED_PORT/readyz`` (loopback when the server listens on every interface or
EED_HOST is unset, port 8000 when EED_PORT is unset): moving the server moves the probe too.
"""

from __future__ import annotations

import os
import sys
import urllib.request
from collections.abc import Mapping

# ServerSettings' defaults (a test keeps them equal): not imported from there, because the probe runs
# every few seconds in the container and pydantic-settings would add its import to every run.
DEFAULT_HOST, DEFAULT_PORT = "127.0.0.1", "8000"


def probe_url(environ: Mapping[str, str]) -> str:
    """The /readyz URL of the server that ``environ``'s EED_HOST and EED_PORT describe."""
    host = environ.get("EED_HOST", "").strip() or DEFAULT_HOST
    # Listening on every interface includes loopback; a specific address only itself.
    host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{environ.get('EED_PORT', DEFAULT_PORT)}/readyz"


def main() -> int:
    if os.environ.get("EED_PORT", "").strip() == "0":
        print("EED_PORT=0 lets the system pick the port: the probe cannot know it; set EED_PORT", file=sys.stderr)
        return 1
    url = probe_url(os.environ)
    # No proxy: urlopen would send even 127.0.0.1 through an HTTP_PROXY in the container's
    # environment (without a NO_PROXY for it), and a ready server would stay "unhealthy".
    direct = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with direct.open(url, timeout=4) as response:  # raises on non-2xx
            return 0 if response.status == 200 else 1
    except Exception as exc:  # refused, 503 (loading, draining), timeout: all mean "not ready"
        print(f"{url}: not ready: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
