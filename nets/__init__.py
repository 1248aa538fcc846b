"""Your own networks: a factory here is named in params.yaml as `nets.<module>:<callable>`.

Every stage that builds a model depends on this folder in dvc.yaml, so editing a network
here re-runs what it changes (a factory in an installed package is versioned by the
environment instead). Keep pretrained weights files (`models.<name>.weights`) here too.
"""
