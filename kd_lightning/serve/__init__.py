"""``kdl serve-teacher``: a classifier checkpoint served as a black-box teacher over HTTP.

:mod:`kd_lightning.serve.service` holds the transport-free logic (validation, answers, idempotent replays,
the server's own log); :mod:`kd_lightning.serve.server` puts it behind FastAPI + uvicorn. The wire format and
protocol constants both ends share are :mod:`kd_lightning.teachers.wire`; the client side (budget, journal,
retries) is :mod:`kd_lightning.teachers.client` and :mod:`kd_lightning.teachers.blackbox`.
"""

from kd_lightning.serve.service import TeacherService

__all__ = ["TeacherService"]
