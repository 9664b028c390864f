"""The studies of nlx: each one runs as ``python -m experiments.<study>`` from the repository root.

``experiments`` is a package of the checkout, not of the installed ``nlx`` (setup.cfg does not list
it): the studies import each other as ``from experiments import study``. Studies that read a
dataset take ``--data DIR`` (else the environment variable ``NLX_DATA``); see ``study.data_dir``.
"""
