"""Teachers: frozen white-box models, and black-box teachers seen only through their answers."""

from kd_lightning.teachers.blackbox import (
    BlackBoxTeacher,
    HTTPTeacher,
    LocalTeacher,
    QueryBudgetExceeded,
    QueryClient,
    QueryJournal,
    TeacherAPIError,
    connect_teacher,
)
from kd_lightning.teachers.frozen import FrozenTeacher

__all__ = [
    "BlackBoxTeacher",
    "FrozenTeacher",
    "HTTPTeacher",
    "LocalTeacher",
    "QueryBudgetExceeded",
    "QueryClient",
    "QueryJournal",
    "TeacherAPIError",
    "connect_teacher",
]
