"""
Serve the chat model: the OpenAI-compatible API and the web page (serve/app.py) on Ray Serve.

    python jobs/serve.py                                  # the sft model (the only one trained), http://127.0.0.1:8000
    python jobs/serve.py --stage mid --step 500 --port 8080 --max-batch 16
    python jobs/serve.py --num-replicas 4                 # one GPU each when the cluster has GPUs

Run it from the checkout root (Ray workers import the `serve` package from the driver's working
directory). It joins a running cluster or starts a local Ray, and serves until Ctrl-C. Binds
127.0.0.1 unless --host says otherwise; set NANOCHAT_API_KEY to require a bearer key.
"""

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from pydantic import ValidationError

from nanochat_ray.checkpoint import CheckpointError, resolve_model_tag
from nanochat_ray.common import init_ray


def main(argv: list[str] | None = None) -> None:
    from ray import serve

    from serve.app import AppArgs, api_key_from_env, build_app, exposure_warning

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default="127.0.0.1", help="address to bind; 0.0.0.0 exposes the server")
    parser.add_argument("--port", type=int, default=8000)
    for name, field in AppArgs.model_fields.items():  # one flag per app setting; AppArgs checks the types
        parser.add_argument("--" + name.replace("_", "-"), default=None, help=f"default: {field.default!r}")
    args = parser.parse_args(argv)
    settings = {k: v for k, v in vars(args).items() if k in AppArgs.model_fields and v is not None}
    try:
        app_args = AppArgs.model_validate(settings)
    except ValidationError as error:
        parser.error(str(error))
    try:
        api_key = api_key_from_env()
    except ValueError as error:
        parser.error(str(error))
    try:  # before Ray starts: no model, no server
        app_args.model_tag = resolve_model_tag(app_args.stage, app_args.model_tag, app_args.root)
    except CheckpointError as error:
        parser.exit(2, f"error: {error}\n")
    if warning := exposure_warning(args.host, api_key):
        banner = "!" * 100
        print(f"{banner}\n{warning}\n{banner}", file=sys.stderr, flush=True)
    init_ray()
    if "num_gpus" not in settings:  # a GPU per model replica when the cluster has GPUs
        import ray

        app_args.num_gpus = 1 if ray.cluster_resources().get("GPU", 0) >= 1 else 0
    serve.start(http_options={"host": args.host, "port": args.port})
    serve.run(build_app(app_args), name="nanochat", route_prefix="/")
    print(f"serving {app_args.stage} at http://{args.host}:{args.port} (web page at /, API at /v1). Ctrl-C stops.",
          flush=True)
    try:
        while True:
            time.sleep(3600)  # the server runs in Ray; this driver only keeps it up
    except KeyboardInterrupt:
        serve.shutdown()


if __name__ == "__main__":
    main()
