"""``python -m serving.healthcheck``: exit 0 when the server in this container is ready.

The images' HEALTHCHECK and docker-compose.yml run it: a slim image has no curl, and every
argument is one word, because podman's Docker-compatible API splits health-check arguments at
spaces (an inline ``python -c "..."`` arrives there as broken code). It probes
``http://127.0.0.1:$EED_PORT/readyz`` (port 8000 when unset), the port the image's command
listens on, so moving the server with EED_PORT moves the probe too.
"""

from __future__ import annotations

import os
import sys
import urllib.request


def main() -> int:
    url = f"http://127.0.0.1:{os.environ.get('EED_PORT', '8000')}/readyz"
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
