"""Teachers: frozen white-box models (black-box APIs come with MEKD)."""

from kd_lightning.teachers.frozen import FrozenTeacher, load_teacher

__all__ = ["FrozenTeacher", "load_teacher"]
