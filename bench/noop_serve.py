"""Serve's own floor: a plain `async def __call__` deployment answering a fixed JSON body.

Run by `python -m bench compare --systems textserve-noop-1` through the same `serve run` path and
fast ingress as this system, so the difference between the two is what our replica code costs.
"""

from ray import serve
from starlette.responses import Response

BODY = b'{"label":"noop","score":1.0,"top_k":[{"label":"noop","score":1.0}],"model_version":0}'


@serve.deployment
class NoopServe:
    async def __call__(self, request):  # the body is not read: the floor is Serve's per-request cost
        return Response(BODY, media_type="application/json")


app = NoopServe.bind()
