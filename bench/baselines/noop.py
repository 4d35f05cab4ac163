"""A trivial aiohttp server (no model): what the load client itself can drive on this machine.

python -m bench.baselines.noop [--port 8003]
"""

import argparse


def main() -> None:
    from aiohttp import web

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--port", type=int, default=8003)
    a = p.parse_args()

    async def ok(_request):
        return web.json_response({"label": "noop", "score": 1.0, "model_version": 0})

    app = web.Application()
    app.add_routes([web.post("/v1/predict", ok), web.get("/healthz", ok)])
    web.run_app(app, host="127.0.0.1", port=a.port, access_log=None, print=None)


if __name__ == "__main__":
    main()
