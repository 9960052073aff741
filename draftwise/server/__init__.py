"""OpenAI-compatible HTTP server: ``draftwise serve --model M [--method NAME] [--api-key K]``.

``app`` (routes, guard, serve), ``requests`` (validation), ``worker`` (the generation thread, metrics),
``schema`` (the published request and response models).
"""
from draftwise.server.app import MAX_BODY, create_app, serve
from draftwise.server.requests import Policy, RequestError, check_method, parse
from draftwise.server.worker import Job, Metrics, Worker

__all__ = ["MAX_BODY", "Job", "Metrics", "Policy", "RequestError", "Worker", "check_method", "create_app", "parse",
           "serve"]
