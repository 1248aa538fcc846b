"""The pipeline's stages, one module each, run by dvc.yaml as `python -m stages.<name>`.

Importing the package is where such a process hands itself to a warm stage server, when
`python -m pipelines.stage_server -- CMD` started one for CMD (see stages/_forward.py)."""

from stages._forward import hand_over_if_served

hand_over_if_served()
