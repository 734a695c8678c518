"""Teachers: frozen white-box models, and black-box teachers seen only through their answers.

Black-box modules, bottom up: :mod:`.wire` (the wire format and protocol constants, shared with
:mod:`kd_lightning.serve`), the binary query journal (:mod:`.journal_format`: records and bytes; :mod:`.journal`:
the live file; :mod:`.journal_repair`: check and repair), :mod:`.client` (budget, dedup, retries,
accounting) and :mod:`.blackbox` (the in-process and HTTP teachers, and :func:`connect_teacher`).
"""

from kd_lightning.teachers.blackbox import HTTPTeacher, LocalTeacher, connect_teacher
from kd_lightning.teachers.client import QueryBudgetExceeded, QueryClient, TeacherAPIError
from kd_lightning.teachers.frozen import FrozenTeacher
from kd_lightning.teachers.frozen_generator import FrozenGenerator, load_frozen_generator
from kd_lightning.teachers.journal import QueryJournal
from kd_lightning.teachers.wire import BlackBoxTeacher

__all__ = [
    "BlackBoxTeacher",
    "FrozenGenerator",
    "FrozenTeacher",
    "HTTPTeacher",
    "LocalTeacher",
    "QueryBudgetExceeded",
    "QueryClient",
    "QueryJournal",
    "TeacherAPIError",
    "connect_teacher",
    "load_frozen_generator",
]
