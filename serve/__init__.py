"""The Ray Serve chat app (serve/app.py). Named like `ray.serve`, which is always imported as
`from ray import serve`, so `serve run serve.app:app` from the checkout root finds this package."""
