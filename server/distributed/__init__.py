"""Loopstack on Ray Serve: one front (the ingress) and model replicas, each replica the single-process
server (its registry, engines and batchers, unchanged) restricted to one image model or to chat.

- `replica.py`: runs one single-process app inside a Serve replica and answers requests forwarded to
  it over a deployment handle, streaming the app's ASGI messages back.
- `front.py`: the public FastAPI app on the ingress: the same paths, OpenAPI schema and error shape;
  each model request goes to its model's deployment, and seeded requests whose replica stopped are
  sent again.
- `app.py`: the Serve deployments and the application builder that `serve run` loads.

Ray Serve does the rest: replicas, autoscaling on ongoing requests, placement, and routing each call
to the less loaded of two sampled replicas.
"""
