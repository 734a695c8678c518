"""``kdl pipeline`` (being split into modules; see run.py)."""

from kd_lightning.pipeline.run import *  # noqa: F403
from kd_lightning.pipeline.run import _deep_merge, _file_sha, _get_dotted, main  # noqa: F401
