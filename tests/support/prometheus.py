"""Reading one sample out of a Prometheus text exposition, and a running server's exposition."""

from __future__ import annotations

import re

import requests


def metric(text: str, name: str, **labels) -> float:
    """The value of one sample (0 when absent); ``labels`` must be all of the sample's labels, in order."""
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    pattern = re.compile(
        rf"^{re.escape(name)}(\{{{re.escape(want)}\}})? (\S+)$" if want else rf"^{re.escape(name)} (\S+)$", re.M
    )
    match = pattern.search(text)
    return float(match.groups()[-1]) if match else 0.0


def scrape(server, verify: bool | str = True) -> str:
    """``GET /metrics`` of a running server (``tests.support.serving.RunningServer``); ``verify``
    is a CA bundle for HTTPS."""
    return requests.get(server.base_url + "/metrics", timeout=10, verify=verify).text
